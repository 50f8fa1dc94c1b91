"""End-to-end GPU check and benchmark of the headplan runtime inside a transformers model.

  python benchmarks/bench_e2e.py --json out.json [--sections correct,crossover,prefill,decode]

Sections (each prints a table and lands in the JSON):
- correct:   a small Llama-shaped random model (bf16, 32 query / 8 KV heads, head_dim 128) runs a plan
             with every pattern kind; Triton backend vs the PyTorch reference backend on the same
             inputs: prefill logits, and 40 greedy decode steps through the per-head cache (left
             padded batch of 2).
- crossover: sparse_prefill on a mixed plan vs dense SDPA (flash, cuDNN) at short lengths, to decide
             when short prompts should fall back to dense.
- prefill:   Llama-3-8B-shaped random model (32 layers), batch 1, 32K prompt: time to first token,
             dense SDPA vs plans (25% KV streaming plan, all-full), whole model.
- decode:    same model, batch 8, 32K context: per-step decode latency, tokens/s and peak memory,
             dense DynamicCache vs the per-head cache at ~50% and ~25% KV. Caches are filled with
             random K/V (decode speed does not depend on the values).
- decode_graphs: issue 16. Same model, batch 8 and 1, 32K (``--long``: also batch 1 at 128K): the dense
             baselines in the same run (transformers default, SDPA flash eager, StaticCache +
             torch.compile(mode="reduce-overhead"); ``--no-compile`` skips the last) and headplan's
             graph-captured decode step (runtime/graphs.py DecodeStep, what generate() runs on CUDA) with
             all-full / ~50% / ~25% KV plans: ms per step, tokens/s, step time over the byte floor (weights
             but the embedding table + the KV the step reads, at the copy bandwidth measured in the run),
             peak memory; a kernel-time profile of the 25% plan's replayed step.
Random weights throughout: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch


def _llama(layers, hidden, heads, kv, inter, vocab, max_pos=131072):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16)
    m.config.architectures = ["LlamaForCausalLM"]
    m.set_attn_implementation("sdpa")
    return m.eval()


def _plan(model, rows_fn):
    from headplan.models import identity_of
    from headplan.plan import plan_from_rows

    ident = identity_of(model.config)
    return plan_from_rows(ident, [[rows_fn(li, h) for h in range(ident.num_kv_heads)] for li in range(ident.num_layers)])


def _time(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


MIXED = [
    {"kind": "full"},
    {"kind": "streaming", "sink": 64, "alpha": 256},
    {"kind": "streaming", "sink": 16, "alpha": 64, "beta": 0.125},
    {"kind": "strided", "sink": 32, "alpha": 128, "stride": 4, "offset": 1},
    {"kind": "blocksparse", "topk": 4},
    {"kind": "vslash", "vertical": 64, "slash": 128},
    {"kind": "skip"},
    {"kind": "streaming", "sink": 4, "alpha": 32},
]


@torch.no_grad()
def section_correct(res):
    """Triton vs reference backends inside the model, for static / dynamic plans, with and without padding."""
    import headplan

    m = _llama(4, 4096, 32, 8, 4096, 1000, 8192)  # head_dim 128: the Triton paths run
    static = [MIXED[i] for i in (0, 1, 2, 3, 6, 7)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 1000), generator=g).cuda()
    out = {}
    for pname, pool in (("static", static), ("mixed", MIXED), ("all_full", [{"kind": "full"}])):
        headplan.apply(m, _plan(m, lambda li, h: pool[(h + li) % len(pool)]))
        for padded in (False, True):
            mask = torch.ones_like(ids)
            if padded:
                mask[1, :137] = 0
            got = {}
            for backend in ("auto", "reference"):
                os.environ["HEADPLAN_BACKEND"] = backend
                logits = m(ids, attention_mask=mask).logits.float()
                gen = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
                got[backend] = (logits, gen.logits[0].float(), gen.sequences)
            os.environ["HEADPLAN_BACKEND"] = "auto"
            valid = mask.bool()
            lt, lr = got["auto"][0], got["reference"][0]
            r = {"prefill_max_abs_diff": (lt - lr)[valid].abs().max().item(),
                 "prefill_mean_abs_diff": (lt - lr)[valid].abs().mean().item(),
                 "logit_absmax": lr[valid].abs().max().item(),
                 "decode_step1_max_abs_diff": (got["auto"][1] - got["reference"][1]).abs().max().item(),
                 "tokens_identical": bool(torch.equal(got["auto"][2], got["reference"][2]))}
            out[f"{pname}{'_padded' if padded else ''}"] = r
            print("correct:", pname, padded, json.dumps(r))
    res["correct"] = out


@torch.no_grad()
def section_cpuprof(res, N=32768, B=8):
    """cProfile of decode steps (Python time) for the all-full and kv25 plans."""
    import cProfile
    import io
    import pstats

    import headplan

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    ids = torch.randint(0, 1000, (B, 1), device="cuda")
    w = N // 7 - 128
    for name, fn in (("all_full", lambda li, h: {"kind": "full"}),
                     ("kv25", lambda li, h: {"kind": "full"} if h < 1 else {"kind": "streaming", "sink": 128,
                                                                          "alpha": w})):
        headplan.apply(m, _plan(m, fn))
        cache = headplan.new_cache(m, N + 16)
        _fill_headplan_cache(m, cache, B, N, torch.bfloat16)
        m(ids, past_key_values=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(4):
            m(ids, past_key_values=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        print(f"== {name} ==")
        print("\n".join(line[:150] for line in s.getvalue().splitlines()[:40]))
        del cache
    res["cpuprof"] = "printed"


@torch.no_grad()
def section_crossover(res):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from headplan.kernels import patterns as P
    from headplan.kernels.prefill import sparse_prefill

    rows = []
    table = P.make_table([MIXED[i] for i in range(8)]).cuda()
    table_stream = P.make_table([{"kind": "full"}] * 2 + [{"kind": "streaming", "sink": 64, "alpha": 256}] * 6).cuda()
    for L in (256, 512, 1024, 2048, 4096):
        q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        row = {"L": L}
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    row[name] = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True))
            except Exception as e:  # noqa: BLE001
                row[name] = None
                row[name + "_error"] = str(e)[:80]
        row["hp_mixed"] = do_bench(lambda: sparse_prefill(q, k, v, table, 128 ** -0.5))
        row["hp_2full_6stream256"] = do_bench(lambda: sparse_prefill(q, k, v, table_stream, 128 ** -0.5))
        rows.append(row)
        print("crossover:", json.dumps(row))
    res["crossover"] = rows


def _fill_headplan_cache(m, cache, B, N, dtype):
    """Commit N random tokens per layer into a fresh per-head cache (as a prefill would)."""
    cfg = m.config
    kv, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    pos = torch.arange(N, device="cuda").expand(B, N)
    for li, layer in enumerate(cache.layers):
        for s in range(0, N, 8192):
            e = min(N, s + 8192)
            k = torch.randn(B, kv, e - s, D, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.seen += e - s
            layer.commit(k, v, pos[:, s:e])


def _fill_dense_cache(m, B, N, dtype):
    from transformers import DynamicCache

    cfg = m.config
    kv, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    c = DynamicCache()
    for li in range(cfg.num_hidden_layers):
        k = torch.randn(B, kv, N, D, device="cuda", dtype=dtype)
        c.update(k, torch.randn_like(k), li)
    return c


@torch.no_grad()
def section_decode(res, N=32768, B=8, steps=16):
    import contextlib

    import headplan
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    rows = []
    w = N // 7 - 128
    plans = {
        "dense_sdpa_default": ("dense", None),
        "dense_sdpa_flash": ("flash", None),
        "all_full_headplan": ("plan", lambda li, h: {"kind": "full"}),
        "kv50": ("plan", lambda li, h: {"kind": "full"} if h < 2 else {"kind": "streaming", "sink": 128,
                                                                        "alpha": N // 3 - 128}),
        "kv25": ("plan", lambda li, h: {"kind": "full"} if h < 1 else {"kind": "streaming", "sink": 128, "alpha": w}),
    }
    ids = torch.randint(0, 1000, (B, 1), device="cuda")
    for name, (mode, fn) in plans.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if fn is None:
            m.set_attn_implementation("sdpa")
            cache = _fill_dense_cache(m, B, N, torch.bfloat16)
            kv_bytes = sum(layer.keys.numel() * 2 * 2 for layer in cache.layers)
        else:
            headplan.apply(m, _plan(m, fn))
            cache = headplan.new_cache(m, N + steps + 8)
            _fill_headplan_cache(m, cache, B, N, torch.bfloat16)
            kv_bytes = cache.kv_bytes()
        ctx = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if mode == "flash" else contextlib.nullcontext

        def step():
            with ctx():
                m(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

        step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        row = {"plan": name, "N": N, "B": B, "ms_per_step": dt * 1e3, "tokens_per_s": B / dt,
               "kv_gb": kv_bytes / 1e9, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        rows.append(row)
        print("decode:", json.dumps(row))
        del cache
        m.set_attn_implementation("sdpa")
    for base_name in ("dense_sdpa_default", "dense_sdpa_flash"):
        base = next(r["ms_per_step"] for r in rows if r["plan"] == base_name)
        for r in rows:
            r[f"speedup_vs_{base_name}"] = base / r["ms_per_step"]
    res["decode"] = rows
    del m
    torch.cuda.empty_cache()


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the byte floor's rate)."""
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), reps=20, warm=3)
    del x, y
    return 2 * 2 ** 30 / t


