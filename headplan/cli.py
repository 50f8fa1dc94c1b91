"""The `headplan` command: a thin Typer shell over headplan.api.

Bad input prints one line on stderr and exits 2; `check` exits 1 when the plan drifted.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import HeadplanError
from .plan import DYNAMIC_KINDS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-head sparse attention plans: profile -> search -> apply -> eval.")

ModelArg = typer.Argument("smollm2-135m", help="smollm2-135m | HF directory | file.gguf | random:<family> | "
                                               "random:<config.json>")
TextOpt = typer.Option(None, "--text", help="Haystack text file (repeatable); default: pydoc_data/topics.py")
ExcludeKindsOpt = typer.Option(None, "--exclude-kinds", help="Pattern kinds never to use, e.g. vslash,blocksparse")
GranularityOpt = typer.Option("kv_head", "--granularity", help="kv_head: a pattern per KV head | layer: one pattern "
                              "for every KV head of a layer (same budgets, solved over layers)")
FormatWindowsOpt = typer.Option(None, "--format-windows", help="Only candidates this export format can express: "
                                "hf-layer-types | trtllm (both with --granularity layer) | duo-tsv")
MaxLengthOpt = typer.Option(None, "--max-length", help="Density and KV budget also hold at every length up to this "
                            "one, beyond the profiled lengths (e.g. 8k; default: the profiled lengths only)")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16")
DeviceOpt = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N")


def Flag(default: bool | None, decls: str, help: str, **kw):
    """A boolean option as an on/off flag pair (``--x/--no-x``), shown without a value in --help."""
    return typer.Option(default, decls, help=help, metavar="", **kw)


ShrinkOpt = Flag(False, "--shrink-worths/--no-shrink-worths", "Plan in the loop: shrink the measured head worths "
                 "toward their mean, so no head is free (holds longer contexts better, keeps less retrieval)")
WindowsOpt = Flag(True, "--profile-windows/--no-profile-windows", "Plan in the loop: keep each round's full heads "
                  "and re-choose the other heads' windows from the profile's own costs, which see length (default on; "
                  "off: the rounds' own windows, tuned at the calibration length)")
SelectRestOpt = Flag(True, "--select-rest/--no-select-rest", "Plan in the loop: also score each round's full heads "
                     "with every other head a select head (round<r>s), kept if validation prefers it; only where the "
                     "density budget pays the select heads' full prefill (default on)")


def _version(value: bool):
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("headplan")
        except PackageNotFoundError:  # run from a source tree that is not installed
            from . import __version__ as v
        typer.echo(f"headplan {v}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = Flag(False, "--version", "Print the version and exit", callback=_version,
                                 is_eager=True)):
    """Per-head sparse attention plans: profile -> search -> apply -> eval."""


def _err(msg: str) -> None:
    sys.stderr.write(f"headplan: error: {msg}\n")


def handles_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except HeadplanError as e:
            _err(str(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
    return wrapper


def _reporter():
    from .progress import RichReporter

    return RichReporter()


def _console():
    from rich.console import Console

    return Console(emoji=False)


@app.command()
@handles_errors
def profile(model: str = ModelArg,
            out: Path = typer.Option(Path("profile.safetensors"), "--out", "-o", help="Output .safetensors"),
            lengths: Optional[str] = typer.Option(None, help="Comma-separated lengths, e.g. 1024,2048 or 2k,4k "
                                                  "(k = 1024; default 2048,4096, those that fit the model)"),
            samples: Optional[int] = typer.Option(None, help="Samples per length (default: from the data spec)"),
            data: Optional[str] = typer.Option(None, help="Calibration mixture YAML (path or name in "
                                               "calibration_data/; default: gradient.yaml with --method gradient, "
                                               "else profile.yaml)"),
            text: Optional[list[str]] = TextOpt,
            candidates: str = typer.Option("default", help="Candidate set: default | small"),
            method: str = typer.Option("recall", "--method", help="recall | gradient | mse, or a weighted combination: "
                                                                   "gradient,recall or gradient=0.7,recall=0.3"),
            resume: Optional[Path] = typer.Option(None, "--resume", help="Directory for per-sample statistics: a "
                                                  "killed run started with the same --resume continues"),
            plot: bool = Flag(False, "--plot/--no-plot", "Write a PNG heat map (layers x KV heads) beside --out "
                              "and print the most retrieval-like heads"),
            device_map: Optional[str] = typer.Option(None, "--device-map", help="auto: spread the model over the "
                                                                                 "available devices (accelerate)"),
            checkpointing: Optional[bool] = Flag(None, "--checkpointing/--no-checkpointing",
                                                 "Gradient checkpointing for --method gradient "
                                                 "(default: on for CUDA)"),
            dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Measure what every KV head would cost under each candidate pattern, at several lengths.

    Under torchrun (WORLD_SIZE > 1) the samples are split over the ranks; rank 0 writes the profile.
    """
    from .api import do_profile
    from .profile import dist_env

    res = do_profile(model, out, lengths=lengths, samples=samples, data=data, texts=text, candidates=candidates,
                     dtype=dtype, device=device, reporter=_reporter(), method=method, resume=resume,
                     plot=plot or None, device_map=device_map, checkpointing=checkpointing)
    prof, path = res
    if dist_env()[0] != 0:
        return
    con = _console()
    if plot and res.heads:
        from rich.table import Table

        t = Table(title=f"most retrieval-like KV heads (largest loss under {res.heads[0]['candidate']})")
        cols = ["rank", "layer", "kv_head", "loss"] + [s for s in prof.parts if len(prof.parts) > 1]
        for c in cols:
            t.add_column(c, justify="right")
        for h in res.heads:
            t.add_row(*[f"{h[c]:.4g}" if isinstance(h[c], float) else str(h[c]) for c in cols])
        con.print(t)
        con.print(f"heat map -> {res.plot}")
    con.print(f"profile ({prof.method}): {len(prof.candidates)} candidates x {prof.model.num_layers} layers x "
              f"{prof.model.num_kv_heads} KV heads at lengths {list(prof.lengths)} -> {path}")


