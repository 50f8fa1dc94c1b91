"""Time the VSLASH selection (kernels.dynamic_index.vslash_select) with fused Triton scores against
the torch scores (HEADPLAN_VSLASH_FUSED=0), one GPU command:

    python benchmarks/bench_vslash.py --n 32768 --json out.json

Batch 1, 32 query / 8 KV heads, head_dim 128, bf16; all 8 heads, verts n//64, slashes n//32.
Reports the median time of each path (triton.testing.do_bench), the max relative difference of the
column / diagonal scores, and the overlap of the selections (|fused & torch| / |torch|).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

try:
    from headplan.kernels import dynamic_index as DI
    from headplan.kernels import vslash_scores as VS
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from kernels import dynamic_index as DI  # type: ignore
    from kernels import vslash_scores as VS  # type: ignore

HQ, HKV, D = 32, 8, 128


def _torch_path(fn):
    """fn() with HEADPLAN_VSLASH_FUSED=0 (the torch scores)."""
    old = os.environ.get("HEADPLAN_VSLASH_FUSED")
    os.environ["HEADPLAN_VSLASH_FUSED"] = "0"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["HEADPLAN_VSLASH_FUSED"]
        else:
            os.environ["HEADPLAN_VSLASH_FUSED"] = old


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    n, dev = a.n, "cuda"
    torch.manual_seed(0)
    q = torch.randn(1, HQ, n, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
    scale = D ** -0.5
    heads = list(range(HKV))
    verts, slashes = [n // 64] * HKV, [n // 32] * HKV
    lr = torch.full((1,), n, dtype=torch.int64, device=dev)
    assert VS.supported(q, k), "fused path not available for these inputs"

    def sel():
        return DI.vslash_select(q, k, heads, verts, slashes, scale, None, lr)

    fused = sel()
    plain = _torch_path(sel)
    col_f, diag_f = VS.vslash_scores(q, k, heads, scale, None)
    col_t, diag_t = _torch_path(lambda: DI._vslash_scores_torch(q, k, heads, scale, None))
    rel = {name: ((x - y).abs().max() / y.abs().max()).item()
           for name, x, y in (("col", col_f, col_t), ("diag", diag_f, diag_t))}
    overlap = {name: ((x & y).sum() / y.sum()).item()
               for name, x, y in (("cmask", fused[0], plain[0]), ("omask", fused[1], plain[1]))}
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    t_fused = bench(sel)
    t_torch = _torch_path(lambda: bench(sel))
    t_scores = bench(lambda: VS.vslash_scores(q, k, heads, scale, None))
    res = {"n": n, "heads": HKV, "G": HQ // HKV, "D": D, "dtype": "bf16", "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__,
           "vslash_select_fused_ms": t_fused, "vslash_select_torch_ms": t_torch, "vslash_scores_fused_ms": t_scores,
           "max_rel_diff": rel, "overlap": overlap}
    print(f"{'path':<22}{'ms':>9}  notes")
    print(f"{'vslash_select torch':<22}{t_torch:9.3f}")
    print(f"{'vslash_select fused':<22}{t_fused:9.3f}  x{t_torch / t_fused:.1f}; scores alone {t_scores:.3f} ms; "
          f"max rel diff col {rel['col']:.1e} diag {rel['diag']:.1e}; overlap cmask {overlap['cmask']:.4f} "
          f"omask {overlap['omask']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
