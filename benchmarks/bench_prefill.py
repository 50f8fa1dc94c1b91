"""Benchmark the Triton sparse prefill against SDPA (flash, cuDNN) and FlexAttention (issue 4).

One GPU command:

    python benchmarks/bench_prefill.py --sizes 4096,8192,32768 --json out.json

Batch 1, 32 query / 8 KV heads, head_dim 128, bf16. For each plan (one layer's 8 KV heads) and
length it times (triton.testing.do_bench, median):
  sdpa_flash / sdpa_cudnn : dense causal SDPA (enable_gqa=True), the same for every plan
  flex (generic)          : compiled FlexAttention with ONE table-driven mask_mod that evaluates every
                            pattern kind per element (dynamic plans: the reference's own selections)
  flex_hw                 : compiled FlexAttention with the mask_mod a Flex user writes by hand for that
                            static plan, e.g. (q >= k) & (full[h] | (k < 128) | (q - k < 2048)), BlockMask
                            from a compiled create_block_mask (broadcast over heads when all are alike).
                            This is the baseline speed claims are made against.
  headplan_routed         : full KV-head groups through cuDNN SDPA on that head subset, the rest through
                            the sparse kernel (same layer), outputs written into one tensor
  headplan                : kernels.prefill with a prebuilt plan (kernel only)
  headplan_e2e            : kernels.prefill.sparse_prefill (tile lists / dynamic indices included)
TFLOP/s count the work the plan needs: 4 * visible (query, key) pairs * head_dim, per query head,
with the visible pairs counted exactly on the GPU from the reference definitions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

try:
    from headplan.kernels import patterns as P
    from headplan.kernels import prefill as KP
    from headplan.kernels import reference as R
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from kernels import patterns as P  # type: ignore
    from kernels import prefill as KP  # type: ignore
    from kernels import reference as R  # type: ignore

import triton

HQ, HKV, D = 32, 8, 128
G = HQ // HKV


def plans_for(n: int) -> dict[str, list[dict]]:
    st = {"kind": "streaming", "sink": 128, "alpha": 2048}
    # blocksparse at ~10% of the causal work: each query block sees about topk + 2 blocks
    topk = max(1, round(0.1 * n / (2 * 64)) - 2)
    bs = {"kind": "blocksparse", "topk": topk}
    vs = {"kind": "vslash", "vertical": max(64, n // 64), "slash": max(64, n // 32)}
    return {
        "all_full": [{"kind": "full"}] * HKV,
        "all_stream": [st] * HKV,
        "full25_stream75": [{"kind": "full"}] * 2 + [st] * 6,
        "blocksparse10": [bs] * HKV,
        "strided_all": [{"kind": "strided", "sink": 64, "alpha": 1024, "stride": 8, "offset": 3}] * HKV,
        "elastic_all": [{"kind": "streaming", "sink": 64, "alpha": 1024, "beta": 0.05}] * HKV,
        "mixed": [{"kind": "full"}, st, {"kind": "streaming", "sink": 64, "alpha": 1024, "beta": 0.05},
                  {"kind": "strided", "sink": 64, "alpha": 1024, "stride": 8, "offset": 3}, bs, vs,
                  {"kind": "skip"}, st],
    }


def dyn_tensors(q, k, table, scale, n, block=64):
    """Selections of the dynamic heads from the reference's own index builders."""
    dev = q.device
    NB = math.ceil(n / block)
    sel = torch.zeros(HKV, NB, NB, dtype=torch.bool, device=dev)
    cm = torch.zeros(HKV, n, dtype=torch.bool, device=dev)
    om = torch.zeros(HKV, n, dtype=torch.bool, device=dev)
    dyn = R.build_dynamic_index(q, k, table, scale, None, block) if bool(P.is_dynamic(table).any()) else None
    if dyn:
        for h, idx in dyn[0].items():
            if int(table[h, P.C_KIND]) == P.BLOCKSPARSE:
                i = idx.long()
                s = torch.zeros(NB, NB + 1, dtype=torch.bool, device=dev)
                s.scatter_(1, torch.where(i < 0, torch.full_like(i, NB), i), True)
                sel[h] = s[:, :NB]
            else:
                c, o = idx
                c, o = c.long(), o.long()
                cm[h, c[c >= 0]] = True
                om[h, o[o >= 0]] = True
    return dyn, sel, cm, om