@app.command()
@handles_errors
def search(profile_path: Path = typer.Argument(..., metavar="PROFILE", help="Profile .safetensors"),
           out: Path = typer.Option(Path("plan.yaml"), "--out", "-o", help="Output plan .yaml"),
           density: Optional[float] = typer.Option(0.25, help="Max average attention density at every length"),
           kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="Max average KV share kept"),
           lengths: Optional[str] = typer.Option(None, help="Subset of profiled lengths to constrain"),
           latency_budget: Optional[str] = typer.Option(None, "--latency-budget",
                                                        help="Max predicted prefill MS@LENGTH, e.g. 300@32k"),
           memory_budget: Optional[str] = typer.Option(None, "--memory-budget",
                                                       help="Max KV cache GB@BATCHxLENGTH, e.g. 20@8x32k"),
           cost_table: Optional[str] = typer.Option(None, "--cost-table",
                                                    help="Cost table YAML (headplan costmodel measure) or 'analytic'"),
           max_patterns: Optional[int] = typer.Option(None, "--max-patterns-per-layer",
                                                      help="At most this many distinct patterns in a layer"),
           validate_lengths: Optional[str] = typer.Option(None, "--validate-lengths",
                                                          help="Profiled lengths held out for validation"),
           pareto_points: int = typer.Option(0, "--pareto", help="Also write the Pareto front (N points) beside --out"),
           tune_trials: int = typer.Option(0, "--tune", help="Optuna trials over global knobs (0 = off)"),
           study: Optional[Path] = typer.Option(None, "--study", help="sqlite file: resumable Optuna study"),
           signals: Optional[str] = typer.Option(None, "--signals", help="Re-weight the profile's stored signals, "
                                                                          "e.g. gradient=0.3,recall=0.7"),
           exclude_kinds: Optional[str] = ExcludeKindsOpt,
           keep: Optional[str] = typer.Option(None, "--keep", help="Epsilon-constraint: keep a stored signal's loss "
                                                                   "within SLACK x its own optimum under the same "
                                                                   "budgets, e.g. recall=1.2"),
           full_heads: Optional[int] = typer.Option(None, "--full-heads", help="Exactly this many KV heads full "
                                                                              "(e.g. with --exclude-kinds for "
                                                                              "retrieval heads + windows)"),
           max_length: Optional[str] = MaxLengthOpt,
           granularity: str = GranularityOpt, format_windows: Optional[str] = FormatWindowsOpt):
    """Assign each KV head a pattern: least profiled loss within the budgets (exact)."""
    from .api import do_search

    plan = do_search(profile_path, out, density=density, kv_budget=kv_budget, lengths=lengths,
                     latency_budget=latency_budget, memory_budget=memory_budget, cost_table=cost_table,
                     max_patterns_per_layer=max_patterns, validate_lengths=validate_lengths,
                     pareto_points=pareto_points, tune_trials=tune_trials, study=str(study) if study else None,
                     signals=signals, exclude_kinds=exclude_kinds, keep=keep, full_heads=full_heads,
                     max_length=max_length, granularity=granularity, format_windows=format_windows)
    b = plan.budget
    msg = (f"plan -> {out}: {plan.counts()}; density {', '.join(f'{x:.3f}' for x in b.achieved_density)} "
           f"and KV {', '.join(f'{x:.3f}' for x in b.achieved_kv)} at lengths {list(b.lengths)}")
    pred = plan.provenance["search"].get("predicted_prefill_ms")
    if pred is not None:
        msg += f"; predicted prefill {pred:.2f} ms"
    _console().print(msg)


