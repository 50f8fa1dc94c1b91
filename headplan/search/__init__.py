"""Search: choose one candidate per KV head to lose the least, under budgets at every length.

A multiple-choice knapsack with one budget row per profiled length (density and/or KV share),
solved exactly as a 0/1 integer program with HiGHS (scipy.optimize.milp; no licensed solver).
Deterministic: the same profile and settings give the same plan, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import HeadplanError
from ..plan import Budget, HeadEntry, Plan
from ..profile import Profile

TIE = 1e-7  # tie-breaker weight: between equal losses prefer the cheaper candidate


@dataclass(frozen=True)
class SearchSettings:
    density: float | None = None
    kv_budget: float | None = None
    lengths: tuple[int, ...] | None = None  # default: all profiled lengths

    def to_dict(self) -> dict:
        return {"density": self.density, "kv_budget": self.kv_budget,
                "lengths": list(self.lengths) if self.lengths else None}


def _solve(obj: np.ndarray, rows: list[tuple[np.ndarray, float, str]], H: int, C: int) -> np.ndarray:
    """obj (H*C,), rows: (coef over candidates (C,), bound on the mean over heads, name)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, kron

    n = H * C
    eq = kron(csr_array(np.eye(H)), csr_array(np.ones((1, C))))
    cons = [LinearConstraint(eq, np.ones(H), np.ones(H))]
    if rows:
        A = np.stack([np.tile(coef, H) for coef, _, _ in rows])
        ub = np.array([bound * H for _, bound, _ in rows]) + 1e-9
        cons.append(LinearConstraint(csr_array(A), -np.inf, ub))
    res = milp(obj, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"disp": False, "presolve": True, "mip_rel_gap": 0.0})
    if res.x is None:
        raise HeadplanError(f"search failed: {res.message}")
    return np.asarray(res.x).reshape(H, C).argmax(axis=1)


def search(prof: Profile, settings: SearchSettings, profile_ref: dict | None = None) -> Plan:
    lengths = tuple(settings.lengths) if settings.lengths else prof.lengths
    for n in lengths:
        if n not in prof.lengths:
            raise HeadplanError(f"profile has no length {n} (profiled: {', '.join(map(str, prof.lengths))})")
    li = [prof.lengths.index(n) for n in lengths]
    m = prof.model
    H = m.num_layers * m.num_kv_heads
    C = len(prof.candidates)
    loss = prof.loss.double().numpy()[..., li].reshape(H, C, len(li))
    dens = prof.density.numpy()[:, li]
    kv = prof.kv.numpy()[:, li]
    rows = []
    for name, bound, table in (("density", settings.density, dens), ("kv_budget", settings.kv_budget, kv)):
        if bound is None:
            continue
        if not 0.0 < bound <= 1.0:
            raise HeadplanError(f"--{name.replace('_', '-')} must be in (0, 1], got {bound}")
        for j, n in enumerate(lengths):
            lo = float(table[:, j].min())
            if lo > bound + 1e-12:
                raise HeadplanError(
                    f"{name} {bound:g} is infeasible at length {n}: the cheapest candidates give {lo:.4f} "
                    f"(feasible range [{lo:.4f}, 1])")
            rows.append((table[:, j], bound, f"{name}@{n}"))
    obj = loss.mean(axis=2) + TIE * dens.mean(axis=1)[None, :]
    obj = np.round(obj, 12).reshape(-1)
    choice = _solve(obj, rows, H, C)
    layers = []
    for layer in range(m.num_layers):
        heads = []
        for h in range(m.num_kv_heads):
            c = prof.candidates[int(choice[layer * m.num_kv_heads + h])]
            heads.append(HeadEntry(h, c.pattern, c.name))
        layers.append(tuple(heads))
    ach_d = tuple(float(dens[choice, j].mean()) for j in range(len(lengths)))
    ach_k = tuple(float(kv[choice, j].mean()) for j in range(len(lengths)))
    exp = float(loss[np.arange(H), choice].mean())
    import scipy

    prov = {
        "profile": profile_ref or {"sha256": prof.sha256},
        "model_spec": prof.model_spec,
        "method": prof.method,
        "data": prof.data,
        "search": {"solver": "milp-highs", "objective": "mean profiled loss over lengths", **settings.to_dict(),
                   "candidates": [c.name for c in prof.candidates]},
        "versions": {"headplan": __version__, "scipy": scipy.__version__},
    }
    budget = Budget(density=settings.density, kv_budget=settings.kv_budget, lengths=lengths,
                    achieved_density=ach_d, achieved_kv=ach_k, expected_loss=exp)
    return Plan(model=m, budget=budget, layers=tuple(layers), block_size=prof.block_size, provenance=prov)


def profile_ref(profile_path: str | Path, plan_path: str | Path, sha256: str) -> dict:
    """How a plan refers to its profile: a path relative to the plan's folder, and the file's hash."""
    import os

    pp, pl = Path(profile_path).resolve(), Path(plan_path).resolve()
    rel = os.path.relpath(pp, pl.parent)
    return {"path": rel, "sha256": sha256}
