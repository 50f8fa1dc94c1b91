"""Decode-attention benchmark: headplan's Triton kernel vs dense SDPA (flash), Llama-3-8B layer shape.

One new token per sequence against a cache of N tokens, 32 query / 8 KV heads, head_dim 128, bf16.
Per layer call we time:

- ``sdpa``: dense ``scaled_dot_product_attention`` (flash backend, ``enable_gqa=True``), 1 query vs the
  full (B, 8, N, 128) cache;
- ``full``: our kernel with every KV head FULL (the same work as SDPA);
- ``50%``: 2 KV heads full + 6 streaming (sink 128 + window N/3 - 128): half of the KV kept;
- ``25%``: 1 KV head full + 7 streaming (sink 128 + window N/7 - 128): a quarter of the KV kept;
- ``duo``: 2 KV heads full + 6 streaming (sink 128 + window 2048), as in the DuoAttention-style
  numbers of shared/NOTES.md.

Streaming heads use the packed layout of the runtime: a sink then a ring buffer that has wrapped,
so slot positions are out of order. Time: median over CUDA-graph replays of a round of R layer
calls, each on its own copy of the inputs (R copies hold >= 256 MB, so nothing is served from L2),
divided by R. A second column gives ``triton.testing.do_bench`` (median, L2 flushed by zeroing a
256 MB buffer before each single-call replay), which also charges each call for writing back the
dirty lines the flush leaves in L2. Bandwidth counts the K and V bytes the call must read (retained
slots only; the 4-byte slot positions are not counted). Run:

    python benchmarks/bench_decode.py --json out/bench_decode.json [--sweep] [--profile]

Imports only torch, triton and headplan.kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import torch

from headplan.kernels import patterns as P
from headplan.kernels.decode import pick_config, sparse_decode
from headplan.kernels.reference import decode_ref

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
BYTES_PER_SLOT = D * 2 * 2  # K and V, bf16
SINK = 128


def plan_rows(name: str, N: int) -> list[dict]:
    """Heads (pattern + cap) of each plan at context N (the new token included in N)."""
    if name == "full":
        return [dict(kind="full", cap=N)] * HKV
    if name == "50%":
        nf, w = 2, N // 3 - SINK
    elif name == "25%":
        nf, w = 1, N // 7 - SINK
    elif name == "duo":
        nf, w = 2, 2048
    else:
        raise ValueError(name)
    stream = dict(kind="streaming", sink=SINK, alpha=w, beta=0.0, cap=min(N, SINK + w))
    return [dict(kind="full", cap=N)] * nf + [stream] * (HKV - nf)


def build_cache(rows: list[dict], B: int, N: int, device):
    caps = [int(r["cap"]) for r in rows]
    offs = [sum(caps[:i]) for i in range(len(caps))]
    S = sum(caps)
    qp = N - 1
    slot = torch.empty(S, dtype=torch.int32, device=device)
    for r, c, o in zip(rows, caps, offs):
        if r["kind"] == "full":
            slot[o:o + c] = torch.arange(c, dtype=torch.int32, device=device)
        else:  # sink + wrapped ring: position p >= sink sits in slot sink + (p - sink) % ring
            ring = c - SINK
            slot[o:o + SINK] = torch.arange(SINK, dtype=torch.int32, device=device)
            p = torch.arange(qp - ring + 1, qp + 1, dtype=torch.int64, device=device)
            slot[o + SINK + (p - SINK) % ring] = p.to(torch.int32)
    slot = slot.expand(B, S).contiguous()
    k = torch.randn(B, S, D, dtype=DT, device=device)
    v = torch.randn(B, S, D, dtype=DT, device=device)
    table = P.make_table([{kk: vv for kk, vv in r.items() if kk != "cap"} for r in rows], device=device)
    return dict(k=k, v=v, slot=slot, caps=caps, offs=offs,
                caps_t=torch.tensor(caps, dtype=torch.int32, device=device),
                offs_t=torch.tensor(offs, dtype=torch.int32, device=device), table=table,
                qpos=torch.full((B,), qp, dtype=torch.int64, device=device))


def time_call(fn, graph: bool) -> float:
    """Median ms per call (do_bench flushes L2 between calls)."""
    import triton.testing as tt
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return tt.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")


def reps_for(nbytes: int, target: int = 256 << 20, cap: int = 32) -> int:
    """Copies of the inputs to rotate through so that one timed round reads >= target bytes (> 5x L2)."""
    return max(1, min(cap, math.ceil(target / max(1, nbytes))))


def time_rot(fns, n: int = 50) -> float:
    """Median ms per call over a CUDA graph that runs each fn once (each on its own copy of the
    inputs, so nothing is served from L2 and no flush is needed: a flush by zeroing leaves dirty
    lines whose write-back the next call pays for)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2] / len(fns)


