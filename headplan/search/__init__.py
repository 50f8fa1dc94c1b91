"""Search: choose one candidate per KV head to lose the least, under budgets at every length.

A multiple-choice knapsack solved exactly as a 0/1 integer program with HiGHS
(scipy.optimize.milp; no licensed solver). Budgets, any combination:

- ``density``: average attention density <= D at every searched length;
- ``kv_budget``: average KV share kept <= K at every searched length;
- ``latency_budget`` (ms, length): predicted prefill latency of the whole model at that length,
  from a cost table (``headplan.costmodel``), with the per-layer launch cost and the per-layer
  index-building cost of dynamic heads (one binary per layer: paid once if any head is dynamic);
- ``memory_budget`` (GB, batch, length): KV cache bytes at that batch and length;
- ``max_patterns_per_layer``: at most that many distinct candidates in a layer (fewer kernels
  variants per launch).

ε-constraints across lengths (each length its own budget row); ``pareto()`` sweeps one budget and
writes the front; ``tune()`` runs Optuna over global knobs. Deterministic: the same profile and
settings give the same plan, byte for byte.
"""

from __future__ import annotations

import contextlib
import csv
import math
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..candidates import budget_tables, same_as_full
from ..errors import HeadplanError
from ..plan import Budget, HeadEntry, Plan, atomic_write
from ..profile import Profile

TIE = 1e-7  # tie-breaker weight: between equal losses prefer the cheaper candidate


@dataclass(frozen=True)
class SearchSettings:
    density: float | None = None
    kv_budget: float | None = None
    lengths: tuple[int, ...] | None = None  # default: all profiled lengths
    latency_budget: tuple[float, int] | None = None  # (ms, length)
    memory_budget: tuple[float, int, int] | None = None  # (GB, batch, length)
    max_patterns_per_layer: int | None = None
    exclude_kinds: tuple[str, ...] = ()
    validate_lengths: tuple[int, ...] = ()
    signals: tuple[tuple[str, float], ...] = ()  # re-weight the profile's stored signals; () = as profiled
    keep: tuple[tuple[str, float], ...] = ()  # (signal, slack): that signal's loss <= slack x its own optimum
    full_heads: int | None = None  # exactly this many KV heads full (DuoAttention-style retrieval heads)

    def to_dict(self) -> dict:
        d = {"density": self.density, "kv_budget": self.kv_budget,
             "lengths": list(self.lengths) if self.lengths else None}
        if self.latency_budget is not None:
            d["latency_budget"] = {"ms": self.latency_budget[0], "length": self.latency_budget[1]}
        if self.memory_budget is not None:
            d["memory_budget"] = {"gb": self.memory_budget[0], "batch": self.memory_budget[1],
                                  "length": self.memory_budget[2]}
        if self.max_patterns_per_layer is not None:
            d["max_patterns_per_layer"] = self.max_patterns_per_layer
        if self.exclude_kinds:
            d["exclude_kinds"] = list(self.exclude_kinds)
        if self.validate_lengths:
            d["validate_lengths"] = list(self.validate_lengths)
        if self.signals:
            d["signals"] = {k: w for k, w in self.signals}
        if self.keep:
            d["keep"] = {k: w for k, w in self.keep}
        if self.full_heads is not None:
            d["full_heads"] = self.full_heads
        return d

    @staticmethod
    def from_dict(s: dict) -> "SearchSettings":
        lat = s.get("latency_budget")
        mem = s.get("memory_budget")
        return SearchSettings(
            density=s.get("density"), kv_budget=s.get("kv_budget"),
            lengths=tuple(s["lengths"]) if s.get("lengths") else None,
            latency_budget=(float(lat["ms"]), int(lat["length"])) if lat else None,
            memory_budget=(float(mem["gb"]), int(mem["batch"]), int(mem["length"])) if mem else None,
            max_patterns_per_layer=s.get("max_patterns_per_layer"),
            exclude_kinds=tuple(s.get("exclude_kinds") or ()),
            validate_lengths=tuple(s.get("validate_lengths") or ()),
            signals=tuple((str(k), float(w)) for k, w in (s.get("signals") or {}).items()),
            keep=tuple((str(k), float(w)) for k, w in (s.get("keep") or {}).items()),
            full_heads=int(s["full_heads"]) if s.get("full_heads") is not None else None)


