"""Baselines at the same budget as a plan, built from the same profile.

Every baseline is a real :class:`~headplan.plan.Plan` meeting the plan's density and/or KV budget at
the plan's lengths (the budget the search was given):

- ``streaming``: StreamingLLM — one sink + window on every KV head; the window is the largest that
  meets the budget at every length.
- ``duo``: DuoAttention-style — the KV heads that lose most under the profile's short window are
  full, the others sink + a fixed window (the profile's fixed window nearest to 1/8 of the shortest
  length, DuoAttention's recent 256 at 2K, or the nearest smaller one that fits the budget); as many
  full heads as the budget allows.
- ``moa``: MoA-style — the same exact search, restricted to the profile's streaming candidates (fixed
  and elastic ``alpha + beta·N`` windows).
- ``random``: a seeded random assignment of the profile's candidates that meets the budget.
- ``snapkv``: SnapKV — every KV head a ``select`` head (no sink; the observation window of
  ``kernels.patterns.OBS`` recent tokens; the largest elastic keep that meets the KV budget at every length).
  Its prefill is full, so it needs a budget without a density bound below 1.
- ``pyramidkv``: PyramidKV — the same, with a keep that falls linearly from 1.5x the mean in the first
  layer to 0.5x in the last.
- ``adakv``: AdaKV — SnapKV's heads with their keep budgets pooled per layer (``share: layer``): tokens
  compete across the layer's heads, each head keeping at least a fifth of its own budget.
- ``duo-otf``: DuoAttention with its heads scored on the fly — every KV head a select head with duo's sink
  and window whose pooled keep budget buys whole heads per layer and input (``share: heads``): the heads
  whose last queries attend most outside sink and window keep every token, the others sink + window.
  (kvpress's on-the-fly scoring ranks heads once per model from mean queries and keys; this ranks them on
  each input, as its prefill arrives.) Its KV share is the plan's on average: a head is bought while the
  budget left covers half of it.

The selection baselines keep what the plan's KV budget allows at every length; their heads prefill in full.
"""

from __future__ import annotations

import dataclasses
import random as _random
from pathlib import Path

import numpy as np

from ..candidates import Candidate, budget_tables, plan_shares, select, streaming
from ..errors import HeadplanError
from ..plan import Budget, HeadEntry, Plan, save_plan

BASELINES = ("streaming", "duo", "moa", "random", "snapkv", "pyramidkv", "adakv", "duo-otf")
DEFAULT_BASELINES = ("streaming", "duo", "moa", "random")  # what `--baselines` alone (True) means


def _budget(plan: Plan) -> tuple[float | None, float | None, tuple[int, ...]]:
    b = plan.budget
    if b.density is None and b.kv_budget is None:
        raise HeadplanError("the plan records no budget (density or kv_budget); baselines need one")
    return b.density, b.kv_budget, tuple(b.lengths)


def _fits(d: list[float], k: list[float], dens: float | None, kvb: float | None) -> bool:
    ok = True
    if dens is not None:
        ok &= all(x <= dens + 1e-9 for x in d)
    if kvb is not None:
        ok &= all(x <= kvb + 1e-9 for x in k)
    return ok


def _make(prof, plan: Plan, name: str, choice: list[Candidate], losses: list[float], extra: dict) -> Plan:
    m = prof.model
    dens, kvb, lengths = _budget(plan)
    H = m.num_kv_heads
    layers = tuple(tuple(HeadEntry(h, choice[layer * H + h].pattern, choice[layer * H + h].name)
                         for h in range(H)) for layer in range(m.num_layers))
    shares = [plan_shares(m, [[e.pattern for e in layer] for layer in layers], n, prof.block_size) for n in lengths]
    ach_d = tuple(float(d) for d, _ in shares)
    ach_k = tuple(float(k) for _, k in shares)
    prov = {"baseline": name, "profile": (plan.provenance or {}).get("profile") or {"sha256": prof.sha256},
            "model_spec": prof.model_spec, **extra}
    budget = Budget(density=dens, kv_budget=kvb, lengths=lengths, achieved_density=ach_d, achieved_kv=ach_k,
                    expected_loss=float(np.mean(losses)), max_length=plan.budget.max_length)
    return Plan(model=m, budget=budget, layers=layers, block_size=prof.block_size, provenance=prov)


def _profiled(prof, lengths) -> tuple[int, ...]:
    """The plan's budget lengths that were profiled (a plan with a max_length also binds at longer ones)."""
    got = tuple(n for n in lengths if n in prof.lengths)
    if not got:
        raise HeadplanError(f"profile has none of the plan's lengths {', '.join(map(str, lengths))} (profiled: "
                            f"{', '.join(map(str, prof.lengths))}); baselines need the plan's profile")
    return got


