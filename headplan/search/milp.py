"""The 0/1 integer program the search solves, through HiGHS (scipy.optimize.milp)."""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import HeadplanError


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