def _timed_steps(fn, steps):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def _kv_read_bytes(cache, N, B, D, elt=2):
    """Bytes of K and V one decode step reads from a per-head cache at context N (rings: all of them)."""
    slots = 0
    for layer in cache.layers:
        slots += sum(c if r else min(c, N + 1) for c, r in zip(layer.cap, layer.ring))
    return 2 * slots * B * D * elt


GRAPH_ORDER = ("dense_default", "dense_sdpa_flash", "dense_static_compile", "hp_all_full", "hp_kv50", "hp_kv25")


@torch.no_grad()
def section_decode_graphs(res, steps=32, long=False, compile_baseline=True):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import StaticCache

    import headplan
    from headplan import runtime as RT

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    cfg = m.config
    L, kv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    bw = _copy_bandwidth()
    w_bytes = sum(p.numel() * p.element_size() for p in m.parameters()) - m.get_input_embeddings().weight.numel() * 2
    kwname = RT.cache_kwarg(m)
    cases = [(32768, 8), (32768, 1)] + ([(131072, 1)] if long else [])
    rows, prof_out = [], None
    for N, B in cases:
        plans = {"hp_all_full": lambda li, h: {"kind": "full"},
                 "hp_kv50": lambda li, h: {"kind": "full"} if h < 2 else {"kind": "streaming", "sink": 128,
                                                                          "alpha": N // 3 - 128},
                 "hp_kv25": lambda li, h: {"kind": "full"} if h < 1 else {"kind": "streaming", "sink": 128,
                                                                          "alpha": N // 7 - 128}}
        ids = torch.randint(0, 1000, (B, 1), device="cuda")
        dense_kv = 2 * L * B * kv * N * D * 2

        def record(name, dt, kv_read, extra=None):
            floor = (w_bytes + kv_read) / bw
            row = {"config": name, "N": N, "B": B, "ms_per_step": dt * 1e3, "tokens_per_s": B / dt,
                   "kv_read_gb": kv_read / 1e9, "floor_ms": floor * 1e3, "over_floor": dt / floor,
                   "peak_gb": torch.cuda.max_memory_allocated() / 1e9, **(extra or {})}
            rows.append(row)
            print("decode_graphs:", json.dumps(row), flush=True)

        # dense, eager: transformers' default attention choice, then SDPA's flash kernel forced
        m.set_attn_implementation("sdpa")
        for name, ctx in (("dense_default", contextlib.nullcontext),
                          ("dense_sdpa_flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cache = _fill_dense_cache(m, B, N, torch.bfloat16)

            def step():
                with ctx():
                    m(ids, use_cache=True, logits_to_keep=1, **{kwname: cache})

            step()
            record(name, _timed_steps(step, min(steps, 16)), dense_kv)
            del cache
        # headplan: the graph-captured step generate() runs on CUDA
        for name, fn in plans.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            headplan.apply(m, _plan(m, fn))
            max_len = N + 3 * steps + 16
            cache = RT.HeadplanCache(RT.state_of(m).tables, max_len, grow=False)
            _fill_headplan_cache(m, cache, B, N, torch.bfloat16)
            dstep = RT.DecodeStep(m, cache, B, max_len, graph=True)
            pos = torch.full((B, 1), N, dtype=torch.long, device="cuda")

            def step():
                dstep(ids, pos)
                pos.add_(1)

            step()  # eager warm-up
            step()  # capture + replay
            dt = _timed_steps(step, steps)
            record(name, dt, _kv_read_bytes(cache, N, B, D),
                   {"captures": dstep.captures, "replays": dstep.replays, "capture_failed": dstep.failed})
            if name == "hp_kv25" and N == 32768:
                prof_out = (prof_out or "") + f"\n== hp_kv25 replayed step, N {N} B {B} ==\n" + _profile_replay(step)
            del cache, dstep
            RT.unapply(m)
        # StaticCache + torch.compile(mode="reduce-overhead"): transformers' own graph-captured decode
        if compile_baseline:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            m.set_attn_implementation("sdpa")
            try:
                torch._dynamo.reset()
                sc = StaticCache(config=cfg, max_cache_len=N + 3 * steps + 16)
                for layer in sc.layers:
                    for s0 in range(0, N, 8192):
                        k = torch.randn(B, kv, min(8192, N - s0), D, device="cuda", dtype=torch.bfloat16)
                        layer.update(k, torch.randn_like(k))
                fwd = torch.compile(m.forward, mode="reduce-overhead")
                pos = torch.full((B, 1), N, dtype=torch.long, device="cuda")

                def step():
                    fwd(input_ids=ids, position_ids=pos.clone(), use_cache=True, logits_to_keep=1, **{kwname: sc})
                    pos.add_(1)

                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                comp_s = time.perf_counter() - t0
                record("dense_static_compile", _timed_steps(step, steps), dense_kv, {"compile_s": comp_s})
                del sc, fwd
            except Exception as e:  # noqa: BLE001 - keep the other rows
                print("decode_graphs: static compile failed:", repr(e)[:300], flush=True)
                rows.append({"config": "dense_static_compile", "N": N, "B": B, "error": repr(e)[:300]})
            torch._dynamo.reset()
    for N, B in cases:
        mine = [r for r in rows if r["N"] == N and r["B"] == B and "ms_per_step" in r]
        best = min((r["ms_per_step"] for r in mine if r["config"].startswith("dense")), default=None)
        for r in mine:
            r["speedup_vs_best_dense"] = best / r["ms_per_step"] if best else None
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; weights read per step {w_bytes / 1e9:.2f} GB")
    print(f"{'N':>7} {'B':>2} {'config':<22} {'ms/step':>8} {'tok/s':>8} {'x best dense':>12} {'floor ms':>8} "
          f"{'x floor':>7} {'peak GB':>7}")
    for r in sorted((r for r in rows if "ms_per_step" in r),
                    key=lambda r: (-r["B"], r["N"], GRAPH_ORDER.index(r["config"]))):
        print(f"{r['N']:>7} {r['B']:>2} {r['config']:<22} {r['ms_per_step']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['speedup_vs_best_dense']:>12.2f} {r['floor_ms']:>8.2f} {r['over_floor']:>7.2f} {r['peak_gb']:>7.1f}")
    if prof_out:
        print(prof_out)
    res["decode_graphs"] = {"copy_tb_s": bw / 1e12, "weights_gb": w_bytes / 1e9, "rows": rows,
                            "kv25_replay_kernels": prof_out}
    del m
    torch.cuda.empty_cache()


@torch.no_grad()
def section_generate_graphs(res, N=32768, B=8, new=64):
    """generate() itself, batch 8, 32K prompt: decode tokens/s = new / (time(new + 1 tokens) - time(1 token)),
    transformers' default dense vs plans (which take the graph-captured step on CUDA)."""
    import headplan
    from headplan import runtime as RT

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    ids = torch.randint(0, 1000, (B, N), device="cuda")
    mask = torch.ones_like(ids)
    rows = []
    for name, fn in (("dense_default", None), ("hp_all_full", lambda li, h: {"kind": "full"}),
                     ("hp_kv25", lambda li, h: {"kind": "full"} if h < 1 else {"kind": "streaming", "sink": 128,
                                                                              "alpha": N // 7 - 128})):
        torch.cuda.empty_cache()
        if fn is None:
            m.set_attn_implementation("sdpa")
        else:
            headplan.apply(m, _plan(m, fn))
        ts = {}
        # plans: a first untimed request makes the decode step (cache, warm-up, capture) that the timed ones reuse
        for k in ((new + 1, 1, new + 1) if fn is not None else (1, new + 1)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = m.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                             pad_token_id=0)
            torch.cuda.synchronize()
            ts[k] = time.perf_counter() - t
            assert out.shape[1] == N + k
        st = RT.state_of(m)
        dt = (ts[new + 1] - ts[1]) / new
        row = {"config": name, "N": N, "B": B, "new": new, "prefill_s": ts[1], "ms_per_step": dt * 1e3,
               "tokens_per_s": B / dt, "decode_path": list(st.last_decode) if st else ["dense", None]}
        rows.append(row)
        print("generate_graphs:", json.dumps(row), flush=True)
        if fn is not None:
            RT.unapply(m)
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["speedup_vs_dense_default"] = base / r["ms_per_step"]
    res["generate_graphs"] = rows
    del m
    torch.cuda.empty_cache()


def _profile_replay(step, n=5) -> str:
    """Kernel time of ``n`` replayed steps, by kernel (CUPTI sees the kernels inside a graph)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=50)
    except Exception as e:  # noqa: BLE001
        return f"profile failed: {e!r}"[:300]


@torch.no_grad()
def section_prefill(res, sizes=(32768, 131072)):
    """Time to first token, whole Llama-3-8B-shaped model, batch 1: dense (transformers' SDPA as it picks,
    and SDPA with cuDNN forced: the fastest dense configuration) vs plans. At 128K only the fastest dense
    and the 25% KV plan run (one timed run each)."""
    import headplan
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    rows = []
    for N in sizes:
        ids = torch.randint(0, 1000, (1, N), device="cuda")
        w = N // 7 - 128
        plans = {
            "dense_sdpa": None,
            "dense_sdpa_cudnn": "cudnn",
            "all_full": lambda li, h: {"kind": "full"},
            "kv25_stream": lambda li, h: {"kind": "full"} if h < 1 else {"kind": "streaming", "sink": 128, "alpha": w},
            "duo_2full_6win2048": lambda li, h: {"kind": "full"} if h < 2 else {"kind": "streaming", "sink": 128,
                                                                              "alpha": 2048},
        }
        if N <= 32768:  # dynamic heads: their index building (per layer call) counts in the time to first token
            topk = max(1, round(0.1 * N / (2 * 64)) - 2)
            plans["vslash_all"] = lambda li, h: {"kind": "vslash", "vertical": 1024, "slash": 2048}
            plans["blocksparse10_all"] = lambda li, h: {"kind": "blocksparse", "topk": topk}
        if N > 32768:
            plans = {k: v for k, v in plans.items() if k in ("dense_sdpa_cudnn", "kv25_stream")}
        for name, fn in plans.items():
            torch.cuda.empty_cache()
            if fn is None or fn == "cudnn":
                m.set_attn_implementation("sdpa")
                if fn == "cudnn":
                    def run():
                        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                            return m(ids, use_cache=False, logits_to_keep=1)
                else:
                    run = lambda: m(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            else:
                headplan.apply(m, _plan(m, fn))
                run = lambda: m(ids, past_key_values=headplan.new_cache(m, N + 8), logits_to_keep=1)  # noqa: E731
            t = _time(run, reps=3 if N <= 32768 else 1, warm=1)
            rows.append({"plan": name, "N": N, "ttft_ms": t * 1e3})
            print("prefill:", json.dumps(rows[-1]), flush=True)
            m.set_attn_implementation("sdpa")
        best = min(r["ttft_ms"] for r in rows if r["N"] == N and r["plan"].startswith("dense"))
        for r in rows:
            if r["N"] == N:
                r["speedup_vs_best_dense"] = best / r["ttft_ms"]
    res["prefill"] = rows
    del m
    torch.cuda.empty_cache()


@torch.no_grad()
def section_select(res, N=32768, B=8, steps=32):
    """Issue 25: select heads (sink 128 + ring 64 + K top-scored tokens) against a static plan at the same KV
    (25%: 1 full + 7 sink 128 + window N/7 - 128 KV heads per layer), Llama-3-8B shape. Decode: batch 8, N
    context, graph-captured step, the select heads' cache filled as a prefill fills it (each 8K chunk's last
    32 random queries score what the head holds). Time to first token: batch 1, the same N-token prompt through
    the model with all-full, the static 25% plan and the select 25% plan (select heads prefill in full, so
    the difference to all-full is the selection's own cost)."""
    import headplan
    from headplan import runtime as RT

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    cfg = m.config
    kv, D, G = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    w = N // 7 - 128
    plans = {"all_full": lambda li, h: {"kind": "full"},
             "kv25_static": lambda li, h: {"kind": "full"} if h < 1 else {"kind": "streaming", "sink": 128, "alpha": w},
             "kv25_select": lambda li, h: {"kind": "full"} if h < 1 else {"kind": "select", "sink": 128, "alpha": 64,
                                                                          "keep_alpha": w - 64, "keep_beta": 0.0}}
    rows = []
    ids1 = torch.randint(0, 1000, (1, N), device="cuda")
    for name, fn in plans.items():  # time to first token, batch 1
        torch.cuda.empty_cache()
        headplan.apply(m, _plan(m, fn))
        run = lambda: m(ids1, past_key_values=headplan.new_cache(m, N + 8), logits_to_keep=1)  # noqa: E731
        rows.append({"what": "ttft", "plan": name, "N": N, "B": 1, "ms": _time(run, reps=3, warm=1) * 1e3})
        print("select:", json.dumps(rows[-1]), flush=True)
        RT.unapply(m)
    ids = torch.randint(0, 1000, (B, 1), device="cuda")
    for name in ("kv25_static", "kv25_select"):  # decode, batch B
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        headplan.apply(m, _plan(m, plans[name]))
        max_len = N + 3 * steps + 16
        cache = RT.HeadplanCache(RT.state_of(m).tables, max_len, grow=False)
        pos = torch.arange(N, device="cuda").expand(B, N)
        for layer in cache.layers:
            for s0 in range(0, N, 8192):
                e = min(N, s0 + 8192)
                k = torch.randn(B, kv, e - s0, D, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                if not layer.is_initialized:
                    layer.lazy_initialization(k, v)
                layer.seen += e - s0
                q = torch.randn(B, kv * G, 32, D, device="cuda", dtype=torch.bfloat16)
                layer.commit(k, v, pos[:, s0:e], (q, pos[:, e - 32:e], D ** -0.5))
        kept = sum(int((layer.slot_pos[0] >= 0).sum()) for layer in cache.layers) / (len(cache.layers) * kv * N)
        dstep = RT.DecodeStep(m, cache, B, max_len, graph=True)
        p = torch.full((B, 1), N, dtype=torch.long, device="cuda")

        def step():
            dstep(ids, p)
            p.add_(1)

        step()
        step()
        rows.append({"what": "decode", "plan": name, "N": N, "B": B, "ms": _timed_steps(step, steps) * 1e3,
                     "kv_kept": kept, "captures": dstep.captures, "replays": dstep.replays,
                     "peak_gb": torch.cuda.max_memory_allocated() / 1e9})
        print("select:", json.dumps(rows[-1]), flush=True)
        del cache, dstep
        RT.unapply(m)
    base = {r["what"]: r["ms"] for r in rows if r["plan"] == ("all_full" if r["what"] == "ttft" else "kv25_static")}
    print(f"\n{'what':<7} {'plan':<12} {'N':>6} {'B':>2} {'ms':>9} {'vs ref':>7} {'KV kept':>7}")
    for r in rows:
        r["vs_ref"] = r["ms"] / base[r["what"]]
        print(f"{r['what']:<7} {r['plan']:<12} {r['N']:>6} {r['B']:>2} {r['ms']:>9.2f} {r['vs_ref']:>7.3f} "
              f"{r.get('kv_kept', float('nan')):>7.3f}")
    res["select"] = rows
    del m
    torch.cuda.empty_cache()


@torch.no_grad()
def section_profile(res, N=32768, B=8):
    """torch.profiler over decode steps (dense vs kv25) and one kv25 prefill: where the time goes."""
    import headplan
    from torch.profiler import ProfilerActivity, profile

    m = _llama(32, 4096, 32, 8, 14336, 128256)
    ids = torch.randint(0, 1000, (B, 1), device="cuda")
    w = N // 7 - 128
    out = {}
    for name in ("dense_sdpa", "kv25"):
        torch.cuda.empty_cache()
        if name == "dense_sdpa":
            m.set_attn_implementation("sdpa")
            cache = _fill_dense_cache(m, B, N, torch.bfloat16)
        else:
            headplan.apply(m, _plan(m, lambda li, h: {"kind": "full"} if h < 1 else
                                    {"kind": "streaming", "sink": 128, "alpha": w}))
            cache = headplan.new_cache(m, N + 16)
            _fill_headplan_cache(m, cache, B, N, torch.bfloat16)
        m(ids, past_key_values=cache, logits_to_keep=1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                m(ids, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
        tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
        tab2 = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60)
        print(f"== {name} decode, by CUDA time ==\n{tab}\n== by CPU time ==\n{tab2}")
        out[name] = tab
        del cache
        m.set_attn_implementation("sdpa")
    res["profile"] = {"note": "tables printed"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default="correct,crossover,prefill,decode")
    ap.add_argument("--long", action="store_true", help="decode_graphs: also batch 1 at 128K")
    ap.add_argument("--no-compile", action="store_true", help="decode_graphs: skip the StaticCache + compile row")
    ap.add_argument("--steps", type=int, default=32, help="decode_graphs: timed steps per configuration")
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import triton
    res["triton"] = triton.__version__
    for s in a.sections.split(","):
        try:
            if s == "decode_graphs":
                section_decode_graphs(res, steps=a.steps, long=a.long, compile_baseline=not a.no_compile)
            else:
                globals()[f"section_{s}"](res)
        except Exception as e:  # noqa: BLE001 - keep the other sections
            import traceback
            traceback.print_exc()
            res[s] = {"error": repr(e)[:300]}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