def _tables(prof, lengths):
    """(loss (H, C) over the profiled lengths among ``lengths``, density and KV share (H, C, lengths))."""
    li = [prof.lengths.index(n) for n in _profiled(prof, lengths)]
    m = prof.model
    loss = prof.loss.double().numpy()[..., li].mean(-1).reshape(m.num_layers * m.num_kv_heads, -1)  # (H, C)
    # (H, C, lengths) shares against the model's own attention and cache (each head's layer window)
    dt, kt = (np.repeat(t, m.num_kv_heads, axis=0) for t in budget_tables(prof.candidates, lengths,
                                                                            prof.block_size, m))
    return loss, dt, kt


def _streaming_cands(prof) -> list[int]:
    return [i for i, c in enumerate(prof.candidates) if c.pattern.kind == "streaming"]


def _fixed_windows(prof) -> list[int]:
    return [i for i in _streaming_cands(prof) if prof.candidates[i].pattern.window.beta == 0.0]


def _sink(prof) -> int:
    fw = _fixed_windows(prof)
    if not fw:
        raise HeadplanError("the profile has no fixed sink + window candidate (needed by the baselines)")
    return int(prof.candidates[fw[0]].pattern.sink)


def streaming_baseline(prof, plan: Plan) -> Plan:
    dens, kvb, lengths = _budget(plan)
    sink = _sink(prof)

    m = prof.model

    def ok(alpha):
        uniform = [[streaming(sink, alpha).pattern] * m.num_kv_heads] * m.num_layers
        shares = [plan_shares(m, uniform, n, prof.block_size) for n in lengths]
        return _fits([d for d, _ in shares], [k for _, k in shares], dens, kvb)

    if not ok(1):
        raise HeadplanError(f"streaming baseline: even sink {sink} + window 1 exceeds the budget")
    lo, hi = 1, max(lengths)
    while lo < hi:  # largest alpha that fits (density and KV share grow with alpha)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    cand = streaming(sink, lo)
    # expected loss: that of the largest profiled fixed window <= alpha (an upper bound)
    loss, _, _ = _tables(prof, lengths)
    fw = [i for i in _fixed_windows(prof) if prof.candidates[i].pattern.window.alpha <= lo
          and prof.candidates[i].pattern.sink == sink]
    H = loss.shape[0]
    losses = list(loss[:, max(fw, key=lambda i: prof.candidates[i].pattern.window.alpha)]) if fw else [1.0] * H
    return _make(prof, plan, "streaming", [cand] * H, losses, {"sink": sink, "window": lo})


def duo_baseline(prof, plan: Plan) -> Plan:
    from ..profile import short_window

    dens, kvb, lengths = _budget(plan)
    loss, dt, kt = _tables(prof, lengths)
    H = loss.shape[0]
    fw = _fixed_windows(prof)
    full = [i for i, c in enumerate(prof.candidates) if c.pattern.kind == "full"]
    if not fw or not full:
        raise HeadplanError("duo baseline: the profile needs a full and a fixed sink + window candidate")
    target = min(lengths) / 8
    # the fixed window nearest below target (DuoAttention: 256 at 2K) that fits the budget on its own
    prefs = sorted(fw, key=lambda i: (prof.candidates[i].pattern.window.alpha > target,
                                      abs(prof.candidates[i].pattern.window.alpha - target)))
    fi = full[0]
    score = loss[:, short_window(prof)]
    order = sorted(range(H), key=lambda h: (-score[h], h))
    best, si = -1, None
    for si in prefs:
        for k in range(H + 1):  # the k heads ranked first are full, the rest the short window
            top, rest = order[:k], order[k:]
            d = [(dt[top, fi, j].sum() + dt[rest, si, j].sum()) / H for j in range(len(lengths))]
            kk = [(kt[top, fi, j].sum() + kt[rest, si, j].sum()) / H for j in range(len(lengths))]
            if _fits(d, kk, dens, kvb):
                best = k
        if best >= 0:
            break
    if best < 0:
        raise HeadplanError("duo baseline: no fixed sink + window on every head fits the budget")
    fullset = set(order[:best])
    choice = [prof.candidates[fi] if h in fullset else prof.candidates[si] for h in range(H)]
    losses = [loss[h, fi if h in fullset else si] for h in range(H)]
    return _make(prof, plan, "duo", choice, losses, {"full_heads": best, "rest": prof.candidates[si].name,
                                                     "ranked_by": prof.candidates[short_window(prof)].name})