@app.command()
@handles_errors
def refine(model: str = ModelArg,
           profile_path: Path = typer.Argument(..., metavar="PROFILE", help="Profile .safetensors (with recall)"),
           out: Path = typer.Option(Path("plan.yaml"), "--out", "-o", help="Output plan .yaml"),
           density: Optional[float] = typer.Option(0.25, help="Max average attention density at every length"),
           kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="Max average KV share kept"),
           lengths: Optional[str] = typer.Option(None, help="Subset of profiled lengths to constrain"),
           rounds: int = typer.Option(2, "--rounds", help="Plan-in-the-loop rounds"),
           data: Optional[str] = typer.Option(None, help="Calibration mixture YAML (default: the profile's)"),
           samples: Optional[int] = typer.Option(None, help="Calibration samples (default: the mixture's gates.samples)"),
           validate: bool = Flag(True, "--validate/--no-validate", "Score every round on held-out validation samples "
                                 "and keep the best (else the last round)"),
           exclude_kinds: Optional[str] = ExcludeKindsOpt,
           validate_lengths: Optional[str] = typer.Option(None, "--validate-lengths", help="Score the rounds at "
                                                          "these lengths (default: the calibration length), e.g. "
                                                          "one longer than profiled"),
           shrink_worths: bool = ShrinkOpt, profile_windows: bool = WindowsOpt,
           select_rest: bool = SelectRestOpt, max_length: Optional[str] = MaxLengthOpt,
           granularity: str = GranularityOpt, format_windows: Optional[str] = FormatWindowsOpt,
           text: Optional[list[str]] = TextOpt, dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Search, then re-measure every head with the plan applied and re-solve (plan in the loop)."""
    from .api import do_refine

    plan, hist = do_refine(model, profile_path, out, density=density, kv_budget=kv_budget, lengths=lengths,
                           rounds=rounds, data=data, samples=samples, validate=validate, exclude_kinds=exclude_kinds,
                           validate_lengths=validate_lengths, shrink_worths=shrink_worths,
                           profile_windows=profile_windows, select_rest=select_rest, max_length=max_length,
                           granularity=granularity, format_windows=format_windows,
                           texts=text, dtype=dtype,
                           device=device, reporter=_reporter())
    kept = plan.provenance["search"]["refine"]["kept"]
    b = plan.budget
    _console().print(f"plan -> {out}: {plan.counts()} (kept {kept} of {len(hist)}); density "
                     f"{', '.join(f'{x:.3f}' for x in b.achieved_density)} and KV "
                     f"{', '.join(f'{x:.3f}' for x in b.achieved_kv)} at lengths {list(b.lengths)}")


costmodel_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Measure and check the hardware cost model.")
app.add_typer(costmodel_app, name="costmodel")


@costmodel_app.command("measure")
@handles_errors
def costmodel_measure(out: Path = typer.Option(Path("cost.yaml"), "--out", "-o"),
                      head_dim: int = typer.Option(128, "--head-dim"),
                      group: int = typer.Option(4, "--group", help="Query heads per KV head"),
                      lengths: str = typer.Option("4096,16384,32768")):
    """Time the kernels on this GPU over a grid and fit the cost table."""
    from .api import do_costmodel_measure

    t = do_costmodel_measure(out, head_dim=head_dim, group=group, lengths=lengths, reporter=_reporter())
    _console().print(f"cost table for {t.device.get('name')} -> {out}")
    if t.dense_per_pair_ns > 0:
        _console().print(f"dense library {t.dense_per_pair_ns * 1e3:.3f} ps/pair vs sparse kernel full heads "
                         f"{t.per_pair_ns['full'] * 1e3:.3f} ps/pair; splitting a layer costs {t.route_fixed_us:.0f} us"
                         f" + {t.route_ns_per_token:.2f} ns per token per KV head (apply(cost_table=...) routes by it)")


@costmodel_app.command("validate")
@handles_errors
def costmodel_validate(table: str = typer.Option(..., "--table", help="Cost table YAML or 'analytic'"),
                       plans: int = typer.Option(20, "--plans"), head_dim: int = typer.Option(128, "--head-dim"),
                       group: int = typer.Option(4, "--group"),
                       as_json: bool = Flag(False, "--json/--no-json", "Print JSON instead of a summary")):
    """Predicted vs measured prefill latency on random plans (needs the GPU)."""
    from .api import do_costmodel_validate

    rows, s = do_costmodel_validate(table, plans=plans, head_dim=head_dim, group=group)
    if as_json:
        sys.stdout.write(json.dumps({"rows": rows, "summary": s}, indent=2) + "\n")
    else:
        _console().print(s)


@app.command()
@handles_errors
def apply(model: str = ModelArg,
          plan: Path = typer.Argument(..., help="Plan .yaml"),
          prompt: Optional[str] = typer.Option(None, help="Generate from this prompt, dense and with the plan"),
          max_new_tokens: int = typer.Option(32, help="Tokens to generate with --prompt"),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Save the patched model (dir)"),
          force: bool = Flag(False, "--force/--no-force", "With --out: write into a non-empty directory that is "
                             "not a headplan output (nothing else there is removed)"),
          dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Patch MODEL to run PLAN; optionally generate text and save the patched model."""
    from .api import do_apply

    r = do_apply(model, plan, prompt=prompt, max_new_tokens=max_new_tokens, out=out, force=force, dtype=dtype,
                 device=device, reporter=_reporter())
    con = _console()
    if prompt is not None:
        con.print(f"[bold]dense:[/bold] {r['dense']}")
        con.print(f"[bold]plan :[/bold] {r['plan']}")
    if out is not None:
        con.print(f"patched model -> {out} (load with headplan.load_patched('{out}'))")
    if prompt is None and out is None:
        con.print(f"plan {plan} fits {model}: {r['counts']} (use --prompt to generate, --out to save)")


