"""Measurement on the GPU: time the kernels over a grid and fit a cost table (CUDA only)."""

from __future__ import annotations

from ..errors import HeadplanError
from ..plan import DYNAMIC_KINDS, Pattern
from .table import CostTable, fit_prefill, fit_route


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


def _route_samples(lengths, head_dim: int, group: int, hkv: int, adv):
    """Per length: the dense library on a whole layer ("dense": causal, every head), and the overhead of a
    split layer ("route": 2 full + the rest streaming, split time minus its two parts timed on
    pre-gathered inputs)."""
    import torch
    from triton.testing import do_bench

    from ..kernels import patterns as P
    from ..kernels.prefill import sparse_prefill
    from ..runtime import backend

    out = []
    for n in lengths:
        q = torch.randn(1, hkv * group, n, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, n, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        s = head_dim ** -0.5
        ms = do_bench(lambda: backend.dense_causal(q, k, v, s), warmup=5, rep=30)
        out.append({"kind": "dense", "row": {"kind": "full"}, "n": n, "pairs": n * (n + 1) / 2 * hkv * group,
                    "ms": ms})
        adv()
        rows = [{"kind": "full"}] * 2 + [{"kind": "streaming", "sink": 64, "alpha": 2048}] * (hkv - 2)
        table = P.make_table(rows).cuda()
        fq, fk, rq, rk, rest = backend.split_heads(table, group, q.device)
        qf, kf, vf, qr, kr, vr = q[:, fq], k[:, fk], v[:, fk], q[:, rq], k[:, rk], v[:, rk]
        t_split = do_bench(lambda: backend.split_prefill(q, k, v, table, s, 64, sparse_prefill), warmup=5, rep=30)
        t_dense = do_bench(lambda: backend.dense_causal(qf, kf, vf, s), warmup=5, rep=30)
        t_rest = do_bench(lambda: sparse_prefill(qr, kr, vr, rest, s), warmup=5, rep=30)
        out.append({"kind": "route", "row": {"kind": "full"}, "n": n, "heads": hkv, "pairs": 0.0,
                    "ms": t_split - t_dense - t_rest, "split_ms": t_split})
        adv()
        del q, k, v, qf, kf, vf, qr, kr, vr
    return out


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
            k = 2 if kind in DYNAMIC_KINDS else hkv
            ms = _time_layer([row] * k + [{"kind": "skip"}] * (hkv - k), n, head_dim, group, hkv)
            pairs = density(Pattern.from_row(row), n) * n * (n + 1) / 2 * group * k
            samples.append({"kind": kind, "row": row, "n": n, "pairs": pairs, "ms": ms})
            adv()
        for n in lengths:  # the launch cost: a layer of skip heads
            ms = _time_layer([{"kind": "skip"}] * hkv, n, head_dim, group, hkv)
            samples.append({"kind": "skip", "row": {"kind": "skip"}, "n": n, "pairs": 0.0, "ms": ms})
            adv()
    with rep.task("measuring the dense library and the split", 2 * len(lengths)) as adv:
        samples += _route_samples(lengths, head_dim, group, hkv, adv)
    launch_ms, per_pair, dyn, dyn_fixed = fit_prefill(samples)
    dense_launch, dense_pair, route_fixed, route_tok = fit_route(samples)
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
                     dyn_fixed_us=dyn_fixed, dense_launch_us=dense_launch, dense_per_pair_ns=dense_pair,
                     route_fixed_us=route_fixed, route_ns_per_token=route_tok,
                     decode_launch_us=max(float(coef[0]), 0.0) * 1e3, decode_bytes_per_s=bw,
                     samples=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()} for s in samples])

