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