def moa_baseline(prof, plan: Plan) -> Plan:
    import torch

    from .assemble import search
    from .settings import SearchSettings

    dens, kvb, lengths = _budget(plan)
    idx = _streaming_cands(prof)
    if not idx:
        raise HeadplanError("moa baseline: the profile has no streaming candidates")
    t = torch.tensor(idx)
    sub = dataclasses.replace(prof, candidates=tuple(prof.candidates[i] for i in idx), loss=prof.loss[:, :, t],
                              density=prof.density[t], kv=prof.kv[t],
                              parts={k: v[:, :, t] for k, v in prof.parts.items()})
    p = search(sub, SearchSettings(density=dens, kv_budget=kvb, lengths=_profiled(prof, lengths),
                                   max_length=plan.budget.max_length), (plan.provenance or {}).get("profile"))
    prov = dict(p.provenance)
    prov = {"baseline": "moa", "restricted_to": "streaming candidates (fixed and elastic windows)", **prov}
    return dataclasses.replace(p, provenance=prov)


def random_baseline(prof, plan: Plan, seed: int = 0) -> Plan:
    dens, kvb, lengths = _budget(plan)
    loss, dt, kt = _tables(prof, lengths)
    H, C = loss.shape
    rng = _random.Random(f"headplan-random-baseline:{seed}")
    # cost of a candidate = its worst share of each budget; start every head at the cheapest one
    rows = [t for t, b in ((dt, dens), (kt, kvb)) if b is not None]  # each (H, C, lengths)
    bounds = [b for b in (dens, kvb) if b is not None]
    cheapest = min(range(C), key=lambda c: max(float(t[:, c].max()) for t in rows))
    choice = [cheapest] * H
    tot = [t[:, cheapest].sum(axis=0) for t in rows]  # per budget row: (lengths,) sums over heads
    if any((s > b * H + 1e-9).any() for s, b in zip(tot, bounds)):
        raise HeadplanError("random baseline: the cheapest candidate on every head exceeds the budget")
    for h in rng.sample(range(H), H):  # heads in random order, each a uniform pick among what still fits
        fits = [c for c in range(C)
                if all(((s - t[h, cheapest] + t[h, c]) <= b * H + 1e-9).all() for s, t, b in zip(tot, rows, bounds))]
        c = rng.choice(fits)
        tot = [s - t[h, cheapest] + t[h, c] for s, t in zip(tot, rows)]
        choice[h] = c
    cands = [prof.candidates[c] for c in choice]
    return _make(prof, plan, "random", cands, [loss[h, c] for h, c in enumerate(choice)], {"seed": seed})


def _selection_baseline(prof, plan: Plan, name: str, slope: float, share: str | None = None,
                        near: tuple[int, int] | None = None) -> Plan:
    """SnapKV (slope 0) or PyramidKV (slope 1): select heads everywhere, layer l keeping
    ``b · (1 + slope · (1/2 - l/(L-1)))`` of the tokens, b the largest on the 1/4096 grid that fits.
    ``share``: the heads' keep budgets pooled per layer (plan.SHARES); ``near``: (sink, window) of every head
    (default: no sink and the observation window)."""
    from ..kernels.patterns import BETA_SCALE, OBS

    sink, win = near or (0, OBS)

    dens, kvb, lengths = _budget(plan)
    m = prof.model
    L, H = m.num_layers, m.num_kv_heads
    if dens is not None and dens < 1:
        raise HeadplanError(f"{name} baseline: its heads prefill in full, so it cannot meet density {dens:g}; "
                            "give a KV budget alone (--kv-budget K --density 1)")
    if kvb is None:
        raise HeadplanError(f"{name} baseline: the plan has no KV budget to match")
    factor = [1.0 + slope * (0.5 - (li / (L - 1) if L > 1 else 0.5)) for li in range(L)]

    def cands(q: int) -> list[Candidate]:
        c = [select(sink, win, min(BETA_SCALE, int(q * f)) / BETA_SCALE) for f in factor for _ in range(H)]
        return [dataclasses.replace(x, pattern=dataclasses.replace(x.pattern, share=share)) for x in c] if share else c

    def ok(q: int) -> bool:
        c = cands(q)
        shares = [plan_shares(m, [[c[li * H + h].pattern for h in range(H)] for li in range(L)], n, prof.block_size)
                  for n in lengths]
        return _fits([d for d, _ in shares], [k for _, k in shares], None, kvb)

    if not ok(1):
        raise HeadplanError(f"{name} baseline: even sink {sink} + window {win} alone exceeds the KV budget")
    lo, hi = 1, BETA_SCALE
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    loss, _, _ = _tables(prof, lengths)
    si = [i for i, c in enumerate(prof.candidates) if c.pattern.kind == "select" and c.pattern.keep.beta <= lo / BETA_SCALE]
    best = max(si, key=lambda i: prof.candidates[i].pattern.keep.beta) if si else None
    losses = list(loss[:, best]) if best is not None else [1.0] * (L * H)  # the nearest profiled keep below
    extra = {"keep_beta": lo / BETA_SCALE, "window": win, **({"sink": sink} if sink else {}),
             **({"share": share} if share else {})}
    return _make(prof, plan, name, cands(lo), losses, extra)