def parse_latency(s: str | None) -> tuple[float, int] | None:
    """'12.5@32768' or '12.5@32k' -> (12.5, 32768)."""
    from ..args import parse_length

    if s is None:
        return None
    try:
        ms, n = s.lower().split("@")
        return float(ms), parse_length(n)
    except (ValueError, HeadplanError):
        raise HeadplanError(f"--latency-budget takes MS@LENGTH (e.g. 40@32k), got {s!r}") from None


def parse_memory(s: str | None) -> tuple[float, int, int] | None:
    """'20@8x32k' -> (20.0 GB, batch 8, length 32768)."""
    from ..args import parse_length

    if s is None:
        return None
    try:
        gb, rest = s.lower().split("@")
        b, n = rest.split("x")
        return float(gb), int(b), parse_length(n)
    except (ValueError, HeadplanError):
        raise HeadplanError(f"--memory-budget takes GB@BATCHxLENGTH (e.g. 20@8x32k), got {s!r}") from None


class _Problem:
    """Sparse 0/1 program: x (H*C) one-hot per head, plus optional per-layer auxiliaries."""

    def __init__(self, obj: np.ndarray, H: int, C: int, heads_per_layer: int):
        self.H, self.C, self.hpl = H, C, heads_per_layer
        self.L = H // heads_per_layer
        self.obj = [obj]
        self.nvar = H * C
        self.rows: list[tuple[list[int], list[float], float, float]] = []
        for h in range(H):
            self.rows.append((list(range(h * C, (h + 1) * C)), [1.0] * C, 1.0, 1.0))

    def add_vars(self, n: int, cost: np.ndarray | None = None) -> int:
        start = self.nvar
        self.nvar += n
        self.obj.append(np.zeros(n) if cost is None else cost)
        return start

    def le(self, idx, coef, ub):
        self.rows.append((list(idx), list(coef), -np.inf, ub))

    def solve(self) -> np.ndarray:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_array

        data, ri, ci, lo, hi = [], [], [], [], []
        for r, (idx, coef, lb, ub) in enumerate(self.rows):
            ri += [r] * len(idx)
            ci += idx
            data += coef
            lo.append(lb)
            hi.append(ub)
        A = csr_array((data, (ri, ci)), shape=(len(self.rows), self.nvar))
        with _quiet_stdout():  # HiGHS prints some internal notices straight to fd 1 even with disp off
            res = milp(np.concatenate(self.obj), constraints=[LinearConstraint(A, np.array(lo), np.array(hi))],
                       integrality=np.ones(self.nvar), bounds=Bounds(0, 1),
                       options={"disp": False, "presolve": True, "mip_rel_gap": 0.0})
        if res.x is None:
            raise HeadplanError(f"no plan meets these budgets together ({res.message.strip()})")
        return np.asarray(res.x[: self.H * self.C]).reshape(self.H, self.C).argmax(axis=1)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence writes to file descriptor 1 (C-level prints) for the duration; restores it after."""
    import os
    import sys

    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real fd (captured stream): nothing to silence
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cost_coefs(prof: Profile, cost, n: int):
    """Per (layer, candidate) marginal prefill ms (each layer's own window bounds the work) and per
    candidate index-building ms."""
    pats = [c.pattern for c in prof.candidates]
    m = prof.model
    per_head = np.array([[cost.head_prefill_ms(p, n, prof.block_size, m.window(li)) for p in pats]
                         for li in range(m.num_layers)])
    dyn_ms = np.array([cost.dyn_ns_per_token.get(p.kind, 0.0) * n * 1e-6 + cost.dyn_fixed_us.get(p.kind, 0.0) * 1e-3
                       if p.kind in ("blocksparse", "vslash") else 0.0 for p in pats])
    return per_head, dyn_ms


def profile_loss(prof: Profile, signals=()) -> torch.Tensor:
    """The per-(layer, KV head, candidate, length) loss the search minimises: the profile's stored
    combination, or its stored signals re-combined with new weights (``signals``: (name, weight)
    pairs; each signal divided by its mean, as when profiling)."""
    from ..profile import combine

    if not signals:
        return prof.loss.double()
    missing = [k for k, _ in signals if k not in prof.parts]
    if missing:
        have = ", ".join(prof.parts) or "none (an old or single-signal profile)"
        raise HeadplanError(f"--signals: the profile has no stored signal {missing[0]!r} (stored: {have})")
    for k, w in signals:
        if not (w > 0 and math.isfinite(w)):
            raise HeadplanError(f"--signals: weight of {k!r} must be positive, got {w}")
    weights = dict(signals)  # one signal alone comes back as a single-signal profile stores it
    return combine({k: prof.parts[k].double() for k in weights}, weights)[0]


def _collapsed(prof: Profile, allowed: np.ndarray) -> np.ndarray:
    """(layers, C) allowed candidates per layer: in a sliding layer, a candidate that sees exactly what
    ``full`` sees there (its window spans the layer's) is collapsed into full, so a plan never names
    two patterns for one behaviour."""
    m = prof.model
    full = [c for c, cand in enumerate(prof.candidates) if cand.pattern.kind == "full" and allowed[c]]
    out = np.repeat(allowed[None, :], m.num_layers, axis=0)
    if not full or not m.layer_windows:
        return out
    for li in range(m.num_layers):
        for c, cand in enumerate(prof.candidates):
            if cand.pattern.kind != "full" and same_as_full(cand.pattern, m.window(li)):
                out[li, c] = False
    return out


def search(prof: Profile, settings: SearchSettings, profile_ref: dict | None = None, cost=None) -> Plan:
    choice, lengths, loss, dens, kv = _solve(prof, settings, cost)
    return _plan(prof, settings, choice, lengths, loss, dens, kv, profile_ref, cost)


def _solve(prof: Profile, settings: SearchSettings, cost=None):
    from ..costmodel import check_fits

    lengths = tuple(settings.lengths) if settings.lengths else prof.lengths
    for n in tuple(lengths) + tuple(settings.validate_lengths):
        if n not in prof.lengths:
            raise HeadplanError(f"profile has no length {n} (profiled: {', '.join(map(str, prof.lengths))})")
    li = [prof.lengths.index(n) for n in lengths]
    m = prof.model
    H = m.num_layers * m.num_kv_heads
    C = len(prof.candidates)
    loss = profile_loss(prof, settings.signals).numpy()[..., li].reshape(H, C, len(li))
    # (H, C, lengths): each head's shares against the model's own attention and cache (its layer's window)
    dens, kv = (np.repeat(t, m.num_kv_heads, axis=0) for t in budget_tables(prof.candidates, lengths,
                                                                              prof.block_size, m))
    allowed = np.array([c.pattern.kind not in settings.exclude_kinds for c in prof.candidates])
    if not allowed.any():
        raise HeadplanError("every candidate kind is excluded")
    allowed = np.repeat(_collapsed(prof, allowed), m.num_kv_heads, axis=0)  # (H, C)
    obj = loss.mean(axis=2) + TIE * dens.mean(axis=2)
    obj = np.where(allowed, obj, 1e6)  # excluded candidates are never worth it
    obj = np.round(obj, 12).reshape(-1)
    prob = _Problem(obj, H, C, m.num_kv_heads)
    xs = lambda c: [h * C + c for h in range(H)]  # noqa: E731

    def budget_rows(name, bound, table):
        if bound is None:
            return
        if not 0.0 < bound <= 1.0:
            raise HeadplanError(f"--{name.replace('_', '-')} must be in (0, 1], got {bound}")
        for j, n in enumerate(lengths):
            lo = float(np.where(allowed, table[:, :, j], np.inf).min(axis=1).mean())
            if lo > bound + 1e-12:
                raise HeadplanError(
                    f"{name} {bound:g} is infeasible at length {n}: the cheapest candidates give {lo:.4f} "
                    f"(feasible range [{lo:.4f}, 1])")
            idx = [i for c in range(C) for i in xs(c)]
            prob.le(idx, [table[i // C, i % C, j] / H for i in idx], bound + 1e-9)

    budget_rows("density", settings.density, dens)
    budget_rows("kv_budget", settings.kv_budget, kv)
    if settings.latency_budget is not None or settings.memory_budget is not None:
        if cost is None:
            raise HeadplanError("latency and memory budgets need a cost table (--cost-table, or 'analytic')")
        check_fits(cost, m.head_dim, m.num_query_heads // m.num_kv_heads)
    if settings.latency_budget is not None:
        ms, n = settings.latency_budget
        per_layer, dyn_ms = _cost_coefs(prof, cost, n)
        per_head = np.repeat(per_layer, m.num_kv_heads, axis=0)  # (H, C)
        fixed = m.num_layers * cost.prefill_launch_us * 1e-3
        lo = fixed + float(np.where(allowed, per_head, np.inf).min(axis=1).sum())
        is_full = np.array([c.pattern.kind == "full" for c in prof.candidates])
        dense = fixed + float(per_head[:, is_full].max(axis=1, initial=0).sum()) if is_full.any() else lo
        if ms < lo - 1e-9:
            raise HeadplanError(f"latency budget {ms:g} ms at {n} tokens is infeasible: the cheapest plan is "
                                f"predicted at {lo:.3f} ms (feasible range [{lo:.3f}, {dense:.3f}] ms)")
        if ms > dense + 1e-9:
            raise HeadplanError(f"latency budget {ms:g} ms at {n} tokens is above the dense plan's predicted "
                                f"{dense:.3f} ms: nothing to save (feasible range [{lo:.3f}, {dense:.3f}] ms)")
        idx = [i for c in range(C) for i in xs(c)]
        coef = [per_head[i // C, i % C] for i in idx]
        # one binary per (layer, dynamic kind): its index building is paid once if any head uses it
        dyn_kinds = sorted({prof.candidates[c].pattern.kind for c in range(C) if dyn_ms[c] > 0})
        extra_idx, extra_coef = [], []
        for kind in dyn_kinds:
            y0 = prob.add_vars(m.num_layers)
            cs = [c for c in range(C) if prof.candidates[c].pattern.kind == kind]
            kcost = float(max(dyn_ms[c] for c in cs))
            for layer in range(m.num_layers):
                for h in range(layer * m.num_kv_heads, (layer + 1) * m.num_kv_heads):
                    for c in cs:
                        prob.le([h * C + c, y0 + layer], [1.0, -1.0], 0.0)
            extra_idx += list(range(y0, y0 + m.num_layers))
            extra_coef += [kcost] * m.num_layers
        # in microseconds, minus a margin, so the solver's feasibility tolerance cannot overshoot the budget
        prob.le(idx + extra_idx, [c * 1e3 for c in coef + extra_coef], (ms - fixed) * 1e3 - 1e-5)
    if settings.memory_budget is not None:
        gb, b, n = settings.memory_budget
        per = np.repeat(np.array([[cost.head_kv_bytes(c.pattern, n, lwin=m.window(li)) * b for c in prof.candidates]
                                  for li in range(m.num_layers)]) / 1e9, m.num_kv_heads, axis=0)  # (H, C)
        lo = float(np.where(allowed, per, np.inf).min(axis=1).sum())
        if gb < lo - 1e-12:
            raise HeadplanError(f"memory budget {gb:g} GB at batch {b} x {n} is infeasible: the smallest KV cache "
                                f"is {lo:.3f} GB (feasible range [{lo:.3f}, {per.max(axis=1).sum():.3f}] GB)")
        idx = [i for c in range(C) for i in xs(c)]
        prob.le(idx, [per[i // C, i % C] * 1e6 for i in idx], gb * 1e6 - 1e-5)  # in KB
    if settings.max_patterns_per_layer is not None:
        kmax = int(settings.max_patterns_per_layer)
        if kmax < 1:
            raise HeadplanError(f"--max-patterns-per-layer must be >= 1, got {kmax}")
        z0 = prob.add_vars(m.num_layers * C)
        for layer in range(m.num_layers):
            for h in range(layer * m.num_kv_heads, (layer + 1) * m.num_kv_heads):
                for c in range(C):
                    prob.le([h * C + c, z0 + layer * C + c], [1.0, -1.0], 0.0)
            prob.le(list(range(z0 + layer * C, z0 + (layer + 1) * C)), [1.0] * C, kmax)
    if settings.full_heads is not None:
        k = int(settings.full_heads)
        fc = [c for c in range(C) if prof.candidates[c].pattern.kind == "full" and allowed[:, c].any()]
        if not 0 <= k <= H or (k and not fc):
            raise HeadplanError(f"--full-heads {k} is impossible: the model has {H} KV heads"
                                + ("" if fc else " and the candidates allow no full pattern"))
        idx = [i for c in fc for i in xs(c)]
        prob.le(idx, [1.0] * len(idx), k)
        prob.le(idx, [-1.0] * len(idx), -k)
    for sig, slack in settings.keep:
        # epsilon-constraint: first the best this signal alone can do under the same budgets, then
        # keep the plan's loss on that signal within `slack` times that optimum
        if not (slack >= 1.0 and math.isfinite(slack)):
            raise HeadplanError(f"--keep: the slack of {sig!r} must be >= 1 (a factor on its optimum), got {slack}")
        import dataclasses

        alone = dataclasses.replace(settings, signals=((sig, 1.0),), keep=())
        best, *_ = _solve(prof, alone, cost)
        part = profile_loss(prof, ((sig, 1.0),)).numpy()[..., li].reshape(H, C, len(li)).mean(axis=2)
        opt = float(part[np.arange(H), best].sum())
        scale = opt if opt > 0 else 1.0
        idx = [i for c in range(C) for i in xs(c)]
        prob.le(idx, [part[i // C, i % C] / scale for i in idx], slack * opt / scale + 1e-9)
    choice = prob.solve()
    return choice, lengths, loss, dens, kv


def _plan(prof, settings, choice, lengths, loss, dens, kv, profile_ref, cost) -> Plan:
    import scipy

    m = prof.model
    H = m.num_layers * m.num_kv_heads
    layers = []
    for layer in range(m.num_layers):
        heads = []
        for h in range(m.num_kv_heads):
            c = prof.candidates[int(choice[layer * m.num_kv_heads + h])]
            heads.append(HeadEntry(h, c.pattern, c.name))
        layers.append(tuple(heads))
    ach_d = tuple(float(dens[np.arange(H), choice, j].mean()) for j in range(len(lengths)))
    ach_k = tuple(float(kv[np.arange(H), choice, j].mean()) for j in range(len(lengths)))
    exp = float(loss[np.arange(H), choice].mean())
    search_info = {"solver": "milp-highs", "objective": "mean profiled loss over lengths", **settings.to_dict(),
                   "candidates": [c.name for c in prof.candidates]}
    if cost is not None:
        search_info["cost_table"] = {"source": cost.source, "device": cost.device.get("name", "")}
    if settings.validate_lengths:
        vi = [prof.lengths.index(n) for n in settings.validate_lengths]
        vloss = profile_loss(prof, settings.signals).numpy()[..., vi].reshape(H, len(prof.candidates), len(vi))
        search_info["validation_loss"] = {str(n): round(float(vloss[np.arange(H), choice, j].mean()), 8)
                                          for j, n in enumerate(settings.validate_lengths)}
    prov = {
        "profile": profile_ref or {"sha256": prof.sha256},
        "model_spec": prof.model_spec,
        "method": prof.method,
        "data": prof.data,
        "search": search_info,
        "versions": {"headplan": __version__, "scipy": scipy.__version__},
    }
    budget = Budget(density=settings.density, kv_budget=settings.kv_budget, lengths=tuple(lengths),
                    achieved_density=ach_d, achieved_kv=ach_k, expected_loss=exp)
    plan = Plan(model=m, budget=budget, layers=tuple(layers), block_size=prof.block_size, provenance=prov)
    if cost is not None and settings.latency_budget is not None:
        n = settings.latency_budget[1]
        prov["search"]["predicted_prefill_ms"] = round(cost.plan_prefill_ms(plan, n), 6)
    return plan


def profile_ref(profile_path: str | Path, plan_path: str | Path, sha256: str) -> dict:
    """How a plan refers to its profile: a path relative to the plan's folder, and the file's hash."""
    import os

    pp, pl = Path(profile_path).resolve(), Path(plan_path).resolve()
    rel = os.path.relpath(pp, pl.parent)
    return {"path": rel, "sha256": sha256}


# ------------------------------------------------------------------------------------------------
# Pareto front and Optuna tuning
# ------------------------------------------------------------------------------------------------

def pareto(prof: Profile, base: SearchSettings, points: int = 8, cost=None) -> list[dict]:
    """Sweep the density budget (or the latency budget when one is set) and solve each point."""
    rows = []
    if base.latency_budget is not None:
        ms, n = base.latency_budget
        grid = [ms * f for f in np.linspace(0.4, 1.0, points)]
        make = lambda v: SearchSettings(**{**base.__dict__, "latency_budget": (float(v), n)})  # noqa: E731
    else:
        top = base.density or 1.0
        grid = list(np.linspace(top / 4, top, points))
        make = lambda v: SearchSettings(**{**base.__dict__, "density": float(round(v, 6))})  # noqa: E731
    for v in grid:
        try:
            plan = search(prof, make(v), cost=cost)
        except HeadplanError:
            continue
        row = {"budget": float(round(v, 6)), "expected_loss": plan.budget.expected_loss,
               **{f"density@{n}": d for n, d in zip(plan.budget.lengths, plan.budget.achieved_density)},
               **{f"kv@{n}": k for n, k in zip(plan.budget.lengths, plan.budget.achieved_kv)}}
        if cost is not None:
            for n in plan.budget.lengths:
                row[f"pred_prefill_ms@{n}"] = cost.plan_prefill_ms(plan, n)
        if "validation_loss" in plan.provenance["search"]:
            for n, v2 in plan.provenance["search"]["validation_loss"].items():
                row[f"val_loss@{n}"] = v2
        rows.append(row)
    return rows


def write_pareto(rows: list[dict], csv_path: Path, png_path: Path | None = None) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(csv_path, buf.getvalue())
    if png_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xkey = next((k for k in keys if k.startswith("pred_prefill_ms@")), None) or \
            next(k for k in keys if k.startswith("density@"))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r[xkey] for r in rows], [r["expected_loss"] for r in rows], "o-")
        ax.set_xlabel(xkey)
        ax.set_ylabel("expected profiled loss")
        ax.set_title("Pareto front")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf2 = io.BytesIO()
        fig.savefig(buf2, format="png", dpi=120)
        plt.close(fig)
        atomic_write(png_path, buf2.getvalue())


def tune(prof: Profile, base: SearchSettings, trials: int = 20, storage: str | None = None, seed: int = 0,
         cost=None) -> tuple[Plan, list[dict]]:
    """Optuna over global knobs (max distinct patterns per layer, whether dynamic kinds are allowed),
    two objectives: loss at the searched lengths and, when the profile has longer lengths than the
    searched ones (``validate_lengths``), loss there; returns the best-validated plan."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler, storage=storage,
                                study_name="headplan-search", load_if_exists=storage is not None)
    plans: dict = {}

    def settings_of(t) -> SearchSettings:
        k = t.suggest_int("max_patterns_per_layer", 1, 4)
        dyn = t.suggest_categorical("dynamic", [True, False])
        return SearchSettings(**{**base.__dict__, "max_patterns_per_layer": k,
                                 "exclude_kinds": () if dyn else ("blocksparse", "vslash")})

    def objective(t):
        s = settings_of(t)
        try:
            plan = search(prof, s, cost=cost)
        except HeadplanError:
            return float("inf"), float("inf")
        plans[t.number] = plan
        val = plan.provenance["search"].get("validation_loss")
        vloss = float(np.mean(list(val.values()))) if val else plan.budget.expected_loss
        pred = cost.plan_prefill_ms(plan, base.latency_budget[1]) if (cost and base.latency_budget) else \
            float(np.mean(plan.budget.achieved_density))
        t.set_user_attr("validation_loss", vloss)
        return vloss, pred

    study.optimize(objective, n_trials=trials)
    trials_out = [{"trial": t.number, **t.params, "objectives": t.values} for t in study.trials if t.values]
    best = min((t for t in study.trials if t.values and np.isfinite(t.values[0])),
               key=lambda t: (t.values[0], t.values[1], t.number), default=None)
    if best is None:
        raise HeadplanError("no tuning trial met the budgets")
    plan = plans.get(best.number) or search(prof, settings_of(optuna.trial.FixedTrial(best.params)), cost=cost)
    return plan, trials_out
