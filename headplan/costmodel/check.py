"""Checking a cost table: predicted vs measured prefill latency of random one-layer plans."""

from __future__ import annotations

import math
import random

from ..errors import HeadplanError
from ..plan import Pattern
from .measure import _time_layer
from .table import CostTable


def random_layer(rng: random.Random, hkv: int = 8) -> list[dict]:
    rows = []
    for _ in range(hkv):
        k = rng.choice(["full", "streaming", "streaming", "strided", "blocksparse", "vslash", "skip"])
        if k == "streaming":
            rows.append({"kind": k, "sink": rng.choice([16, 64, 128]), "alpha": rng.choice([128, 512, 2048, 4096]),
                         "beta": rng.choice([0.0, 0.0625, 0.125])})
        elif k == "strided":
            rows.append({"kind": k, "sink": 64, "alpha": rng.choice([256, 1024]), "stride": rng.choice([4, 8, 16]),
                         "offset": 0})
        elif k == "blocksparse":
            rows.append({"kind": k, "topk": rng.choice([2, 8, 24])})
        elif k == "vslash":
            rows.append({"kind": k, "vertical": rng.choice([128, 512]), "slash": rng.choice([256, 1024])})
        else:
            rows.append({"kind": k})
    return rows


def validate(table: CostTable, n_plans: int = 20, lengths=(8192, 16384, 32768), seed: int = 0,
             measured: list[float] | None = None) -> list[dict]:
    """Predicted vs measured prefill latency of random one-layer plans (8 KV heads).

    ``measured``: timings from an earlier run of the same seeded plans (re-predicts without a GPU)."""
    if measured is None:
        import torch

        if not torch.cuda.is_available():
            raise HeadplanError("costmodel validate needs a CUDA GPU (it times the kernels)")
    rng = random.Random(seed)
    out = []
    for i in range(n_plans):
        rows = random_layer(rng)
        n = rng.choice(lengths)
        ms = measured[i] if measured is not None else _time_layer(rows, n, table.head_dim, table.group)
        pred = table.sparse_layer_ms([Pattern.from_row(r) for r in rows], n)  # what _time_layer times
        out.append({"plan": i, "n": n, "kinds": [r["kind"] for r in rows], "measured_ms": ms, "predicted_ms": pred,
                    "rel_error": (pred - ms) / ms})
    return out


def summary(rows: list[dict]) -> dict:
    def one(rs):
        errs = sorted(abs(r["rel_error"]) for r in rs)
        return {"plans": len(rs), "median_abs_rel_error": errs[len(errs) // 2] if errs else math.nan,
                "max_abs_rel_error": errs[-1] if errs else math.nan, "within_15pct": sum(e <= 0.15 for e in errs)}

    return {"all": one(rows), "without_vslash": one([r for r in rows if "vslash" not in r["kinds"]]),
            "with_vslash": one([r for r in rows if "vslash" in r["kinds"]])}
