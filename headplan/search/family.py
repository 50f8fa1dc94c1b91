"""The family of candidate plans and the choice rule of measured selection (MoA's last step: choose by a measured validation loss, not by
the profile's first-order estimate).

The profile scores each head alone, with every other head dense; the sum of those losses predicts
badly how much *perplexity* a whole plan costs once every head is sparse at once (on SmolLM2 the plan
with the lowest profiled lm loss had a worse perplexity than uniform windows). So a small family of plans
is searched from the same profile at the same budget, each is run on held-out validation samples, and
the rule picks:

    among the plans whose language-model loss (NLL per token on the second half of plain-text samples)
    is within ``tolerance`` (relative perplexity) of the best plan's, the one with the lowest answer NLL
    (teacher-forced reference answers of passkey / needle / key->value samples); then a plan that answers
    better still replaces it when the lm loss it adds is less than ``log1p(tolerance)`` times the answer
    NLL it saves: one nat of answer NLL per answer token is worth ``tolerance`` of relative perplexity, so
    a plan that recovers retrieval at a small perplexity cost wins (on a Gemma-shaped model one round cut
    the passkey answer NLL from 5.26 to 0.92 nats at +2.7% perplexity, which the tolerance alone rejected).

The family (``family``): ``search`` (the plain search, every kind), ``windows`` (sink + window only: the
MoA-style plan, the same as the ``moa`` baseline), and ``fullK`` (exactly K full heads, the rest windows:
DuoAttention's few retrieval heads, each K a point between the two). Validation samples come from their
own seeded mixture (``calibration_data/select.yaml``), apart from profiling's and eval's.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import HeadplanError
from ..plan import KINDS, Plan

FULL_STEPS = (1, 2, 3, 4, 6, 8, 12, 16)


def family(base, steps=FULL_STEPS) -> dict:
    """name -> SearchSettings: the candidate plans' settings, all at ``base``'s budget and signals."""
    not_windows = tuple(k for k in KINDS if k not in ("full", "streaming"))  # fullK: full heads, the rest windows
    out = {"search": base,
           "windows": dataclasses.replace(base, exclude_kinds=tuple(k for k in KINDS if k != "streaming"))}
    for k in steps:
        out[f"full{k}"] = dataclasses.replace(base, exclude_kinds=not_windows, full_heads=k)
    return out


def build_family(prof, base, profile_ref=None, steps=FULL_STEPS) -> dict[str, Plan]:
    """The family's plans; a member the budget cannot hold (too many full heads) is left out."""
    from .assemble import search

    plans = {}
    for name, st in family(base, steps).items():
        try:
            plans[name] = search(prof, st, profile_ref)
        except HeadplanError:
            continue
    if not plans:
        raise HeadplanError("no candidate plan meets the budget")
    return plans


def check_tolerance(tolerance: float) -> None:
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise HeadplanError(f"--tolerance must be a non-negative number, got {tolerance}")


def choose(table: dict, tolerance: float) -> str:
    """The rule (module doc): lowest answer NLL among plans within ``tolerance`` of the best lm loss, unless a
    better answerer's extra lm loss is under ``log1p(tolerance)`` times the answer NLL it saves."""
    check_tolerance(tolerance)
    cands = {m: v for m, v in table.items() if m != "dense"}
    best = min(v["lm_nll"] for v in cands.values())
    w = math.log1p(tolerance)
    ok = [m for m, v in cands.items() if v["lm_nll"] <= best + w + 1e-12]
    pick = min(ok, key=lambda m: (cands[m]["answer_nll"], cands[m]["lm_nll"], m))
    score = lambda m: cands[m]["lm_nll"] + w * cands[m]["answer_nll"]  # noqa: E731
    better = [m for m in cands if cands[m]["answer_nll"] < cands[pick]["answer_nll"] and score(m) < score(pick) - 1e-12]
    return min(better, key=lambda m: (score(m), m)) if better else pick