def memory_capacity(contexts, budget_bytes: float, layers: int = 32) -> list[dict]:
    """Largest batch that fits a 32-layer KV cache in the budget, dense vs plans (arithmetic only)."""
    rows = []
    for N in contexts:
        dense_seq = layers * HKV * N * BYTES_PER_SLOT
        r = dict(context=N, dense_bytes_per_seq=dense_seq, dense_max_batch=int(budget_bytes // dense_seq))
        for name in ("25%", "50%", "duo"):
            slots = sum(int(x["cap"]) for x in plan_rows(name, N))
            seq = layers * slots * (BYTES_PER_SLOT + 4)  # + int32 slot position per slot
            r[f"{name}_bytes_per_seq"] = seq
            r[f"{name}_max_batch"] = int(budget_bytes // seq)
        rows.append(r)
    return rows


SWEEP_CASES = ((32768, 8, "full"), (32768, 8, "25%"), (8192, 1, "25%"), (131072, 1, "25%"))


def sweep(device, graph=True):
    """Tile/grid configurations on representative cases; returns the one with the smallest sum of
    (time / best time of that case), and every row."""
    import itertools
    caches, qs = {}, {}
    for N, B, name in SWEEP_CASES:
        caches[(N, B, name)] = build_cache(plan_rows(name, N), B, N, device)
        qs[B] = torch.randn(B, HQ, D, dtype=DT, device=device)
    cands = [dict(BLOCK_N=bn, num_stages=st, num_warps=4, programs_per_sm=pp, min_chunk=mc, order=order)
             for (bn, st), pp, mc, order in itertools.product(((64, 3), (128, 2)), (16, 32), (128, 256, 512),
                                                               ("hb", "bh"))]
    results = []
    for cfg in cands:
        row = dict(cfg)
        try:
            for key, c in caches.items():
                N, B, _ = key
                q = qs[B]
                fn = lambda c=c, q=q, N=N: sparse_decode(  # noqa: E731
                    q, c["k"], c["v"], c["slot"], c["offs_t"], c["caps_t"], c["qpos"], c["table"], D ** -0.5,
                    max_cap=N, config=cfg)
                row["/".join(map(str, key))] = time_call(fn, graph)
        except Exception as e:  # out of shared memory and the like
            print("config", cfg, "failed:", type(e).__name__, str(e)[:120])
            continue
        results.append(row)
        print("config", cfg, " ".join(f"{k}={v * 1e3:.1f}us" for k, v in row.items() if "/" in k))
    keys = ["/".join(map(str, k)) for k in caches]
    best_t = {k: min(r[k] for r in results) for k in keys}
    for r in results:
        r["score"] = sum(r[k] / best_t[k] for k in keys)
    best = min(results, key=lambda r: r["score"])
    del caches
    torch.cuda.empty_cache()
    return {k: best[k] for k in cands[0]}, results


def profile_breakdown(device, config):
    """Per-kernel GPU time (torch.profiler) of one call: split pass vs combine pass vs SDPA."""
    from torch.profiler import ProfilerActivity, profile
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = []
    for N, B, name in SWEEP_CASES:
        c = build_cache(plan_rows(name, N), B, N, device)
        q = torch.randn(B, HQ, D, dtype=DT, device=device)
        fn = lambda: sparse_decode(q, c["k"], c["v"], c["slot"], c["offs_t"], c["caps_t"], c["qpos"],  # noqa: E731
                                   c["table"], D ** -0.5, max_cap=N, config=config)
        kd = torch.randn(B, HKV, N, D, dtype=DT, device=device) if name == "full" else None
        vd = torch.randn_like(kd) if kd is not None else None
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
                if kd is not None:
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True)
            torch.cuda.synchronize()
        per = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
                t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                if t > 0:
                    per[e.key[:60]] = t / 10
        row = dict(context=N, batch=B, plan=name, kernels_us=per)
        print(f"profile N={N} B={B} {name}: " + ", ".join(f"{k}={v:.1f}us" for k, v in per.items()))
        out.append(row)
        del c, kd, vd
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--plans", nargs="+", default=["full", "50%", "25%", "duo"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="try tile configs first and use the fastest")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel times (split/combine/SDPA) via torch.profiler")
    ap.add_argument("--budget-gb", type=float, default=80.0)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    torch.manual_seed(0)
    graph = not args.no_graph
    props = torch.cuda.get_device_properties(device)
    meta = dict(date=datetime.date.today().isoformat(), device=props.name, sms=props.multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, graph=graph, command=" ".join(sys.argv),
                default_config=pick_config(D, DT, device))
    print(meta)

    config = None
    sweep_rows = []
    if args.sweep:
        config, sweep_rows = sweep(device, graph=graph)
        print("best config:", config)
    meta["config"] = config or pick_config(D, DT, device)
    prof_rows = []
    if args.profile:
        try:
            prof_rows = profile_breakdown(device, meta["config"])
        except Exception as e:  # the profiler is a diagnostic only
            print("profile failed:", type(e).__name__, str(e)[:200])

    rows = []
    scale = D ** -0.5
    for N in args.contexts:
        for B in args.batches:
            q = torch.randn(B, HQ, D, dtype=DT, device=device)
            q4 = q[:, :, None, :]
            # dense baseline, rotated over R copies of the cache
            dense_bytes = B * HKV * N * BYTES_PER_SLOT
            R = reps_for(dense_bytes)
            dense = [(torch.randn(B, HKV, N, D, dtype=DT, device=device),
                      torch.randn(B, HKV, N, D, dtype=DT, device=device)) for _ in range(R)]

            def sdpa(kv):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return torch.nn.functional.scaled_dot_product_attention(q4, kv[0], kv[1], scale=scale,
                                                                            enable_gqa=True)

            fns = [lambda kv=kv: sdpa(kv) for kv in dense]
            t_sdpa = time_rot(fns) if graph else time_call(fns[0], False)
            t_sdpa_fl = time_call(fns[0], graph)
            rows.append(dict(context=N, batch=B, plan="sdpa", kept=1.0, ms=t_sdpa, ms_flush=t_sdpa_fl, reps=R,
                             kv_read_bytes=dense_bytes, tbps=dense_bytes / t_sdpa / 1e9, speedup=1.0,
                             speedup_flush=1.0, kv_mem_bytes=dense_bytes, err=0.0))
            del dense, fns
            for name in args.plans:
                prow = plan_rows(name, N)
                kept_slots = sum(int(r["cap"]) for r in prow)
                rbytes = B * kept_slots * BYTES_PER_SLOT
                R = reps_for(rbytes)
                caches = [build_cache(prow, B, N, device) for _ in range(R)]

                def ours(c):
                    return sparse_decode(q, c["k"], c["v"], c["slot"], c["offs_t"], c["caps_t"], c["qpos"],
                                         c["table"], scale, max_cap=N, config=config)

                c = caches[0]
                out = ours(c)
                ref = decode_ref(q, c["k"], c["v"], c["slot"], c["offs"], c["caps"], c["qpos"], c["table"], scale)
                err = (out.float() - ref.float()).abs().max().item()
                if not math.isfinite(err) or err > 5e-2:
                    print(f"!! {name} N={N} B={B}: max error vs decode_ref {err}")
                del ref, out
                fns = [lambda c=c: ours(c) for c in caches]
                t = time_rot(fns) if graph else time_call(fns[0], False)
                t_fl = time_call(fns[0], graph)
                rows.append(dict(context=N, batch=B, plan=name, kept=kept_slots / (HKV * N), ms=t, ms_flush=t_fl,
                                 reps=R, kv_read_bytes=rbytes, tbps=rbytes / t / 1e9, speedup=t_sdpa / t,
                                 speedup_flush=t_sdpa_fl / t_fl, kv_mem_bytes=rbytes + B * kept_slots * 4, err=err))
                del caches, fns, c
            torch.cuda.empty_cache()
            for r in rows[-(len(args.plans) + 1):]:
                print(f"N={r['context']:>6} B={r['batch']} {r['plan']:>5} kept={r['kept']:.3f} "
                      f"{r['ms'] * 1e3:8.1f} us {r['tbps']:5.2f} TB/s x{r['speedup']:.2f} | flushed "
                      f"{r['ms_flush'] * 1e3:8.1f} us x{r['speedup_flush']:.2f} err={r['err']:.1e}")

    cap_rows = memory_capacity(args.contexts, args.budget_gb * 1e9)

    # table
    print()
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  config: {meta['config']}")
    print("time: median over CUDA-graph replays, inputs rotated over R copies (>= 256 MB a round, no L2 hits); "
          "flushed: triton do_bench median with its L2 flush (zeroing 256 MB) before each single-call replay")
    hdr = ("| context | batch | plan | KV kept | time (us) | retained K+V read (TB/s) | speedup vs SDPA "
           "| flushed time (us) | flushed speedup | KV mem/layer (MB) |")
    print(hdr)
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['context'] // 1024}K | {r['batch']} | {r['plan']} | {r['kept'] * 100:.1f}% | {r['ms'] * 1e3:.1f} "
              f"| {r['tbps']:.2f} | {r['speedup']:.2f}x | {r['ms_flush'] * 1e3:.1f} | {r['speedup_flush']:.2f}x "
              f"| {r['kv_mem_bytes'] / 1e6:.0f} |")
    print()
    print(f"KV capacity of {args.budget_gb:.0f} GB (1e9 bytes) for 32 layers, bf16, 8 KV heads x 128: "
          f"dense = 32 x 8 x 128 x 2 (K,V) x 2 B = {32 * HKV * BYTES_PER_SLOT} B/token")
    print("| context | dense B/seq | dense max batch | 25% max batch | 50% max batch | duo max batch |")
    print("|---|---|---|---|---|---|")
    for r in cap_rows:
        print(f"| {r['context'] // 1024}K | {r['dense_bytes_per_seq'] / 1e9:.2f} GB | {r['dense_max_batch']} | "
              f"{r['25%_max_batch']} | {r['50%_max_batch']} | {r['duo_max_batch']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, capacity=cap_rows, sweep=sweep_rows, profile=prof_rows), f, indent=1)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