def _vs_dense(v: float, d: float) -> str:
    """Relative change against dense, e.g. +36%."""
    return f"{100 * (v / d - 1):+.0f}%" if d else ""


def _eval_table(res: dict):
    """Dense and every evaluated method, columns named by method; perplexity and answer NLL also relative
    to dense (a `vs dense` column with one method, in the cells with several)."""
    from rich.table import Table

    names = [m["name"] for m in res["methods"]]
    one = len(names) == 1
    t = Table(title="dense vs " + ", ".join(names) + ("" if one else " (same budget)"))
    for c in ("metric", "length", "dense", *names, *(["vs dense"] if one else [])):
        t.add_column(c, justify="right" if c != "metric" else "left")

    def row(metric, n, dense, vals, fmt, rel=False):
        cells = [fmt.format(vals[m]) for m in names]
        extra = []
        if rel and one:
            extra = [_vs_dense(vals[names[0]], dense)]
        elif rel:
            cells = [f"{c} ({_vs_dense(vals[m], dense)})" for c, m in zip(cells, names)]
        elif one:
            extra = [""]
        t.add_row(metric, str(n), dense if isinstance(dense, str) else fmt.format(dense), *cells, *extra)

    for r in res["perplexity"]:
        by = r["methods"]
        row("perplexity", r["length"], r["ppl_dense"], {m: by[m]["ppl"] for m in names}, "{:.3f}", rel=True)
        row("KL(dense||method)", r["length"], "0", {m: by[m]["kl"] for m in names}, "{:.4f}")
        row("top-1 agreement", r["length"], "1", {m: by[m]["top1_agree"] for m in names}, "{:.3f}")
    for r in res["retrieval"]:
        row(f"{r['task']} accuracy (n={r['samples']})", r["length"], r["acc"]["dense"], r["acc"], "{:.2f}")
        if r.get("answer_nll"):
            row(f"{r['task']} answer NLL", r["length"], r["answer_nll"]["dense"], r["answer_nll"], "{:.3f}", rel=True)
    for r in res.get("ruler", []):
        row(f"RULER {r['task']} (%, n={r['samples']})", r["length"], 100 * r["score"]["dense"],
            {m: 100 * r["score"][m] for m in names}, "{:.1f}")
    info = {m["name"]: m for m in res["methods"]}
    for j, b in enumerate(res["budget"]):
        row("density / KV kept", b["length"], "1.000 / 1.000",
            {m: f"{info[m]['budget'][j]['density']:.3f} / {info[m]['budget'][j]['kv_share']:.3f}" for m in names}, "{}")
    for r in res.get("kv_cache_measured", []):
        kb = r.get("kv_bytes") or {}
        if kb.get("dense") and all(kb.get(m) is not None for m in names):
            row("KV cache held (MB, allocated)", r["length"], kb["dense"] / 1e6, {m: kb[m] / 1e6 for m in names},
                "{:.1f}")
    return t