# Budget at quality: the budgets tried, cheapest first (density; the search's own budget)
QUALITY_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def meets(row: dict, dense: dict, max_ppl_increase: float, max_answer_nll_increase: float | None) -> bool:
    """A measured plan meets the quality constraint: validation perplexity at most ``1 + max_ppl_increase``
    times dense's and (if given) answer NLL at most dense's + ``max_answer_nll_increase`` nats."""
    ok = row["ppl_vs_dense"] <= 1.0 + max_ppl_increase + 1e-12
    if max_answer_nll_increase is not None:
        ok = ok and row["answer_nll"] <= dense["answer_nll"] + max_answer_nll_increase + 1e-12
    return ok


def cheapest(grid, passes) -> int | None:
    """The first index of ``grid`` at which ``passes(i)`` holds, by bisection (quality assumed to grow with
    the budget); None if not even the last budget passes."""
    lo, hi = -1, len(grid) - 1
    if not passes(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def budget_at_quality(prof, ref, settings_at, measure, max_ppl_increase: float,
                      max_answer_nll_increase: float | None, tolerance: float, baselines=(), refined_at=None):
    """Budget at quality: the cheapest budget g of QUALITY_GRID (by bisection) at which a member of the family
    at ``settings_at(g)`` (plus ``refined_at(g)``, plan in the loop, when given and g < 1) meets the constraint
    as ``measure`` finds it, that member (by ``choose`` among those that meet it), and the budget each of
    ``baselines`` needs to meet the same constraint. ``measure(plans)`` returns the validation table
    ``{name: row, "dense": row}``: the caller's measurement, so the search needs no evaluation code.
    Returns (plan, {"headplan" | baseline: {"density", "kv_share", "measured"}})."""
    from .assemble import search
    from .baselines import build_baselines

    seen: dict = {}

    def template_at(i):
        """The plain search at grid budget i (what a baseline takes its budget from), not measured."""
        try:
            return {"search": search(prof, settings_at(QUALITY_GRID[i]), ref)}
        except HeadplanError:
            return {}

    def family_at(i):
        if i not in seen:
            g = QUALITY_GRID[i]
            try:
                plans = build_family(prof, settings_at(g), ref)
            except HeadplanError:
                plans = {}
            if refined_at is not None and plans and g < 1.0:
                plans["refined"] = refined_at(g)
            seen[i] = (plans, measure(plans) if plans else {})
        return seen[i]

    def ok_rows(table):
        return {m: r for m, r in table.items()
                if m != "dense" and meets(r, table["dense"], max_ppl_increase, max_answer_nll_increase)}

    i = cheapest(QUALITY_GRID, lambda j: bool(ok_rows(family_at(j)[1])))
    if i is None:
        raise HeadplanError(f"no plan meets the constraint even at density {QUALITY_GRID[-1]}")
    plans, table = family_at(i)
    pick = choose({"dense": table["dense"], **ok_rows(table)}, tolerance)
    plan = plans[pick]
    n = max(plan.budget.lengths)
    budgets = {"headplan": {"density": QUALITY_GRID[i], "kv_share": plan.budget.achieved_kv[-1], "length": n,
                            "member": pick, "measured": {k: round(v, 6) for k, v in table[pick].items()}}}
    for name in baselines:  # the budget each baseline needs for the same constraint (same grid, same samples)
        bl = {}

        def passes(j, name=name, bl=bl):
            plans_j = seen[j][0] if j in seen else template_at(j)
            if not plans_j:
                return False
            b = build_baselines(prof, next(iter(plans_j.values())), [name])[name]
            row = measure({name: b})
            bl[j] = (b, row[name])
            return meets(row[name], row["dense"], max_ppl_increase, max_answer_nll_increase)

        j = cheapest(QUALITY_GRID, passes)
        budgets[name] = ({"density": None, "kv_share": None, "measured": None} if j is None else
                         {"density": QUALITY_GRID[j], "kv_share": bl[j][0].budget.achieved_kv[-1], "length": n,
                          "measured": {k: round(v, 6) for k, v in bl[j][1].items()}})
    return plan, budgets
