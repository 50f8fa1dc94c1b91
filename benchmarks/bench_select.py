"""Issue 25 on the GPU: retrieval at a quarter of the KV with select heads, against dense and every baseline.

    python benchmarks/bench_select.py plans --model SmolLM2.gguf --out DIR   # profile 2K/4K/8K, plan in the loop
    python benchmarks/bench_select.py eval --model SmolLM2.gguf --out DIR --settings single
    python benchmarks/bench_select.py eval --model SmolLM2.gguf --out DIR --settings after
    python benchmarks/bench_select.py commit   # the selection's own cost in one layer at 32K, profiled

``plans``: a recall profile at 2K / 4K / 8K (so the KV budget binds up to 8K) with the default candidates (select
heads among them), then `headplan refine` (plan in the loop, 2 rounds, validated) at KV budget 0.25 and no density
bound, dynamic kinds left out: the plan `headplan run --kv-budget 0.25 --density 1 --lengths 2k,4k,8k` makes.
``eval``: that plan beside streaming, duo, moa (window baselines) and snapkv, pyramidkv (selection baselines) at the
same KV share, on ``specs/quality-grid-select.yaml`` (eval seeds 1000: passkey and needle 10 per cell at 2K, 4K,
8000, perplexity at 2K / 4K / 8K) in one prompt setting (``single``: the question at the prompt's end; ``after``:
the context prefilled and compressed before the question). Prints a table; writes DIR/eval-SETTING/eval.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
BASELINES = "streaming,duo,moa,snapkv,pyramidkv,adakv,duo-otf"


def _lm(model: str):
    from headplan.models import load_model

    return load_model(model, dtype="bfloat16", device="cuda")


def plans(model: str, out: Path, kv: float) -> None:
    from headplan.api import do_profile, do_refine

    lm = _lm(model)
    t = time.time()
    do_profile(model, out / "profile.safetensors", lengths=[2048, 4096, 8192], method="recall", device="cuda",
               dtype="bfloat16", lm=lm)
    print(f"profile {time.time() - t:.0f} s")
    t = time.time()
    plan, hist = do_refine(model, out / "profile.safetensors", out / "plan.yaml", density=1.0, kv_budget=kv,
                           rounds=2, validate=True, exclude_kinds="vslash,blocksparse", lm=lm, device="cuda",
                           dtype="bfloat16")
    print(f"refine {time.time() - t:.0f} s: kept {plan.provenance['search']['refine']['kept']} {plan.counts()}")
    for h in hist:
        print(" ", h["round"], h["counts"], {k: round(v, 4) for k, v in h.get("measured", {}).items()
                                             if isinstance(v, float)})


def evaluate(model: str, out: Path, setting: str, samples: int | None = None, baselines: str = BASELINES,
             tasks: str = "perplexity,passkey,needle") -> None:
    """One do_eval per task (so what finished is printed even if a later task runs out of time)."""
    from headplan.api import do_eval

    full = yaml.safe_load((HERE / "specs" / "quality-grid-select.yaml").read_text())
    lm = _lm(model)
    for task in tasks.split(","):
        if task == "perplexity" and "single" not in setting.split(","):
            continue  # perplexity has no question: measured once, with the single setting
        spec = {k: v for k, v in full.items() if k in ("name", "seed", task)}
        if task != "perplexity":
            spec[task]["settings"] = setting.split(",")
            if samples:  # per depth (5 depths a cell)
                spec[task]["samples"] = samples
        tag = f"{task}-{setting.replace(',', '+')}"
        f = out / f"spec-{tag}.yaml"
        f.write_text(yaml.safe_dump(spec))
        t = time.time()
        res = do_eval(model, out / "plan.yaml", out / f"eval-{tag}", data=str(f), baselines=baselines,
                      profile=out / "profile.safetensors", lm=lm, device="cuda", dtype="bfloat16")
        print(f"eval {tag}: {time.time() - t:.0f} s")
        _table(res)


def _table(res) -> None:
    names = [m["name"] for m in res["methods"]]
    print("| measure | dense | " + " | ".join(names) + " |")
    for r in res.get("perplexity", []):
        print(f"| ppl {r['length']} | {r['ppl_dense']:.2f} | "
              + " | ".join(f"{r['methods'][m]['ppl']:.2f}" for m in names) + " |")
    for r in res.get("retrieval", []):
        a = r["acc"]
        print(f"| {r['task']} {r['length']} (of {r['samples']}) | {round(a['dense'] * r['samples'])} | "
              + " | ".join(str(round(a[m] * r["samples"])) for m in names) + " |")
    for n in sorted({b["length"] for m in res["methods"] for b in m["budget"]}):
        print(f"| KV kept {n} | 1 | " + " | ".join(
            f"{next(b['kv_share'] for b in m['budget'] if b['length'] == n):.3f}" for m in res["methods"]) + " |",
            flush=True)


def commit(N: int = 32768) -> None:
    """The selection's own cost: one Llama-3-8B-shaped layer (32 query / 8 KV heads, D 128, bf16) committing an
    N-token first prefill, 1 full + 7 select heads (sink 128, ring 64, keep N/7 - 192) against 1 full + 7
    streaming heads (sink 128 + window N/7 - 128) at the same KV. Median of 20, then the profiler's top kernels."""
    import torch

    from headplan.kernels import patterns as P
    from headplan.runtime.cache import HeadplanLayer

    w = N // 7 - 128
    rows = {"static": [{"kind": "full"}] + [{"kind": "streaming", "sink": 128, "alpha": w}] * 7,
            "select": [{"kind": "full"}] + [{"kind": "select", "sink": 128, "alpha": 64, "keep_alpha": w - 64}] * 7}
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v, q = torch.randn_like(k), torch.randn(1, 32, N, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    obs = (q, torch.arange(N, device="cuda")[None], 128 ** -0.5)
    for name, r in rows.items():
        layer = HeadplanLayer(P.make_table(r), N + 8)

        def run():
            layer.clear() if layer.is_initialized else None
            layer.update(k, v)
            layer.commit_contiguous(k, v, obs)

        for _ in range(3):
            run()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            run()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        print(f"commit {name}: {sorted(ts)[10] * 1e3:.3f} ms per layer", flush=True)
        if name == "select":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("plans", "eval", "commit"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("select-out"))
    ap.add_argument("--kv", type=float, default=0.25)
    ap.add_argument("--settings", default="single", help="comma list of single, after, after-context")
    ap.add_argument("--samples", type=int, default=None, help="eval: samples per depth (spec: 2)")
    ap.add_argument("--baselines", default=BASELINES, help="eval: comma list of baselines")
    ap.add_argument("--tasks", default="perplexity,passkey,needle", help="eval: comma list, one do_eval each")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "commit":
        commit()
    elif a.what == "plans":
        plans(a.model, a.out, a.kv)
    else:
        evaluate(a.model, a.out, a.settings, a.samples, a.baselines, a.tasks)


if __name__ == "__main__":
    main()
