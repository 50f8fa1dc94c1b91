"""Hardware cost model: what a plan costs on a GPU, measured once per device.

A cost table (YAML) holds rates fitted from kernel timings on the target GPU:

- prefill, one layer call of ``kernels.prefill.sparse_prefill`` at length N:
  ``t = launch + sum_heads per_pair[kind] * pairs(head, N) * G + [any dynamic head] * dyn_per_token * N``
  (all heads of a layer share one launch, so the fixed cost is paid once per layer);
- decode, one step of ``kernels.decode.sparse_decode``: ``t = launch + bytes_read / bandwidth``;
- KV bytes: exact from the plan (no measurement needed).

``analytic()`` gives a table from nominal rates (no GPU): FLOPs at a sustained TFLOP/s and bytes at a
sustained TB/s. ``measure()`` runs the kernels over a grid (pattern × parameters × length) on the GPU
that is present and fits the rates; ``validate()`` compares predictions with measurements on random
plans.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import HeadplanError
from ..plan import Pattern, Plan, atomic_write, load_yaml, read_input

KINDS = ("full", "streaming", "strided", "blocksparse", "vslash", "skip")
DYNAMIC = ("blocksparse", "vslash")
SCHEMA = 1


@dataclass(frozen=True)
class CostTable:
    device: dict
    head_dim: int
    group: int
    dtype: str
    prefill_launch_us: float
    per_pair_ns: dict  # kind -> ns per (query, key) pair per query head
    dyn_ns_per_token: dict  # dynamic kind -> ns per token per layer call (index building)
    decode_launch_us: float
    decode_bytes_per_s: float
    samples: list = field(default_factory=list, compare=False)
    source: str = "measured"
    dyn_fixed_us: dict = field(default_factory=dict)  # dynamic kind -> fixed us per layer call

    # -- predictions ----------------------------------------------------------------------------
    def head_prefill_ms(self, p: Pattern, n: int, block: int = 64, lwin: int = 0) -> float:
        """Marginal prefill time of one KV head (its G query heads) at length n, in ms, in a layer whose
        own sliding window is ``lwin`` (0 = global): only the pairs the layer itself attends to count."""
        from ..candidates import density

        pairs = density(p, n, block, lwin) * n * (n + 1) / 2
        return self.per_pair_ns.get(p.kind, self.per_pair_ns["full"]) * pairs * self.group * 1e-6

    def layer_prefill_ms(self, patterns: list[Pattern], n: int, block: int = 64, lwin: int = 0) -> float:
        t = self.prefill_launch_us * 1e-3 + sum(self.head_prefill_ms(p, n, block, lwin) for p in patterns)
        for k in {p.kind for p in patterns if p.kind in DYNAMIC}:  # index building, once per kind per layer
            t += self.dyn_ns_per_token.get(k, 0.0) * n * 1e-6 + self.dyn_fixed_us.get(k, 0.0) * 1e-3
        return t

    def plan_prefill_ms(self, plan: Plan, n: int) -> float:
        return sum(self.layer_prefill_ms([e.pattern for e in layer], n, plan.block_size, plan.model.window(li))
                   for li, layer in enumerate(plan.layers))

    def head_kv_bytes(self, p: Pattern, n: int, dtype_bytes: int = 2, lwin: int = 0) -> float:
        from ..candidates import kv_share

        return kv_share(p, n, lwin) * n * 2 * self.head_dim * dtype_bytes

    def plan_decode_ms(self, plan: Plan, n: int, batch: int = 1) -> float:
        per_layer = [sum(self.head_kv_bytes(e.pattern, n, lwin=plan.model.window(li)) for e in layer) * batch
                     for li, layer in enumerate(plan.layers)]
        return sum(self.decode_launch_us * 1e-3 + b / self.decode_bytes_per_s * 1e3 for b in per_layer)

    # -- io ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        import json

        d = {"schema_version": SCHEMA, **dataclasses.asdict(self)}
        return json.loads(json.dumps(d, default=str))  # plain types only (torch versions are str subclasses)

    def save(self, path) -> None:
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))


def load_cost_table(path) -> CostTable:
    p = Path(path)
    d = load_yaml(read_input(p, "cost table", HeadplanError), str(p), HeadplanError)
    if not isinstance(d, dict) or d.get("schema_version") != SCHEMA:
        raise HeadplanError(f"{p}.schema_version: expected {SCHEMA}")
    _check_table(d, str(p))
    return CostTable(**{k: v for k, v in d.items() if k != "schema_version"})


_TYPES = {"dict": dict, "int": int, "float": (int, float), "str": str, "list": list}


def _check_table(d: dict, where: str) -> None:
    """Every field of a cost table has its type (rates: finite numbers >= 0 per known pattern kind);
    errors name the field, never a value or a key the file made up."""
    fields = {f.name: f for f in dataclasses.fields(CostTable)}
    extra = [k for k in d if k != "schema_version" and k not in fields]
    if extra:
        raise HeadplanError(f"{where}: not a cost table ({len(extra)} unknown field(s))")
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise HeadplanError(f"{where}.{name}: missing field")
            continue
        v = d[name]
        if isinstance(v, bool) or not isinstance(v, _TYPES[str(f.type).split()[0]]) or \
                (isinstance(v, float) and not math.isfinite(v)):
            raise HeadplanError(f"{where}.{name}: expected {str(f.type).split()[0]}, got {type(v).__name__}")
        if name in ("per_pair_ns", "dyn_ns_per_token", "dyn_fixed_us"):
            for k, x in v.items():
                if k not in KINDS:
                    raise HeadplanError(f"{where}.{name}: unknown pattern kind")
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise HeadplanError(f"{where}.{name}.{k}: expected a finite number >= 0")
    if "full" not in d["per_pair_ns"]:
        raise HeadplanError(f"{where}.per_pair_ns.full: missing field")


def check_fits(table: CostTable, head_dim: int, group: int) -> None:
    if table.head_dim != head_dim:
        raise HeadplanError(f"cost table was measured for head_dim {table.head_dim}, the model has {head_dim}; "
                            "measure one for this shape (headplan costmodel measure --head-dim ...)")
    if table.group != group:
        raise HeadplanError(f"cost table was measured for GQA group {table.group}, the model has {group}")


def analytic(head_dim: int, group: int, tflops: float = 350.0, tbps: float = 2.8, dtype: str = "bfloat16",
             gpu: str = "nominal H100") -> CostTable:
    """Nominal rates: 4·D FLOPs per pair at ``tflops``; decode reads at ``tbps``."""
    ns = 4 * head_dim / (tflops * 1e12) * 1e9
    per = {k: ns for k in KINDS}
    per["skip"] = 0.0
    return CostTable(device={"name": gpu}, head_dim=head_dim, group=group, dtype=dtype, prefill_launch_us=20.0,
                     per_pair_ns=per, dyn_ns_per_token={"blocksparse": 60.0, "vslash": 120.0},
                     decode_launch_us=18.0, decode_bytes_per_s=tbps * 1e12, source="analytic")


# ------------------------------------------------------------------------------------------------
# measurement on the GPU
# ------------------------------------------------------------------------------------------------

def _grid(lengths):
    rows = []
    for n in lengths:
        rows.append(("full", {"kind": "full"}, n))
        for w in (256, 2048):
            rows.append(("streaming", {"kind": "streaming", "sink": 64, "alpha": w}, n))
        rows.append(("streaming", {"kind": "streaming", "sink": 64, "alpha": 128, "beta": 0.125}, n))
        rows.append(("strided", {"kind": "strided", "sink": 64, "alpha": 512, "stride": 8, "offset": 0}, n))
        for k in (4, 16):
            rows.append(("blocksparse", {"kind": "blocksparse", "topk": k}, n))
        rows.append(("vslash", {"kind": "vslash", "vertical": 256, "slash": 512}, n))
    return rows


def _device_info():
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        driver = "unknown"
    return {"name": props.name, "sms": props.multi_processor_count, "driver": driver,
            "torch": torch.__version__, "triton": triton.__version__}


def _time_layer(rows: list[dict], n: int, head_dim: int, group: int, hkv: int = 8):
    import torch
    from triton.testing import do_bench

    from ..kernels import patterns as P
    from ..kernels.prefill import sparse_prefill

    q = torch.randn(1, hkv * group, n, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = P.make_table(rows).cuda()
    return do_bench(lambda: sparse_prefill(q, k, v, table, head_dim ** -0.5), warmup=5, rep=30)


def measure(head_dim: int = 128, group: int = 4, lengths=(4096, 16384, 32768), reporter=None) -> CostTable:
    """Time the kernels over the grid and fit the rates (needs CUDA)."""
    import numpy as np
    import torch

    from ..candidates import density
    from ..kernels.decode import sparse_decode
    from ..progress import Reporter

    if not torch.cuda.is_available():
        raise HeadplanError("costmodel measure needs a CUDA GPU (use the analytic model without one)")
    rep = reporter or Reporter()
    hkv = 8
    grid = _grid(lengths)
    samples = []
    with rep.task("measuring prefill", len(grid) + 2 * len(lengths)) as adv:
        for kind, row, n in grid:
            # dynamic kinds: their marginal cost inside a mixed layer (2 such heads, the rest skip),
            # which is how plans use them; static kinds: a homogeneous layer
            k = 2 if kind in DYNAMIC else hkv
            ms = _time_layer([row] * k + [{"kind": "skip"}] * (hkv - k), n, head_dim, group, hkv)
            pairs = density(Pattern.from_row(row), n) * n * (n + 1) / 2 * group * k
            samples.append({"kind": kind, "row": row, "n": n, "pairs": pairs, "ms": ms})
            adv()
        for n in lengths:  # the launch cost: a layer of skip heads
            ms = _time_layer([{"kind": "skip"}] * hkv, n, head_dim, group, hkv)
            samples.append({"kind": "skip", "row": {"kind": "skip"}, "n": n, "pairs": 0.0, "ms": ms})
            adv()
    launch_ms, per_pair, dyn, dyn_fixed = fit_prefill(samples)
    # decode: all-full caches at two sizes give bandwidth and launch cost
    from ..kernels import patterns as P
    from triton.testing import do_bench

    pts = []
    for n, b in ((8192, 8), (32768, 8), (32768, 1)):
        kb = torch.randn(b, hkv * n, head_dim, device="cuda", dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        sp = torch.arange(n, device="cuda", dtype=torch.int32).repeat(hkv).expand(b, -1).contiguous()
        off = torch.arange(hkv, device="cuda", dtype=torch.int32) * n
        cap = torch.full((hkv,), n, device="cuda", dtype=torch.int32)
        qd = torch.randn(b, hkv * group, head_dim, device="cuda", dtype=torch.bfloat16)
        qpos = torch.full((b,), n - 1, device="cuda", dtype=torch.int64)
        tab = P.make_table([{"kind": "full"}] * hkv).cuda()
        ms = do_bench(lambda: sparse_decode(qd, kb, vb, sp, off, cap, qpos, tab, 0.1, max_cap=n), warmup=5, rep=30)
        pts.append((2.0 * b * hkv * n * head_dim * 2, ms))
        del kb, vb
    X = np.array([[1.0, p[0]] for p in pts])
    coef, *_ = np.linalg.lstsq(X, np.array([p[1] for p in pts]), rcond=None)
    bw = 1.0 / max(float(coef[1]) * 1e-3, 1e-15)
    return CostTable(device=_device_info(), head_dim=head_dim, group=group, dtype="bfloat16",
                     prefill_launch_us=launch_ms * 1e3, per_pair_ns=per_pair, dyn_ns_per_token=dyn,
                     dyn_fixed_us=dyn_fixed,
                     decode_launch_us=max(float(coef[0]), 0.0) * 1e3, decode_bytes_per_s=bw,
                     samples=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()} for s in samples])


def fit_prefill(samples: list[dict]):
    """Least-squares rates from timing samples: launch (ms), per-pair ns per kind, and for dynamic
    kinds the index-building cost as fixed us + ns per token."""
    import numpy as np

    launch_ms = float(np.median([s["ms"] for s in samples if s["kind"] == "skip"]))
    per_pair, dyn, dyn_fixed = {"skip": 0.0}, {}, {}
    for kind in [k for k in KINDS[:-1] if k not in DYNAMIC] + list(DYNAMIC):
        ss = [s for s in samples if s["kind"] == kind]
        if not ss:
            continue
        y = np.array([s["ms"] - launch_ms for s in ss])
        pairs = np.array([s["pairs"] for s in ss])
        if kind in DYNAMIC:
            # visible pairs run the same flash loop as full heads; the rest is index building and
            # masked tiles, fitted as a + b·N (non-negative) on what the pairs do not explain
            per_pair[kind] = per_pair.get("full", 1e-6)
            r = y - pairs * per_pair[kind] * 1e-6
            X = np.array([[s["n"], 1.0] for s in ss])
            coef, *_ = np.linalg.lstsq(X, r, rcond=None)
            b, a = float(coef[0]), float(coef[1])
            if a < 0:
                b, a = max(float((r * X[:, 0]).sum() / (X[:, 0] ** 2).sum()), 0.0), 0.0
            elif b < 0:
                b, a = 0.0, max(float(r.mean()), 0.0)
            dyn[kind] = b * 1e6
            dyn_fixed[kind] = a * 1e3
        else:
            per_pair[kind] = max(float((y * pairs).sum() / (pairs ** 2).sum()) * 1e6, 1e-6)
    return launch_ms, per_pair, dyn, dyn_fixed


def refit(table: "CostTable") -> "CostTable":
    """Re-fit a table's rates from its stored samples (after a change of the fitting rule)."""
    launch_ms, per_pair, dyn, dyn_fixed = fit_prefill(table.samples)
    return dataclasses.replace(table, prefill_launch_us=launch_ms * 1e3, per_pair_ns=per_pair,
                               dyn_ns_per_token=dyn, dyn_fixed_us=dyn_fixed)


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
        pred = table.layer_prefill_ms([Pattern.from_row(r) for r in rows], n)
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