@app.command("eval")
@handles_errors
def eval_cmd(model: str = ModelArg,
             plan: list[str] = typer.Option(..., "--plan", help="Plan .yaml (repeatable: several budgets in one "
                                                                "run, dense measured once); NAME=PLAN.yaml names "
                                                                "the method (e.g. a plan from `headplan baselines`)"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for eval.json (and baselines/)"),
             data: Optional[str] = typer.Option(None, help="Eval spec YAML (path or name in calibration_data/)"),
             text: Optional[list[str]] = TextOpt,
             baselines: bool = Flag(False, "--baselines/--no-baselines", "Also evaluate streaming, duo, moa and "
                                    "random plans built from the same profile at the same budget"),
             baseline_names: Optional[str] = typer.Option(None, "--baseline-names",
                                                          help="Comma-separated subset of streaming,duo,moa,random,snapkv,pyramidkv,adakv,duo-otf "
                                                               "(implies --baselines)"),
             profile_path: Optional[Path] = typer.Option(None, "--profile", help="Profile for --baselines (default: "
                                                                                 "the plan's provenance.profile.path)"),
             seed: int = typer.Option(0, "--seed", help="Seed of the random baseline"),
             lengths: Optional[str] = typer.Option(None, "--lengths", help="Replace the eval spec's lengths "
                                                   "(every task), e.g. 1k,2k (k = 1024)"),
             samples: Optional[int] = typer.Option(None, "--samples", help="Replace the eval spec's samples "
                                                   "(per length, or per length x depth cell)"),
             ruler: Optional[str] = typer.Option(None, "--ruler", help="lm-eval RULER tasks, comma-separated "
                                                 "(offline ones: niah_single_1, niah_multikey_2, niah_multikey_3, vt, "
                                                 "cwe, fwe); needs pip install 'headplan[ruler]'"),
             ruler_lengths: Optional[str] = typer.Option(None, "--ruler-lengths", help="RULER lengths (default "
                                                         "4096, or the model's positions if fewer), e.g. 1k,4k"),
             ruler_samples: Optional[int] = typer.Option(None, "--ruler-samples", help="RULER samples per task "
                                                         "and length (default 10)"),
             ruler_gen_tokens: Optional[int] = typer.Option(None, "--ruler-gen-tokens", help="Tokens generated "
                                                            "per RULER answer (default: each task's own, 30-128)"),
             ruler_only: bool = Flag(False, "--ruler-only/--no-ruler-only", "Run only the RULER tasks, not the "
                                     "eval spec's own"),
             as_json: bool = Flag(False, "--json/--no-json", "Print JSON instead of a table"),
             dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Dense vs plan on held-out samples: perplexity, KL, top-1, retrieval grids; --baselines adds
    streaming, duo, moa and random plans at the same budget, side by side; --ruler adds lm-eval's RULER tasks."""
    from .api import do_eval

    which = baseline_names if baseline_names else (True if baselines else None)
    res = do_eval(model, plan if len(plan) > 1 else plan[0], out, data=data, texts=text, dtype=dtype, device=device,
                  reporter=_reporter(), baselines=which, profile=profile_path, seed=seed, lengths=lengths,
                  samples=samples, ruler=ruler, ruler_lengths=ruler_lengths, ruler_samples=ruler_samples,
                  ruler_gen_tokens=ruler_gen_tokens, ruler_only=ruler_only)
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, sort_keys=True) + "\n")
    else:
        _console().print(_eval_table(res))
        for c in res.get("continuations", [])[:2]:
            _console().print(f"[bold]…{c['prompt_tail'][-80:]!r}[/bold]")
            _console().print(f"  dense: {c['dense']!r}")
            for m, v in c["methods"].items():
                _console().print(f"  {m}: {v!r}")