def _duo_near(prof, plan: Plan) -> tuple[int, int]:
    """(sink, window) of duo's streaming heads: the profile's sink and fixed window nearest below 1/8 of the
    shortest length (DuoAttention's recent 256 at 2K)."""
    lengths = _budget(plan)[2]
    fw = _fixed_windows(prof)
    if not fw:
        raise HeadplanError("duo-otf baseline: the profile needs a fixed sink + window candidate")
    target = min(lengths) / 8
    best = min(fw, key=lambda i: (prof.candidates[i].pattern.window.alpha > target,
                                  abs(prof.candidates[i].pattern.window.alpha - target)))
    p = prof.candidates[best].pattern
    return int(p.sink), int(p.window.alpha)


def build_baselines(prof, plan: Plan, names=DEFAULT_BASELINES, seed: int = 0) -> dict[str, Plan]:
    """The named baselines for ``plan`` from ``prof`` (the profile the plan was searched on)."""
    if prof.model.fingerprint != plan.model.fingerprint:
        raise HeadplanError("the profile is for another model than the plan (fingerprints differ)")
    sig = ((plan.provenance or {}).get("search") or {}).get("signals")
    if sig:  # the plan re-weighted the profile's signals: rank heads for duo/moa by the same loss
        from .solve import profile_loss

        prof = dataclasses.replace(prof, loss=profile_loss(prof, tuple((k, float(w)) for k, w in sig.items())).float())
    makers = {"streaming": streaming_baseline, "duo": duo_baseline, "moa": moa_baseline,
              "random": lambda p, pl: random_baseline(p, pl, seed),
              "snapkv": lambda p, pl: _selection_baseline(p, pl, "snapkv", 0.0),
              "pyramidkv": lambda p, pl: _selection_baseline(p, pl, "pyramidkv", 1.0),
              "adakv": lambda p, pl: _selection_baseline(p, pl, "adakv", 0.0, "layer"),
              "duo-otf": lambda p, pl: _selection_baseline(p, pl, "duo-otf", 0.0, "heads", _duo_near(p, pl))}
    out = {}
    for n in names:
        if n not in makers:
            raise HeadplanError(f"unknown baseline {n!r} (known: {', '.join(BASELINES)})")
        bp = makers[n](prof, plan)
        of = {"density": plan.budget.density, "kv_budget": plan.budget.kv_budget,
              "lengths": list(plan.budget.lengths), **({"signals": dict(sig)} if sig else {}),
              **({"max_length": plan.budget.max_length} if plan.budget.max_length is not None else {})}
        bp.provenance.update({"baseline": n, "of_plan_budget": of})
        out[n] = bp
    return out


def regenerate(prof, baseline: Plan) -> Plan:
    """Build again the baseline ``baseline`` records (``provenance.baseline``, ``of_plan_budget``, ``seed``)
    from ``prof``: what ``headplan check`` compares a baseline plan with."""
    prov = baseline.provenance or {}
    name, of = prov.get("baseline"), prov.get("of_plan_budget")
    if name not in BASELINES or not isinstance(of, dict) or not of.get("lengths"):
        raise HeadplanError(f"provenance.baseline: {name!r} does not record what it was built from "
                            "(of_plan_budget); build it again with `headplan baselines`")
    lengths = tuple(int(n) for n in of["lengths"])
    budget = Budget(density=of.get("density"), kv_budget=of.get("kv_budget"), lengths=lengths,
                    achieved_density=(), achieved_kv=(), expected_loss=0.0,
                    max_length=int(of["max_length"]) if of.get("max_length") is not None else None)
    of_plan = Plan(model=baseline.model, budget=budget, layers=baseline.layers, block_size=baseline.block_size,
                   provenance={"profile": prov.get("profile"),
                               **({"search": {"signals": of["signals"]}} if of.get("signals") else {})})
    return build_baselines(prof, of_plan, [name], int(prov.get("seed", 0)))[name]


def baseline_names(value) -> list[str]:
    """True -> the window baselines (streaming, duo, moa, random); 'a,b' or a list -> those names (checked,
    the selection ones snapkv, pyramidkv, adakv and duo-otf among them); None/False -> none."""
    if value is True:
        return list(DEFAULT_BASELINES)
    if not value:
        return []
    names = [x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip()]
    for x in names:
        if x not in BASELINES:
            raise HeadplanError(f"unknown baseline {x!r} (known: {', '.join(BASELINES)})")
    return names


def save_baseline(plan: Plan, out: Path, profile_path: Path, sha256: str, into: Path | None = None) -> None:
    """Save a baseline plan as ``out`` (written at ``into``, its staged place, when given), its
    provenance.profile.path made relative to ``out``'s folder."""
    from .assemble import profile_ref

    plan.provenance["profile"] = profile_ref(profile_path, out, sha256)
    save_plan(plan, into or out)
