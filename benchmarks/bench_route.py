"""Routing full heads to the dense library, decided by the cost model (issue 17 item 3), one GPU command:

    python benchmarks/bench_route.py --table cost.yaml --json out.json

For mixed layers (some full heads, the rest windowed or strided) at several lengths (batch 1, 32 query / 8 KV
heads, D 128, bf16) it times the layer both ways in the same process, the sparse kernel on every head and the
split (full heads through cuDNN on that head subset, the rest through the sparse kernel), checks both agree,
and compares the cost table's decision (``CostTable.routes_full``, what ``headplan.runtime`` does) with the
faster one. With ``--measure`` it first measures the table (``headplan.costmodel.measure``) and saves it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

from headplan.costmodel import load_cost_table, measure
from headplan.kernels import patterns as P
from headplan.kernels.prefill import sparse_prefill
from headplan.plan import Pattern
from headplan.runtime import backend

HQ, HKV, D = 32, 8, 128
ST = {"kind": "streaming", "sink": 128, "alpha": 2048}
LAYERS = {
    "1full_7stream": [{"kind": "full"}] + [ST] * 7,
    "2full_6stream": [{"kind": "full"}] * 2 + [ST] * 6,
    "4full_4stream": [{"kind": "full"}] * 4 + [ST] * 4,
    "2full_6strided": [{"kind": "full"}] * 2 + [{"kind": "strided", "sink": 64, "alpha": 1024, "stride": 8,
                                                 "offset": 3}] * 6,
    "6full_2stream": [{"kind": "full"}] * 6 + [ST] * 2,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", required=True)
    ap.add_argument("--measure", action="store_true", help="measure the table first (and save it to --table)")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.measure:
        t0 = time.time()
        measure(head_dim=D, group=HQ // HKV, lengths=(2048, 8192, 16384, 32768)).save(a.table)
        print(f"measured the cost table in {time.time() - t0:.0f} s", flush=True)
    cost = load_cost_table(a.table)
    print(f"dense {cost.dense_per_pair_ns * 1e3:.3f} ps/pair (+{cost.dense_launch_us:.0f} us), sparse full "
          f"{cost.per_pair_ns['full'] * 1e3:.3f} ps/pair, split overhead {cost.route_fixed_us:.0f} us + "
          f"{cost.route_ns_per_token:.3f} ns/token/KV head", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "rows": []}
    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    print(f"{'layer':<16} {'N':>6} {'sparse':>8} {'split':>8} {'pred sp':>8} {'pred split':>10} {'decision':>9} "
          f"{'faster':>7} {'ok':>3}", flush=True)
    for n in [int(x) for x in a.lengths.split(",")]:
        torch.manual_seed(0)
        q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        s = D ** -0.5
        for name, rows in LAYERS.items():
            table = P.make_table(rows).cuda()
            pats = [Pattern.from_row(r) for r in rows]
            a_out = sparse_prefill(q, k, v, table, s)
            b_out = backend.split_prefill(q, k, v, table, s, 64, sparse_prefill)
            diff = (a_out.float() - b_out.float()).abs().max().item()
            t_sp = bench(lambda: sparse_prefill(q, k, v, table, s))
            t_split = bench(lambda: backend.split_prefill(q, k, v, table, s, 64, sparse_prefill))
            dec = cost.routes_full(pats, n)
            faster = t_split < t_sp
            r = {"layer": name, "n": n, "sparse_ms": t_sp, "split_ms": t_split, "pred_sparse_ms":
                 cost.sparse_layer_ms(pats, n), "pred_split_ms": cost.split_layer_ms(pats, n), "decision_split": dec,
                 "split_faster": faster, "diff": diff,
                 "chosen_ms": t_split if dec else t_sp, "best_ms": min(t_sp, t_split)}
            res["rows"].append(r)
            print(f"{name:<16} {n:>6} {t_sp:8.3f} {t_split:8.3f} {r['pred_sparse_ms']:8.3f} {r['pred_split_ms']:10.3f} "
                  f"{'split' if dec else 'sparse':>9} {'split' if faster else 'sparse':>7} "
                  f"{'yes' if dec == faster else 'NO':>3} diff {diff:.1e}", flush=True)
        del q, k, v
    rows = res["rows"]
    agree = sum(r["decision_split"] == r["split_faster"] for r in rows)
    lost = max((r["chosen_ms"] / r["best_ms"] - 1 for r in rows), default=0.0)
    fixed = [(r["split_ms"] if r["n"] >= backend.ROUTE_FULL_FROM else r["sparse_ms"]) / r["best_ms"] - 1 for r in rows]
    res["summary"] = {"agree": agree, "cases": len(rows), "worst_loss_vs_best": lost,
                      "worst_loss_fixed_rule": max(fixed, default=0.0)}
    print(f"cost-model decision = faster one in {agree} of {len(rows)} cases; worst time lost vs the faster "
          f"{lost * 100:.1f}% (fixed {backend.ROUTE_FULL_FROM}-token rule: {max(fixed) * 100:.1f}%)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