@app.command("select")
@handles_errors
def select_cmd(model: str = ModelArg,
               profile_path: Path = typer.Option(..., "--profile", help="Profile (.safetensors) to search from"),
               out: Path = typer.Option(..., "--out", "-o", help="Output plan .yaml (the chosen candidate)"),
               density: Optional[float] = typer.Option(None, "--density", help="Max average attention density "
                                                                               "(default 0.25 without --kv-budget)"),
               kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="Max average KV share kept"),
               lengths: Optional[str] = typer.Option(None, "--lengths", help="Profiled lengths to search and "
                                                                             "validate at (default: all)"),
               signals: Optional[str] = typer.Option(None, "--signals", help="Re-weight the profile's stored signals"),
               tolerance: float = typer.Option(0.02, "--tolerance", help="Relative perplexity slack allowed against "
                                                                         "the candidate with the best lm loss"),
               data: Optional[str] = typer.Option(None, help="Validation mixture YAML (default: select)"),
               samples: Optional[int] = typer.Option(None, "--samples", help="Validation samples per length"),
               max_ppl_increase: Optional[float] = typer.Option(
                   None, "--max-ppl-increase", help="Budget at quality: find the cheapest density at which a plan "
                   "keeps validation perplexity within this fraction of dense (e.g. 0.05), and the density each "
                   "baseline needs for the same (ignores --density/--kv-budget)"),
               max_answer_nll_increase: Optional[float] = typer.Option(
                   None, "--max-answer-nll-increase", help="With --max-ppl-increase: answer NLL at most dense's + "
                   "this many nats"),
               refine: int = typer.Option(2, "--refine", help="With --max-ppl-increase: plan-in-the-loop rounds of "
                                          "the 'refined' family member at each budget (0 = the search family only)"),
               max_length: Optional[str] = MaxLengthOpt,
               granularity: str = GranularityOpt, format_windows: Optional[str] = FormatWindowsOpt,
               text: Optional[list[str]] = TextOpt, dtype: str = DtypeOpt, device: str = DeviceOpt):
    """Search a family of plans at one budget (plain search, windows only, K full heads + windows), run each
    on validation samples, keep the best answerer within --tolerance of the best perplexity. With
    --max-ppl-increase: the cheapest budget that meets that quality, beside what each baseline needs."""
    from rich.table import Table

    from .api import DEFAULT_DENSITY, do_select, do_select_at_quality

    if max_ppl_increase is not None:
        plan, budgets = do_select_at_quality(
            model, profile_path, out, max_ppl_increase=max_ppl_increase,
            max_answer_nll_increase=max_answer_nll_increase, lengths=lengths, signals=signals, tolerance=tolerance,
            data=data, samples=samples, texts=text, dtype=dtype, device=device, reporter=_reporter(), refine=refine,
            granularity=granularity, format_windows=format_windows)
        t = Table(title=f"cheapest budget with ppl <= dense +{100 * max_ppl_increase:g}%"
                  + (f", answer NLL <= dense + {max_answer_nll_increase:g}" if max_answer_nll_increase is not None
                     else ""))
        for c in ("method", "density budget", "KV share", "ppl vs dense", "answer NLL"):
            t.add_column(c)
        for m, b in budgets.items():
            meas = b.get("measured") or {}
            t.add_row(m, "not met" if b["density"] is None else f"{b['density']:g}",
                      "" if b["kv_share"] is None else f"{b['kv_share']:.3f}",
                      f"{100 * (meas['ppl_vs_dense'] - 1):+.1f}%" if meas else "",
                      f"{meas['answer_nll']:.3f}" if meas else "")
        _console().print(t)
        _console().print(f"plan -> {out}: {budgets['headplan']['member']} ({plan.counts()})")
        return

    dens = density if (density is not None or kv_budget is not None) else DEFAULT_DENSITY
    plan, table = do_select(model, profile_path, out, density=dens, kv_budget=kv_budget, lengths=lengths,
                            signals=signals, tolerance=tolerance, data=data, samples=samples, texts=text,
                            dtype=dtype, device=device, reporter=_reporter(), max_length=max_length,
                            granularity=granularity, format_windows=format_windows)
    sel = plan.provenance["selection"]
    _console().print(_validation_table(table, sel["chosen"],
                                       f"validation at {', '.join(map(str, sel['lengths']))} tokens (* = chosen)"))
    _console().print(f"plan -> {out}: {sel['chosen']} ({plan.counts()})")


def _validation_table(table: dict, chosen, title: str):
    """The measured candidates (``select``'s family or plan in the loop's rounds) and the one the rule kept."""
    from rich.table import Table

    t = Table(title=title)
    for c in ("candidate", "ppl vs dense", "answer NLL", "patterns"):
        t.add_column(c)
    measured = {str(m) for m, row in table.items() if isinstance(row, dict) and "ppl_vs_dense" in row}
    base = str(chosen)[:-1] if str(chosen) not in measured and str(chosen).endswith("w") else str(chosen)
    for m, row in table.items():
        if not isinstance(row, dict) or "ppl_vs_dense" not in row:
            continue
        t.add_row(("* " if str(m) == base else "") + str(m), f"{100 * (row['ppl_vs_dense'] - 1):+.1f}%",
                  f"{row['answer_nll']:.3f}", ", ".join(f"{k} {v}" for k, v in (row.get("counts") or {}).items()))
    if base != str(chosen):
        counts = ", ".join(f"{k} {v}" for k, v in ((table.get(chosen) or {}).get("counts") or {}).items())
        t.caption = (f"kept {chosen}: {base}'s full heads, every other head's window re-chosen from the profile "
                     f"(--profile-windows){': ' + counts if counts else ''}")
    return t


@app.command("baselines")
@handles_errors
def baselines_cmd(plan: Path = typer.Argument(..., metavar="PLAN", help="The plan whose budget the baselines meet"),
                  out: Path = typer.Option(..., "--out", "-o", help="Directory for <name>.yaml"),
                  names: Optional[str] = typer.Option(None, "--names", help="Comma-separated subset of "
                                                                             "streaming,duo,moa,random,snapkv,pyramidkv,adakv,duo-otf"),
                  profile_path: Optional[Path] = typer.Option(None, "--profile", help="Profile (default: the "
                                                                                      "plan's provenance.profile.path)"),
                  seed: int = typer.Option(0, "--seed", help="Seed of the random baseline")):
    """Write the baseline plans at PLAN's budget (streaming, duo, moa, random) without evaluating them;
    evaluate them later with `headplan eval --plan NAME=FILE`."""
    from .api import do_baselines

    for name, f in do_baselines(plan, out, names=names, profile=profile_path, seed=seed).items():
        _console().print(f"{name} -> {f}")


