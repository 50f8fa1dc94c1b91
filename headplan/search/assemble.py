"""Plan assembly: the solver's choice becomes a Plan with its achieved budget and provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..plan import Budget, HeadEntry, Plan
from ..profile import Profile
from .settings import SearchSettings
from .solve import _solve, profile_loss


def search(prof: Profile, settings: SearchSettings, profile_ref: dict | None = None, cost=None) -> Plan:
    choice, lengths, loss, dens, kv = _solve(prof, settings, cost)
    return _plan(prof, settings, choice, lengths, loss, dens, kv, profile_ref, cost)


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
                    achieved_density=ach_d, achieved_kv=ach_k, expected_loss=exp, max_length=settings.max_length)
    plan = Plan(model=m, budget=budget, layers=tuple(layers), block_size=prof.block_size,
                granularity=settings.granularity, provenance=prov)
    if settings.format_windows is not None:
        from .formats import check_expressible

        check_expressible(plan, settings.format_windows)
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