def count_pairs(table, n, dyn, block=64):
    """Visible (query, key) pairs summed over KV heads, exactly, chunked on the GPU."""
    dev = table.device
    pos = torch.arange(n, device=dev).view(1, n)
    total = 0
    ch = max(256, (1 << 27) // (n * HKV))
    for s in range(0, n, ch):
        vis = R.visible(pos[:, s:s + ch], pos, table, block, dyn)
        total += int(vis.sum())
    return total


def make_mask_mod(table, sel, cm, om, block=64):
    kind = table[:, P.C_KIND].long()
    sink = table[:, P.C_SINK].long()
    alpha = table[:, P.C_ALPHA].long()
    beta = table[:, P.C_BETA].long()
    stride = table[:, P.C_STRIDE].long().clamp(min=1)
    off = table[:, P.C_OFFSET].long()

    def mask_kv(b, h, qi, kj):
        kd = kind[h]
        causal = kj <= qi
        w = alpha[h] + (beta[h] * (qi + 1)) // P.BETA_SCALE
        local = (kj < sink[h]) | ((qi - kj) < w)
        shard = ((kj // block) % stride[h]) == off[h]
        v = (kd == P.FULL)
        v = v | ((kd == P.STREAMING) & local) | ((kd == P.STRIDED) & (local | shard))
        v = v | ((kd == P.BLOCKSPARSE) & sel[h, qi // block, kj // block])
        v = v | ((kd == P.VSLASH) & (cm[h, kj] | om[h, (qi - kj).clamp(min=0)]))
        return causal & v

    def mask_q(b, h, qi, kj):
        return mask_kv(b, h // G, qi, kj)

    return mask_kv, mask_q


def hand_mask(rows, dev):
    """The mask_mod a FlexAttention user writes by hand for a static plan (constants, no table), and
    whether it is the same for every head; None for plans with dynamic heads (no hand-written form)."""
    kinds = {r["kind"] for r in rows}
    if kinds & {"blocksparse", "vslash", "skip"}:
        return None
    local = [r for r in rows if r["kind"] != "full"]
    if len({tuple(sorted(r.items())) for r in local}) > 1:
        return None  # several different windows in one layer: no single hand-written rule
    if not local:
        return (lambda b, h, q, k: q >= k), True
    r = local[0]
    sink, alpha = int(r.get("sink", 0)), int(r["alpha"])
    bq = int(round(float(r.get("beta", 0.0)) * P.BETA_SCALE))
    if r["kind"] == "strided":
        stride, off = int(r["stride"]), int(r["offset"])

        def loc(q, k):
            return (k < sink) | (q - k < alpha) | ((k // 64) % stride == off)
    elif bq:
        def loc(q, k):
            return (k < sink) | (q - k < alpha + (bq * (q + 1)) // P.BETA_SCALE)
    else:
        def loc(q, k):
            return (k < sink) | (q - k < alpha)
    if len(local) == len(rows):
        return (lambda b, h, q, k: (q >= k) & loc(q, k)), True
    full = torch.tensor([r["kind"] == "full" for r in rows], device=dev).repeat_interleave(G)  # per query head
    return (lambda b, h, q, k: (q >= k) & (full[h] | loc(q, k))), False


def flex_hw_block_mask(mask, same, n):
    from torch.nn.attention.flex_attention import create_block_mask
    try:
        return create_block_mask(mask, 1, None if same else HQ, n, n, device="cuda", _compile=True)
    except TypeError:
        return torch.compile(create_block_mask)(mask, 1, None if same else HQ, n, n, device="cuda")


def routed(q, k, v, table, scale):
    """Full KV-head groups through cuDNN SDPA on that head subset, the others through the sparse kernel: the
    runtime's split layer (``headplan.runtime.backend.split_prefill``), head indices built once."""
    from headplan.runtime import backend

    split = backend.split_heads(table, G, q.device)
    return lambda: backend.split_prefill(q, k, v, table, scale, 64, KP.sparse_prefill, split)


def flex_block_mask(mask_kv, mask_q, n):
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    try:
        bm = create_block_mask(mask_kv, 1, HKV, n, n, device="cuda", _compile=True)
    except TypeError:
        bm = torch.compile(create_block_mask)(mask_kv, 1, HKV, n, n, device="cuda")
    rep = lambda t: None if t is None else t.repeat_interleave(G, dim=1)  # noqa: E731
    return BlockMask.from_kv_blocks(rep(bm.kv_num_blocks), rep(bm.kv_indices), rep(bm.full_kv_num_blocks),
                                    rep(bm.full_kv_indices), BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mask_q,
                                    seq_lengths=(n, n))


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,8192,32768", help="comma list; add 65536 for 64K")
    ap.add_argument("--plans", default="", help="comma list of plan names (default all)")
    ap.add_argument("--json", default="", help="write results here")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-flex-gen", action="store_true", help="skip the generic table-driven Flex mask (compile time)")
    ap.add_argument("--cfgs", default="", help="';'-separated BM,BN,W,S headplan configs to try (kernel only)")
    ap.add_argument("--ref-max", type=int, default=8192, help="also check against prefill_ref up to this length")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flex = None
    if not a.no_flex:
        from torch import _dynamo
        from torch.nn.attention.flex_attention import flex_attention
        _dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
    dev = torch.device("cuda")
    results = []
    hdr = f"{'plan':<16}{'N':>7}{'dens':>6} {'flash':>7} {'cudnn':>7} {'flex_gen':>8} {'flex_hw':>7} {'hp':>7} " \
          f"{'hp_e2e':>7} {'hp_rout':>7} {'hwTF':>5} {'hpTF':>5} {'x_flex_hw':>9} {'diff_flex':>9} {'diff_ref':>9}"
    lines = []
    for n in [int(x) for x in a.sizes.split(",")]:
        torch.manual_seed(n)
        q = torch.randn(1, HQ, n, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
        scale = D ** -0.5
        causal_flops = 4 * HQ * D * n * (n + 1) / 2
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_flash = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True))
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                         enable_gqa=True))
        except Exception as e:  # noqa: BLE001
            print("cudnn failed:", e)
            t_cudnn = float("nan")
        plans = plans_for(n)
        names = [p for p in a.plans.split(",") if p] or list(plans)
        for name in names:
            table = P.make_table(plans[name], device=dev)
            dyn, sel, cm, om = dyn_tensors(q, k, table, scale, n)
            pairs = count_pairs(table, n, dyn)
            flops = 4 * pairs * G * D
            rec = {"plan": name, "N": n, "rows": plans[name], "hcfg": os.environ.get("HEADPLAN_PREFILL_HCFG", ""), "visible_pairs_kv": pairs, "flops": flops,
                   "density": flops / causal_flops, "sdpa_flash_ms": t_flash, "sdpa_cudnn_ms": t_cudnn,
                   "causal_flops": causal_flops}
            plan = KP.build_plan(q, k, table, scale)
            out_hp = KP.run_plan(q, k, v, plan, scale)
            rec["path"] = plan.get("path", "portable")
            torch.cuda.synchronize()
            rec["headplan_ms"] = bench(lambda: KP.run_plan(q, k, v, plan, scale))
            rec["headplan_e2e_ms"] = bench(lambda: KP.sparse_prefill(q, k, v, table, scale))
            rec["headplan_tflops"] = flops / rec["headplan_ms"] * 1e-9
            for cfg in [c for c in a.cfgs.split(";") if c]:
                os.environ["HEADPLAN_PREFILL_CFG"] = cfg
                pl = KP.build_plan(q, k, table, scale)
                try:
                    rec[f"cfg_{cfg}_ms"] = bench(lambda: KP.run_plan(q, k, v, pl, scale))
                except Exception as e:  # noqa: BLE001
                    rec[f"cfg_{cfg}_ms"] = float("nan")
                    print("cfg", cfg, "failed:", str(e)[:200])
                del os.environ["HEADPLAN_PREFILL_CFG"]
            if n <= a.ref_max:
                ref = R.attention_ref(q, k, v, torch.arange(n, device=dev).view(1, n),
                                      torch.arange(n, device=dev).view(1, n), table, scale, 64, dyn, chunk=512)
                rec["diff_ref"] = (out_hp.float() - ref.float()).abs().max().item()
                del ref
            if flex is not None:
                def time_flex(bm, key, against):  # one Flex BlockMask: agreement with headplan, time, TF/s
                    out_fx = flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)
                    rec[f"diff_{key}"] = (out_hp.float() - out_fx.float()).abs().max().item()
                    rec[f"{key}_ms"] = bench(lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True))
                    rec[f"{key}_tflops"] = flops / rec[f"{key}_ms"] * 1e-9
                    rec[f"speedup_vs_{key}"] = rec[f"{key}_ms"] / rec[against]

                if not a.no_flex_gen:
                    time_flex(flex_block_mask(*make_mask_mod(table, sel, cm, om), n), "flex", "headplan_ms")
                hw = hand_mask(plans[name], dev)
                if hw is not None:
                    time_flex(flex_hw_block_mask(hw[0], hw[1], n), "flex_hw", "headplan_e2e_ms")
            if any(r["kind"] == "full" for r in plans[name]) and any(r["kind"] != "full" for r in plans[name]):
                run = routed(q, k, v, table, scale)
                rec["diff_routed"] = (run().float() - out_hp.float()).abs().max().item()
                rec["headplan_routed_ms"] = bench(run)
                from headplan.plan import Pattern
                from headplan.runtime import backend
                route = backend.FullRoute([Pattern.from_row(r) for r in plans[name]], 64, 0)
                rec["runtime_splits"] = route.split(n, dev, D, G)  # what headplan.runtime does (its cost table)
                rec["runtime_route_source"] = route.source(dev, D, G)
            results.append(rec)
            if a.json:  # progressively: a run cut short keeps what it measured
                with open(a.json, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "results": results},
                              f, indent=1)
            g = lambda key: rec.get(key, float("nan"))  # noqa: E731
            line = (f"{name:<16}{n:>7}{rec['density']:>6.3f} {t_flash:>7.3f} {t_cudnn:>7.3f} {g('flex_ms'):>8.3f} "
                    f"{g('flex_hw_ms'):>7.3f} {g('headplan_ms'):>7.3f} {g('headplan_e2e_ms'):>7.3f} "
                    f"{g('headplan_routed_ms'):>7.3f} {g('flex_hw_tflops'):>5.0f} {g('headplan_tflops'):>5.0f} "
                    f"{g('speedup_vs_flex_hw'):>9.2f} {g('diff_flex'):>9.2e} {g('diff_ref'):>9.2e}")
            extra = " ".join(f"{kk[4:-3]}={vv:.3f}" for kk, vv in rec.items() if kk.startswith("cfg_"))
            print(line + ("  [" + extra + "]" if extra else ""), flush=True)
            lines.append(line)
            del out_hp, plan
            torch.cuda.empty_cache()
    print()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{time.strftime('%Y-%m-%d')}")
    print("times in ms (do_bench median); TF = TFLOP/s of the plan's needed work; flex_gen = one generic "
          "table-driven mask_mod (labelled as such); x_flex_hw = flex_hw_ms / hp_e2e_ms (hand-written Flex mask vs "
          "headplan with its tile lists)")
    print(hdr)
    for line in lines:
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