@app.command("report")
@handles_errors
def report_cmd(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run or eval directory (eval.json)"),
               out: Path = typer.Option(..., "--out", "-o", help="Directory for report.md, report.html and PNGs")):
    """Markdown + HTML report with PNGs: retrieval heat maps, quality vs density, head map, Pareto front."""
    from .api import do_report

    r = do_report(run_dir, out)
    _console().print(f"report -> {r['markdown']} and {r['html']} ({len(r['images'])} images)")


@app.command()
@handles_errors
def run(model: str = ModelArg,
        out: Path = typer.Option(Path("headplan-run"), "--out", "-o", help="Output directory"),
        density: Optional[float] = typer.Option(None, help="Attention density budget (default: none; with "
                                                "neither budget given, --kv-budget 0.25)"),
        kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="KV share budget (default 0.25 when "
                                                  "--density is not given either)"),
        lengths: Optional[str] = typer.Option(None, help="Profiled lengths, e.g. 2k,4k (k = 1024; default "
                                              "2048,4096, those that fit the model)"),
        samples: Optional[int] = typer.Option(None, help="Calibration samples per length"),
        data: Optional[str] = typer.Option(None, help="Calibration mixture YAML"),
        eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Eval spec YAML"),
        text: Optional[list[str]] = TextOpt,
        candidates: str = typer.Option("default", help="Candidate set: default | small"),
        method: Optional[str] = typer.Option(None, "--method", help="Profiling signal(s), as for `headplan "
                                                                    "profile` (default: recall)"),
        select: bool = Flag(False, "--select/--no-select", "Choose the plan as `headplan select` does: a family "
                            "of plans measured on validation samples"),
        tolerance: float = typer.Option(0.02, "--tolerance", help="With --select: relative perplexity slack"),
        baselines: str = typer.Option("default", "--baselines", help="Baselines evaluated beside the plan at its "
                                      "budget, from the same profile: a comma list of streaming,duo,moa,random,snapkv,pyramidkv,adakv,duo-otf, "
                                      "none, or default (moa and snapkv; moa alone under a --density below 1)"),
        exclude_kinds: str = typer.Option(",".join(DYNAMIC_KINDS), "--exclude-kinds", help="Pattern kinds the plan "
                                          "leaves out (default: the dynamic ones, which keep every KV entry; "
                                          "'none' allows every kind)"),
        refine: int = typer.Option(2, "--refine", help="Plan-in-the-loop rounds after the search (as `headplan "
                                   "refine`, keeping the best round on validation samples); 0 = search only"),
        shrink_worths: bool = ShrinkOpt, profile_windows: bool = WindowsOpt, select_rest: bool = SelectRestOpt,
        max_length: Optional[str] = typer.Option(None, "--max-length", help="Density and KV budget hold at every "
                                                 "length up to this one (default: the longest eval length)"),
        granularity: str = GranularityOpt, format_windows: Optional[str] = FormatWindowsOpt,
        dtype: str = DtypeOpt, device: str = DeviceOpt):
    """The whole pipeline: profile, search (or --select), eval beside dense and the MoA-style baseline at the
    same budget; writes everything into --out."""
    from rich.table import Table

    from .api import do_run

    s = do_run(model, out, density=density, kv_budget=kv_budget, lengths=lengths, samples=samples, data=data,
               eval_data=eval_data, texts=text, dtype=dtype, device=device, reporter=_reporter(),
               candidates=candidates, select=select, tolerance=tolerance, refine=refine, exclude_kinds=exclude_kinds,
               shrink_worths=shrink_worths, profile_windows=profile_windows, select_rest=select_rest,
               max_length=max_length, granularity=granularity, format_windows=format_windows,
               baselines=None if baselines.strip().lower() in ("", "none") else baselines,
               **({"method": method} if method else {}))
    con = _console()
    if s.get("selection") and s["selection"].get("candidates"):
        what = "plan in the loop: each round" if s.get("refine_rounds") else "select: each candidate"
        con.print(_validation_table(s["selection"]["candidates"], s["selection"]["chosen"],
                                    f"{what} on validation samples (* = kept)"))
    con.print(_eval_table(s["eval"]))
    t = Table(title=f"headplan run: {model}")
    t.add_column("item")
    t.add_column("value")
    t.add_row("plan heads", ", ".join(f"{k} {v}" for k, v in s["plan_counts"].items()))
    t.add_row("profiled with", s["method"])
    if s.get("selection"):
        t.add_row("chosen by validation", s["selection"]["chosen"])
        if s.get("refine_rounds"):
            t.add_row("plan in the loop", f"{s['refine_rounds']} rounds")
    t.add_row("budget", ", ".join(f"{k} {v:g}" for k, v in (("density", s["density_budget"]),
                                                            ("KV", s["kv_budget"])) if v is not None))
    for n, d in s["achieved_density"].items():
        t.add_row(f"density / KV kept @ {n}", f"{d:.3f} / {s['achieved_kv'][n]:.3f}")
    t.add_row("wall time", f"{s['seconds']['total']:.0f} s (load {s['seconds']['load']:.0f} s, "
                           f"profile {s['seconds']['profile']:.0f} s)")
    for k, v in s["files"].items():
        t.add_row(f"{k} file", v)
    con.print(t)


