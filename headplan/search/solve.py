"""The solver: one 0/1 program per search, one small function per constraint family.

Every family builds its rows from coefficient arrays it is handed ((H, C) per head and candidate, or per
length); cost coefficients come from ``costmodel.prefill_coefficients`` / ``kv_coefficients``, never from
a cost table's fields.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .settings import check_budget
from ..candidates import budget_tables, same_as_full
from ..errors import HeadplanError
from ..profile import Profile
from .milp import _Problem
from .settings import SearchSettings, bound_lengths

TIE = 1e-7  # tie-breaker weight (see tie_break)


def tie_break(kinds: list[str], dens: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """(H, C) order among candidates of equal profiled loss: first the exact one (``full``: the model's own
    attention, which a window spanning a sliding layer's is collapsed into), then the one that keeps less KV,
    then the sparser one. A zero loss of a window or a dynamic kind holds only at the lengths profiled."""
    inexact = np.array([k != "full" for k in kinds], dtype=np.float64)
    return 3.0 * inexact[None, :] + kv.mean(axis=2) + dens.mean(axis=2)


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


def _all_x(prob: _Problem) -> list[int]:
    """Every head-choice variable, candidate-major (the order every budget row lists them in)."""
    H, C = prob.H, prob.C
    return [h * C + c for c in range(C) for h in range(H)]


def _per_layer_heads(prob: _Problem, layer: int) -> range:
    return range(layer * prob.hpl, (layer + 1) * prob.hpl)


def share_rows(prob: _Problem, name: str, bound: float | None, table: np.ndarray, allowed: np.ndarray,
               lengths) -> None:
    """Density / KV budget: the mean share over heads <= bound at every length (``table``: (H, C, lengths))."""
    if bound is None:
        return
    check_budget(name, bound, lengths, lambda j: float(np.where(allowed, table[:, :, j], np.inf).min(axis=1).mean()))
    C, H = prob.C, prob.H
    for j, n in enumerate(lengths):
        idx = _all_x(prob)
        prob.le(idx, [table[i // C, i % C, j] / H for i in idx], bound + 1e-9)


def latency_rows(prob: _Problem, ms: float, n: int, per_head: np.ndarray, dyn_ms: np.ndarray, fixed: float,
                 allowed: np.ndarray, kinds: list[str]) -> None:
    """Predicted prefill ms at length n <= ms: ``per_head`` (H, C) marginal ms, ``dyn_ms`` (C,) index building
    of a dynamic candidate, paid once per (layer, dynamic kind) through one binary each; ``fixed`` the
    launches; ``kinds`` the candidates' pattern kinds."""
    C = prob.C
    lo = fixed + float(np.where(allowed, per_head, np.inf).min(axis=1).sum())
    is_full = np.array([k == "full" for k in kinds])
    dense = fixed + float(per_head[:, is_full].max(axis=1, initial=0).sum()) if is_full.any() else lo
    if ms < lo - 1e-9:
        raise HeadplanError(f"latency budget {ms:g} ms at {n} tokens is infeasible: the cheapest plan is "
                            f"predicted at {lo:.3f} ms (feasible range [{lo:.3f}, {dense:.3f}] ms)")
    if ms > dense + 1e-9:
        raise HeadplanError(f"latency budget {ms:g} ms at {n} tokens is above the dense plan's predicted "
                            f"{dense:.3f} ms: nothing to save (feasible range [{lo:.3f}, {dense:.3f}] ms)")
    idx = _all_x(prob)
    coef = [per_head[i // C, i % C] for i in idx]
    # one binary per (layer, dynamic kind): its index building is paid once if any head uses it
    dyn_kinds = sorted({kinds[c] for c in range(C) if dyn_ms[c] > 0})
    extra_idx, extra_coef = [], []
    for kind in dyn_kinds:
        y0 = prob.add_vars(prob.L)
        cs = [c for c in range(C) if kinds[c] == kind]
        kcost = float(max(dyn_ms[c] for c in cs))
        for layer in range(prob.L):
            for h in _per_layer_heads(prob, layer):
                for c in cs:
                    prob.le([h * C + c, y0 + layer], [1.0, -1.0], 0.0)
        extra_idx += list(range(y0, y0 + prob.L))
        extra_coef += [kcost] * prob.L
    # in microseconds, minus a margin, so the solver's feasibility tolerance cannot overshoot the budget
    prob.le(idx + extra_idx, [c * 1e3 for c in coef + extra_coef], (ms - fixed) * 1e3 - 1e-5)


def memory_rows(prob: _Problem, gb: float, b: int, n: int, per: np.ndarray, allowed: np.ndarray) -> None:
    """KV cache at batch b x length n <= gb: ``per`` (H, C) GB of one head's cache at that batch."""
    C = prob.C
    lo = float(np.where(allowed, per, np.inf).min(axis=1).sum())
    if gb < lo - 1e-12:
        raise HeadplanError(f"memory budget {gb:g} GB at batch {b} x {n} is infeasible: the smallest KV cache "
                            f"is {lo:.3f} GB (feasible range [{lo:.3f}, {per.max(axis=1).sum():.3f}] GB)")
    idx = _all_x(prob)
    prob.le(idx, [per[i // C, i % C] * 1e6 for i in idx], gb * 1e6 - 1e-5)  # in KB


def pattern_rows(prob: _Problem, kmax: int) -> None:
    """At most ``kmax`` distinct candidates per layer (one binary per (layer, candidate))."""
    kmax = int(kmax)
    if kmax < 1:
        raise HeadplanError(f"--max-patterns-per-layer must be >= 1, got {kmax}")
    C = prob.C
    z0 = prob.add_vars(prob.L * C)
    for layer in range(prob.L):
        for h in _per_layer_heads(prob, layer):
            for c in range(C):
                prob.le([h * C + c, z0 + layer * C + c], [1.0, -1.0], 0.0)
        prob.le(list(range(z0 + layer * C, z0 + (layer + 1) * C)), [1.0] * C, kmax)


def full_head_rows(prob: _Problem, k: int, full_cols: list[int], heads_per_unit: int = 1) -> None:
    """Exactly ``k`` heads choose one of the candidates ``full_cols`` (the allowed full patterns); each unit of
    the program is ``heads_per_unit`` KV heads (a layer's, at layer granularity)."""
    k, g = int(k), int(heads_per_unit)
    if not 0 <= k <= prob.H * g or (k and not full_cols):
        raise HeadplanError(f"--full-heads {k} is impossible: the model has {prob.H * g} KV heads"
                            + ("" if full_cols else " and the candidates allow no full pattern"))
    if k % g:
        raise HeadplanError(f"--full-heads {k} is impossible at layer granularity: a full layer is {g} KV heads")
    k //= g
    idx = [h * prob.C + c for c in full_cols for h in range(prob.H)]
    prob.le(idx, [1.0] * len(idx), k)
    prob.le(idx, [-1.0] * len(idx), -k)


def keep_row(prob: _Problem, sig: str, slack: float, part: np.ndarray, best: np.ndarray) -> None:
    """epsilon-constraint: the plan's loss on one signal (``part``: (H, C)) within ``slack`` times that
    signal's optimum (``best``: the choice that signal alone makes under the same budgets)."""
    C, H = prob.C, prob.H
    opt = float(part[np.arange(H), best].sum())
    scale = opt if opt > 0 else 1.0
    idx = _all_x(prob)
    prob.le(idx, [part[i // C, i % C] / scale for i in idx], slack * opt / scale + 1e-9)


def full_set_mask(allowed: np.ndarray, heads, is_full: np.ndarray) -> np.ndarray:
    """``allowed`` (H, C) narrowed so that exactly the KV heads ``heads`` (flat: layer * KV heads + head) are
    full and every other head is not."""
    H = allowed.shape[0]
    bad = [h for h in heads if not (isinstance(h, (int, np.integer)) and 0 <= h < H)]
    if bad:
        raise HeadplanError(f"search.full_set: head {bad[0]!r} is not a KV head index in [0, {H})")
    if heads and not is_full.any():
        raise HeadplanError("search.full_set: the candidates have no full pattern")
    pick = np.zeros(H, dtype=bool)
    pick[list(heads)] = True
    out = allowed & np.where(pick[:, None], is_full[None, :], ~is_full[None, :])
    if not out.any(axis=1).all():
        raise HeadplanError("search.full_set: a head has no allowed candidate of its side (full in the set, "
                            "non-full outside it)")
    return out


def _check_slack(sig: str, slack: float) -> None:
    if not (slack >= 1.0 and math.isfinite(slack)):
        raise HeadplanError(f"--keep: the slack of {sig!r} must be >= 1 (a factor on its optimum), got {slack}")


def _units(x: np.ndarray, g: int, how: str = "sum") -> np.ndarray:
    """(H, ...) per KV head -> (H // g, ...) per unit of ``g`` consecutive heads (a layer's at layer
    granularity): losses and costs add up, shares average; ``g`` 1 returns ``x`` itself."""
    if g == 1:
        return x
    y = x.reshape((x.shape[0] // g, g) + x.shape[1:])
    return y.sum(axis=1) if how == "sum" else y.mean(axis=1) if how == "mean" else y.all(axis=1)


def _allowed(prof: Profile, settings: SearchSettings, kinds):
    """What the program may choose: (allowed (H, C) per KV head, units (U, C) per unit of the program, KV heads per
    unit g, the export format's keys per layer or None), refused where a unit has no allowed candidate."""
    from .settings import check_granularity

    m = prof.model
    allowed = np.array([k not in settings.exclude_kinds for k in kinds])
    if not allowed.any():
        raise HeadplanError("every candidate kind is excluded")
    allowed = np.repeat(_collapsed(prof, allowed), m.num_kv_heads, axis=0)  # (H, C)
    if settings.full_set is not None:
        allowed = full_set_mask(allowed, settings.full_set, np.array([k == "full" for k in kinds]))
    gran, fmt = check_granularity(settings.granularity, settings.format_windows)
    g = m.num_kv_heads if gran == "layer" else 1  # KV heads per unit of the program
    keys = None
    if fmt is not None:
        from .formats import format_keys

        keys = format_keys(m, prof.candidates, fmt)  # (layers, C)
        ok = np.repeat(np.array([[k is not None for k in row] for row in keys]), m.num_kv_heads, axis=0)
        if not (allowed & ok).any():
            raise HeadplanError(f"--format-windows {fmt}: no allowed candidate is expressible in that format")
        allowed = allowed & ok
    units = _units(allowed, g, "all")  # (U, C): a layer may take a candidate when every head of it may
    bad = np.flatnonzero(~units.any(axis=1))
    if bad.size:  # a format that states nothing allowed there, or a full set that splits a layer
        u = int(bad[0])
        where = f"layer {u * g // m.num_kv_heads}" + (f" kv_head {u % m.num_kv_heads}" if g == 1 else "")
        raise HeadplanError(f"{where} has no allowed candidate" + (" shared by all its KV heads" if g > 1 else "")
                            + (f" that {fmt} can express" if fmt is not None else ""))
    return allowed, units, g, keys


def _resource_rows(prob, settings: SearchSettings, cost, prof: Profile, g: int, units, kinds) -> None:
    """The rows of the latency, memory, patterns-per-layer and full-heads constraints."""
    from ..costmodel.table import check_fits, kv_coefficients, prefill_coefficients

    m, C = prof.model, len(prof.candidates)
    if settings.latency_budget is not None or settings.memory_budget is not None:
        if cost is None:
            raise HeadplanError("latency and memory budgets need a cost table (--cost-table, or 'analytic')")
        check_fits(cost, m.head_dim, m.num_query_heads // m.num_kv_heads)
    if settings.latency_budget is not None:
        ms, n = settings.latency_budget
        per_layer, dyn_ms, fixed = prefill_coefficients(cost, prof.candidates, n, prof.block_size, m)
        latency_rows(prob, ms, n, _units(np.repeat(per_layer, m.num_kv_heads, axis=0), g), dyn_ms, fixed, units,
                     kinds)
    if settings.memory_budget is not None:
        gb, b, n = settings.memory_budget
        per = np.repeat(kv_coefficients(cost, prof.candidates, n, m) * b / 1e9, m.num_kv_heads, axis=0)
        memory_rows(prob, gb, b, n, _units(per, g), units)
    if settings.max_patterns_per_layer is not None:
        pattern_rows(prob, settings.max_patterns_per_layer)
    if settings.full_heads is not None:
        full_head_rows(prob, settings.full_heads, [c for c in range(C) if kinds[c] == "full" and units[:, c].any()],
                       g)


def _solve(prof: Profile, settings: SearchSettings, cost=None):
    """The program over units, then the choice per KV head: at ``kv_head`` granularity a unit is a KV head; at
    ``layer`` granularity a layer, whose loss and costs are the sums over its KV heads and whose shares their
    mean (so every budget row means what it means per head), its choice given to every head of the layer."""
    lengths = tuple(settings.lengths) if settings.lengths else prof.lengths
    for n in tuple(lengths) + tuple(settings.validate_lengths):
        if n not in prof.lengths:
            raise HeadplanError(f"profile has no length {n} (profiled: {', '.join(map(str, prof.lengths))})")
    li = [prof.lengths.index(n) for n in lengths]
    m = prof.model
    H = m.num_layers * m.num_kv_heads
    C = len(prof.candidates)
    kinds = [c.pattern.kind for c in prof.candidates]
    loss = profile_loss(prof, settings.signals).numpy()[..., li].reshape(H, C, len(li))
    # (H, C, lengths): each head's shares against the model's own attention and cache (its layer's window)
    if settings.max_length is not None and not 1 <= settings.max_length <= m.max_positions:
        raise HeadplanError(f"--max-length {settings.max_length} is outside the model's 1..{m.max_positions} positions")
    bind = bound_lengths(lengths, settings.max_length)
    dens, kv = (np.repeat(t, m.num_kv_heads, axis=0) for t in budget_tables(prof.candidates, bind,
                                                                              prof.block_size, m))
    allowed, units, g, keys = _allowed(prof, settings, kinds)
    obj = loss.mean(axis=2) + TIE * tie_break(kinds, dens, kv)
    obj = np.where(allowed, obj, 1e6)  # excluded candidates are never worth it
    obj = np.where(units, _units(obj, g), 1e6 * g)  # a layer's: the sum over its KV heads
    obj = np.round(obj, 12).reshape(-1)
    U = H // g
    prob = _Problem(obj, U, C, m.num_kv_heads // g)

    share_rows(prob, "density", settings.density, _units(dens, g, "mean"), units, bind)
    share_rows(prob, "kv_budget", settings.kv_budget, _units(kv, g, "mean"), units, bind)
    if keys is not None:
        from .formats import shape_rows

        shape_rows(prob, lambda u: keys[u * g // m.num_kv_heads])
        for i in np.flatnonzero(~units.reshape(-1)):  # what the format cannot state is never chosen, at any cost
            prob.le([int(i)], [1.0], 0.0)
    _resource_rows(prob, settings, cost, prof, g, units, kinds)
    for sig, slack in settings.keep:
        # first the best this signal alone can do under the same budgets, then keep the plan near it
        _check_slack(sig, slack)
        alone = dataclasses.replace(settings, signals=((sig, 1.0),), keep=())
        best, *_ = _solve(prof, alone, cost)
        part = profile_loss(prof, ((sig, 1.0),)).numpy()[..., li].reshape(H, C, len(li)).mean(axis=2)
        keep_row(prob, sig, slack, _units(part, g), best[::g])
    choice = np.repeat(prob.solve(), g)  # a layer's choice for each of its KV heads
    return choice, bind, loss, dens, kv