@app.command()
@handles_errors
def check(plan: Path = typer.Argument(..., help="Plan .yaml to regenerate"),
          profile_path: Optional[Path] = typer.Option(None, "--profile", help="Profile (default: from provenance)"),
          root: Optional[Path] = typer.Option(None, "--root", help="Files the provenance names may lie anywhere under "
                                              "this folder (default: the plan's own folder), e.g. the repository")):
    """Regenerate PLAN from its recorded provenance; exit 1 with a diff if it drifted."""
    from .api import do_check

    ok, diff = do_check(plan, profile_path, root=root)
    if ok:
        _console().print(f"{plan}: up to date")
        return
    sys.stdout.write(diff)
    sys.stderr.write(f"headplan: {plan} differs from the regenerated plan\n")
    raise typer.Exit(1)


@app.command("export")
@handles_errors
def export_cmd(plan: Optional[Path] = typer.Argument(None, metavar="PLAN", help="Plan .yaml to export"),
               fmt: Optional[str] = typer.Option(None, "--format", "-f", help="hf-layer-types | trtllm | duo-tsv"),
               out: Path = typer.Option(..., "--out", "-o", help="Folder for the format's files (with --from-duo: "
                                                                 "the plan .yaml to write)"),
               project: bool = Flag(False, "--project/--no-project", "Export the nearest plan the format can "
                                    "express (also written as projected-plan.yaml) and print both KV shares"),
               from_duo: Optional[Path] = typer.Option(None, "--from-duo", help="Import instead: a DuoAttention "
                                                       "pattern folder (full_attention_heads.tsv + config.json) "
                                                       "or its .tsv file"),
               model: Optional[str] = typer.Option(None, "--model", help="With --from-duo: the model it is for"),
               threshold: float = typer.Option(0.5, "--threshold", help="With --from-duo: full when the gate "
                                               "value is >= this"),
               keep_top: Optional[float] = typer.Option(None, "--keep-top", help="With --from-duo: the top "
                                                        "fraction of heads by gate value are full instead"),
               lengths: Optional[str] = typer.Option(None, "--lengths", help="With --from-duo: budget lengths "
                                                     "(default: the model's max positions)"),
               eval_model: Optional[str] = typer.Option(None, "--eval-model", help="With --project: also evaluate "
                                                        "the original and the projected plan on this model and "
                                                        "print their quality side by side"),
               eval_data: Optional[str] = typer.Option(None, "--eval-data", help="With --eval-model: the eval "
                                                       "spec (default: headplan eval's)")):
    """Write PLAN in a serving engine's format (hf-layer-types: config.json patch; trtllm:
    kv_cache_config.json; duo-tsv: DuoAttention's pattern folder), or import a DuoAttention pattern with
    --from-duo. A plan the format cannot express is refused (exit 2) unless --project."""
    from .export import export_command

    if (eval_model is not None or eval_data is not None) and not project:
        raise HeadplanError("--eval-model and --eval-data go with --project (they measure the projection)")
    for line in export_command(plan, fmt, out, project=project, from_duo=from_duo, model=model,
                               threshold=threshold, keep_top=keep_top, lengths=lengths):
        typer.echo(line)
    projected = Path(out) / "projected-plan.yaml"
    if eval_model is not None and projected.is_file():
        from .api import do_eval

        res = do_eval(eval_model, [f"original={plan}", f"projected={projected}"], data=eval_data,
                      reporter=_reporter())
        for line in _quality_lines(res):
            typer.echo(line)
    elif eval_model is not None:
        typer.echo("the format expresses the plan exactly: nothing projected to evaluate")


def _quality_lines(res: dict) -> list[str]:
    """One line per measured cell of an eval: dense, then each method."""
    names = [m["name"] for m in res["methods"]]
    out = [f"perplexity @ {r['length']}: dense {r['ppl_dense']:.3f}, "
           + ", ".join(f"{m} {r['methods'][m]['ppl']:.3f}" for m in names) for r in res.get("perplexity", [])]
    out += [f"{r['task']} @ {r['length']} (of {r['samples']}): dense {round(r['acc']['dense'] * r['samples'])}, "
            + ", ".join(f"{m} {round(r['acc'][m] * r['samples'])}" for m in names) for r in res.get("retrieval", [])]
    return out


def main():
    app()


if __name__ == "__main__":
    main()
