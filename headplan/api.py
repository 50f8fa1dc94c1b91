"""The Python API behind each CLI verb: profile, search, select, apply, eval, baselines, report, run, check.

Every function takes plain values and paths, validates its inputs before writing anything, and
writes outputs atomically (temporary file + rename; an output directory staged beside and swapped in).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from .candidates import candidate_set
from .errors import HeadplanError, PlanError
from .files import staged_dir
from .plan import Plan, atomic_write, load_plan, save_plan
from .args import (DEFAULT_LENGTHS, _baseline_names, _check_out, _signal_weights, fit_lengths,  # noqa: F401
                   check_budget, keep_pairs, named_plans, optional_length, optional_lengths, parse_length,
                   parse_lengths, pattern_kinds, whole_number)
from .progress import Reporter

DEFAULT_DENSITY = 0.25
DEFAULT_RUN_METHOD = "recall"  # the profiling signal(s) of `headplan run`
DEFAULT_REFINE_ROUNDS = 2  # plan-in-the-loop rounds of `headplan run` (0 = the profile's search alone); measured:
# a third round was never the one kept on validation (README Results, issue 15)
DEFAULT_PROFILE_WINDOWS = True  # plan in the loop keeps each round's full heads and re-chooses the other windows
# from the profile's costs (`--profile-windows`); measured on validation seeds at 2K-8K, the rounds' own windows
# (tuned at the 1K calibration length) cost +29% perplexity at 8K against the MoA-style baseline (README Results)
DEFAULT_RUN_EXCLUDE = "vslash,blocksparse"  # kinds `headplan run` leaves out of its plan: dynamic heads keep every KV
# entry (and decode as full); measured on validation seeds, the plan without them kept the same passkeys at
# 0.44x the KV and a better perplexity at 4K (README Results, issue 15)


class ProfileResult(tuple):
    """``(profile, path)`` as returned by do_profile, plus ``.heads`` (the most retrieval-like heads:
    largest loss under the short-window candidate) and ``.plot`` (the PNG written, or None)."""

    def __new__(cls, prof, path, heads, plot):
        self = super().__new__(cls, (prof, path))
        self.heads = heads
        self.plot = plot
        return self


def do_profile(model: str, out: str | Path, *, lengths=None, samples: int | None = None,
               data: str | None = None, texts: list[str] | None = None, candidates: str = "default",
               dtype: str = "float32", device: str = "cpu", block: int = 64, reporter: Reporter | None = None,
               lm=None, method: str = "recall", resume: str | Path | None = None, plot: str | Path | bool | None = None,
               device_map: str | None = None, checkpointing: bool | None = None, top_heads: int = 10):
    """Profile MODEL; returns ProfileResult (unpacks as ``prof, path``).

    method: recall | gradient | mse, or a combination ('gradient,recall', 'gradient=0.7,recall=0.3').
    Calibration data defaults to calibration_data/gradient.yaml when the method includes gradient,
    else profile.yaml. resume: directory of per-sample statistics (a killed run continues). plot:
    True (PNG beside --out) or a .png path. device_map: 'auto' dispatches the model with accelerate.
    Under torchrun (WORLD_SIZE > 1) samples are split over ranks; only rank 0 writes files.
    """
    from .data import load_task_file, load_texts
    from .models import load_model
    from .profile import dist_env, parse_method, plot_profile, profile, retrieval_heads, save_profile

    rep = reporter or Reporter()
    out = _check_out(Path(out), (".safetensors",), "profile")
    weights = parse_method(method)
    spec = load_task_file(data, "gradient" if "gradient" in weights else "profile")
    cands = candidate_set(candidates)
    if lengths is not None:
        parse_lengths(lengths)  # bad syntax fails before the model loads
    load_texts(texts)  # a missing or empty text file too
    plot_path = None
    if plot:
        plot_path = out.with_suffix(".png") if plot is True else Path(plot)
        if plot_path.suffix.lower() != ".png":
            raise HeadplanError(f"--plot output must end with .png: {plot_path}")
    if device_map is not None and device_map != "auto":
        raise HeadplanError(f"--device-map: only 'auto' is supported, got {device_map!r}")
    rank, world, local_rank = dist_env()
    if world > 1:
        if device_map is not None:
            raise HeadplanError("--device-map auto cannot be combined with torchrun data parallelism")
        if str(device).startswith("cuda"):
            device = f"cuda:{local_rank}"
        if rank != 0:
            rep = Reporter()
    if lm is None:
        lm = load_model(model, dtype=dtype, device="cpu" if device_map else device, progress=rep.log)
        if device_map:
            from accelerate import dispatch_model, infer_auto_device_map

            m = lm.model
            dmap = infer_auto_device_map(m, no_split_module_classes=getattr(m, "_no_split_modules", None) or [])
            lm.model = dispatch_model(m, device_map=dmap)
    lens = fit_lengths(lengths, lm.identity.max_positions, reporter=rep)
    prof = profile(lm, lens, cands, spec, texts, samples, block, rep, method=weights, resume=resume,
                   checkpointing=checkpointing)
    heads = retrieval_heads(prof, top_heads) if any(c.pattern.kind == "streaming" for c in cands) else []
    if rank == 0:
        save_profile(prof, out)
        if plot_path is not None:
            plot_profile(prof, plot_path)
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():  # every rank waits for rank 0's file, then the group is torn down
            dist.barrier()
            dist.destroy_process_group()
    return ProfileResult(prof, out, heads, plot_path)


def load_cost(spec: str | None, head_dim: int, group: int):
    """A cost table from a YAML path, or 'analytic' for nominal H100 rates (no GPU needed)."""
    from .costmodel import analytic, load_cost_table

    if spec is None:
        return None
    if spec == "analytic":
        return analytic(head_dim, group)
    return load_cost_table(spec)


def do_costmodel_measure(out: str | Path, *, head_dim: int = 128, group: int = 4, lengths="4096,16384,32768",
                         reporter: Reporter | None = None):
    """Time the kernels on this GPU over a grid of ``lengths``, fit the cost table and save it to OUT (.yaml).
    Returns the table."""
    from .costmodel import measure

    out = _check_out(Path(out), (".yaml", ".yml"), "cost table")
    t = measure(head_dim, group, parse_lengths(lengths), reporter or Reporter())
    t.save(out)
    return t


def do_costmodel_validate(table: str, *, plans: int = 20, head_dim: int = 128, group: int = 4):
    """Predicted vs measured prefill latency on ``plans`` random plans (needs the GPU); ``table`` is a cost
    table YAML or 'analytic'. Returns (rows, summary)."""
    from .costmodel import summary, validate

    rows = validate(load_cost(table, head_dim, group), plans)
    return rows, summary(rows)


def provenance_file(plan_path: Path, rel: str, field: str, hint: str = "give the file on the command line",
                    root: str | Path | None = None) -> Path:
    """A file a plan's provenance names, relative to the plan's folder. It must lie inside the plan's
    folder, or inside ``root`` when one is given (e.g. the repository a CI job checks out); an absolute
    path or one leading out of that folder (``..``, a link) is refused: give such a file on the command
    line instead."""
    from .plan import _short

    here = Path(plan_path).resolve().parent
    base = Path(root).resolve() if root is not None else here
    if not here.is_relative_to(base):
        raise HeadplanError(f"--root {root}: the plan {plan_path} is not inside it")
    rp = Path(rel)
    where = "the plan's folder" if root is None else f"--root {root}"
    if rp.is_absolute() or (root is None and ".." in rp.parts) or not (here / rp).resolve().is_relative_to(base):
        raise PlanError(f"{Path(plan_path).name}.{field}: {_short(rel)} is outside {where}; {hint}")
    return here / rp


def _plan_profile(path: Path, plan: Plan, profile: str | Path | None):
    """The profile a plan was searched from, and its path: ``profile`` if given, else its provenance path
    (relative to the plan's folder); refused when its digest differs from the one the plan records."""
    pref = (plan.provenance or {}).get("profile") or {}
    if profile is not None:
        pp = Path(profile)
    elif "path" in pref:
        pp = provenance_file(path, pref["path"], "provenance.profile.path", "pass --profile")
    else:
        raise HeadplanError(f"{path}: the plan records no profile path; pass --profile")
    if not pp.exists():
        raise HeadplanError(f"profile not found: {pp} (pass --profile)")
    return _recorded_profile(pp, pref), pp


def _recorded_profile(pp: Path, pref: dict):
    """The profile at ``pp``, refused when its digest differs from the one the plan records (``pref``)."""
    from .profile import load_profile

    prof = load_profile(pp)
    if pref.get("sha256") and pref["sha256"] != prof.sha256:
        raise HeadplanError(f"profile {pp} is not the one the plan was made from "
                            f"(sha256 {prof.sha256[:12]}…, plan records {pref['sha256'][:12]}…)")
    return prof


def _save_baseline(plan: Plan, out: Path, profile_path: Path, sha256: str, into: Path | None = None) -> None:
    """Save a baseline plan as ``out`` (written at ``into``, its staged place, when given), its
    provenance.profile.path made relative to ``out``'s folder."""
    from .search import profile_ref

    plan.provenance["profile"] = profile_ref(profile_path, out, sha256)
    save_plan(plan, into or out)


def _final(path: str | Path, stage: Path | None, out: str | Path) -> Path:
    """Where ``path`` will be once ``stage`` (a staged_dir of ``out``) is swapped in."""
    p, st = Path(path), stage and Path(stage).resolve()
    if st is not None and p.resolve().is_relative_to(st):
        return Path(out) / p.resolve().relative_to(st)
    return p


def _record_path(path: str | Path, out: str | Path) -> str:
    """A path as an output records it: relative to ``out`` when it lies inside (links resolved; so a
    moved or copied folder still finds it), else absolute."""
    p, o = Path(path).resolve(), Path(out).resolve()
    return p.relative_to(o).as_posix() if p.is_relative_to(o) else str(p)


def do_search(profile_path: str | Path, out: str | Path, *, density: float | None = DEFAULT_DENSITY,
              kv_budget: float | None = None, lengths=None, latency_budget: str | None = None,
              memory_budget: str | None = None, cost_table: str | None = None,
              max_patterns_per_layer: int | None = None, validate_lengths=None, pareto_points: int = 0,
              tune_trials: int = 0, study: str | None = None, signals: str | dict | None = None,
              exclude_kinds: str | list | None = None, keep: str | dict | None = None,
              full_heads: int | None = None, max_length=None, granularity: str = "kv_head",
              format_windows: str | None = None) -> Plan:
    """Search a plan; with ``pareto_points`` also writes ``<out>.pareto.csv``/``.png`` beside the plan;
    with ``tune_trials`` runs Optuna over the global knobs (``study``: sqlite file to resume)."""
    from .profile import load_profile
    from .search import (SearchSettings, parse_latency, parse_memory, pareto, profile_ref, search, tune,
                         write_pareto)
    from .search.settings import check_granularity

    out = _check_out(Path(out), (".yaml", ".yml"), "plan")
    for flag, v in (("--pareto", pareto_points), ("--tune", tune_trials)):  # before any work is written
        whole_number(flag, v)
    lat, mem = parse_latency(latency_budget), parse_memory(memory_budget)
    if density is None and kv_budget is None and lat is None and mem is None:
        raise HeadplanError("give a budget: --density, --kv-budget, --latency-budget and/or --memory-budget")
    granularity, format_windows = check_granularity(granularity, format_windows)
    prof = load_profile(profile_path)
    m = prof.model
    sig = _signal_weights(signals, "--signals")
    keep_t = keep_pairs(keep)
    kinds = pattern_kinds(exclude_kinds)
    cost = load_cost(cost_table or ("analytic" if (lat or mem) else None), m.head_dim,
                     m.num_query_heads // m.num_kv_heads)
    settings = SearchSettings(density=density, kv_budget=kv_budget,
                              lengths=optional_lengths(lengths),
                              latency_budget=lat, memory_budget=mem, max_patterns_per_layer=max_patterns_per_layer,
                              validate_lengths=optional_lengths(validate_lengths) or (),
                              signals=sig, exclude_kinds=kinds, keep=keep_t, full_heads=full_heads,
                              max_length=optional_length("--max-length", max_length), granularity=granularity,
                              format_windows=format_windows)
    ref = profile_ref(profile_path, out, prof.sha256)
    if tune_trials:
        plan, trials = tune(prof, settings, tune_trials, f"sqlite:///{Path(study).resolve()}" if study else None,
                            cost=cost)
        plan = search(prof, SearchSettings.from_dict(plan.provenance["search"]), ref, cost)
        atomic_write(out.with_suffix(".tune.json"), json.dumps(trials, indent=2, sort_keys=True, default=str))
    else:
        plan = search(prof, settings, ref, cost)
    if cost_table:
        plan.provenance["search"]["cost_table"]["path"] = cost_table if cost_table == "analytic" else \
            os.path.relpath(Path(cost_table).resolve(), out.resolve().parent)
    save_plan(plan, out)
    if pareto_points:
        rows = pareto(prof, SearchSettings.from_dict(plan.provenance["search"]), pareto_points, cost)
        write_pareto(rows, out.with_suffix(".pareto.csv"), out.with_suffix(".pareto.png"))
    return plan


def do_select(model: str, profile_path: str | Path, out: str | Path, *, density: float | None = DEFAULT_DENSITY,
              kv_budget: float | None = None, lengths=None, signals: str | dict | None = None,
              tolerance: float = 0.02, data: str | None = None, samples: int | None = None,
              texts: list[str] | None = None, dtype: str = "float32", device: str = "cpu",
              reporter: Reporter | None = None, lm=None, max_length=None, granularity: str = "kv_head",
              format_windows: str | None = None) -> tuple[Plan, dict]:
    """Search a family of plans at one budget, run each on validation samples, save the one the rule
    picks (``headplan.search.family`` builds the family, ``headplan.eval.validate`` measures it); its provenance records every candidate's measured losses.
    Returns (plan, {name: {lm_nll, answer_nll, ppl_vs_dense, counts}})."""
    from .data import load_task_file, load_texts
    from .eval.validate import check_arguments, validate
    from .models import load_model
    from .profile import load_profile
    from .search import SearchSettings, build_family, choose, profile_ref
    from .search.settings import check_granularity

    rep = reporter or Reporter()
    out = _check_out(Path(out), (".yaml", ".yml"), "plan")
    if density is None and kv_budget is None:
        raise HeadplanError("give a budget: --density and/or --kv-budget")
    granularity, format_windows = check_granularity(granularity, format_windows)
    spec = load_task_file(data, "select")
    check_arguments(spec, samples, tolerance)  # everything that needs no model or profile, first
    load_texts(texts)
    base = SearchSettings(density=density, kv_budget=kv_budget,
                          lengths=optional_lengths(lengths),
                          signals=_signal_weights(signals, "--signals"),
                          max_length=optional_length("--max-length", max_length), granularity=granularity,
                          format_windows=format_windows)
    prof = load_profile(profile_path)
    plans = build_family(prof, base, profile_ref(profile_path, out, prof.sha256))
    if lm is None:
        lm = load_model(model, dtype=dtype, device=device, progress=rep.log)
    if lm.identity.fingerprint != prof.model.fingerprint:
        raise HeadplanError(f"the profile is for another model ({prof.model_spec}) than {model}")
    vlen = base.lengths or prof.lengths
    table = validate(lm, plans, spec, vlen, texts, samples, rep)
    pick = choose(table, tolerance)
    for m, p in plans.items():
        table[m]["counts"] = p.counts()
    plan = plans[pick]
    plan.provenance["selection"] = {
        "rule": "lowest answer NLL among candidates whose lm NLL is within log1p(tolerance) of the best, unless a "
                "better answerer's extra lm NLL is under log1p(tolerance) times the answer NLL it saves",
        "tolerance": tolerance, "chosen": pick, "lengths": list(vlen),
        "data": {"name": spec.get("name"), "seed": spec.get("seed"),
                 "samples_per_length": int(samples or spec.get("samples_per_length", 4))},
        "candidates": {m: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                       for m, row in table.items()}}
    save_plan(plan, out)
    return plan, table


def do_refine(model: str, profile_path: str | Path, out: str | Path, *, density: float | None = DEFAULT_DENSITY,
              kv_budget: float | None = None, lengths=None, rounds: int = DEFAULT_REFINE_ROUNDS, data: str | None = None,
              samples: int | None = None, validate: bool = False, tolerance: float = 0.02,
              exclude_kinds: str | list | None = None, validate_lengths=None, texts: list[str] | None = None,
              dtype: str = "float32", device: str = "cpu", reporter: Reporter | None = None,
              lm=None, shrink_worths: bool = False,
              profile_windows: bool = DEFAULT_PROFILE_WINDOWS, max_length=None, granularity: str = "kv_head",
              format_windows: str | None = None) -> tuple[Plan, list[dict]]:
    """Plan in the loop (``headplan.search.refine``): search, then ``rounds`` times measure every head's worth
    with the current plan applied and re-solve at the same budget. Calibration samples: the data spec's
    gate settings (``gates:``; default the profile's own spec); ``validate`` scores every round on
    ``headplan select``'s validation samples at the calibration length (or at ``validate_lengths``, e.g. one
    longer than profiled, so the kept round is the one that holds there) and keeps the best by its rule
    (else the last round)."""
    from .data import Haystack, load_task_file, load_texts
    from .eval.validate import check_arguments
    from .eval.validate import validate as measure
    from .models import load_model
    from .profile import load_profile, reference_candidate
    from .profile.runner import gate_options, gate_sequences
    from .search import SearchSettings, profile_ref
    from .search.refine import recall_part, refine
    from .search.settings import check_granularity

    rep = reporter or Reporter()
    out = _check_out(Path(out), (".yaml", ".yml"), "plan")
    if density is None and kv_budget is None:
        raise HeadplanError("give a budget: --density and/or --kv-budget")
    granularity, format_windows = check_granularity(granularity, format_windows)
    if rounds < 1:
        raise HeadplanError(f"--rounds must be at least 1, got {rounds}")
    vspec = load_task_file(None, "select")
    vlens = optional_lengths(validate_lengths)
    if vlens and not validate:
        raise HeadplanError("--validate-lengths needs --validate")
    if validate:
        check_arguments(vspec, None, tolerance)
    text, _ = load_texts(texts)
    prof = load_profile(profile_path)
    recall_part(prof)  # a profile without recall fails before the model loads
    spec = load_task_file(data, "profile") if data else (prof.data.get("spec") or load_task_file(None, "profile"))
    opt = gate_options(spec, list(prof.lengths))
    if samples is not None:
        if whole_number("--samples", samples) < 1:
            raise HeadplanError(f"--samples must be at least 1, got {samples}")
        opt["samples"] = samples
    settings = SearchSettings(density=density, kv_budget=kv_budget, lengths=optional_lengths(lengths),
                              exclude_kinds=pattern_kinds(exclude_kinds),
                              max_length=optional_length("--max-length", max_length), granularity=granularity,
                              format_windows=format_windows)
    feasible_or_raise(list(prof.candidates), list(settings.lengths or prof.lengths), density, kv_budget, prof.model)
    if lm is None:
        lm = load_model(model, dtype=dtype, device=device, progress=rep.log)
    if lm.identity.fingerprint != prof.model.fingerprint:
        raise HeadplanError(f"the profile is for another model ({prof.model_spec}) than {model}")
    for n in vlens or ():
        if n > lm.identity.max_positions:
            raise HeadplanError(f"--validate-lengths: {n} exceeds the model's {lm.identity.max_positions} positions")
    dev = lm.model.get_input_embeddings().weight.device
    seqs = gate_sequences(lm, Haystack(lm.tokenizer, text), spec, opt["length"], opt["samples"], dev)
    ref = reference_candidate(list(prof.candidates), opt["length"])
    score = None
    if validate:  # held-out samples of `headplan select`'s mixture (its own seed) at the calibration length
        score = lambda plans: measure(lm, plans, vspec, list(vlens or [opt["length"]]), texts, None, rep)  # noqa: E731
    plan, hist = refine(lm, prof, settings, seqs, rounds, ref, score, rep, profile_ref(profile_path, out, prof.sha256),
                        tolerance, shrink_worths, profile_windows)
    save_plan(plan, out)
    return plan, hist


def do_select_at_quality(model: str, profile_path: str | Path, out: str | Path, *, max_ppl_increase: float,
                         max_answer_nll_increase: float | None = None, baselines=("streaming", "duo", "moa"),
                         lengths=None, signals: str | dict | None = None, tolerance: float = 0.02,
                         data: str | None = None, samples: int | None = None, texts: list[str] | None = None,
                         dtype: str = "float32", device: str = "cpu", reporter: Reporter | None = None,
                         lm=None, refine: int = 0, granularity: str = "kv_head",
                         format_windows: str | None = None) -> tuple[Plan, dict]:
    """Budget at quality: the cheapest budget (``search.family.QUALITY_GRID``, by bisection; density and KV
    share both at most the grid value) at which a member of the selection family meets the constraint on
    validation samples, that member (by the selection rule among those that meet it), and the budget each
    baseline needs to meet the same constraint. ``refine`` > 0 adds the ``refined`` member: plan in the loop
    (``do_refine``, that many rounds, the default windows and kinds, the last round kept) at each budget.
    Returns (plan, {"headplan" | baseline: {"density", "kv_share", "measured"}})."""
    import math
    import tempfile

    from .data import load_task_file, load_texts
    from .eval.validate import check_arguments, validate
    from .models import load_model
    from .profile import load_profile
    from .search import QUALITY_GRID, SearchSettings, build_baselines, build_family, cheapest, choose, meets, search
    from .search import profile_ref as make_ref
    from .search.settings import check_granularity

    rep = reporter or Reporter()
    granularity, format_windows = check_granularity(granularity, format_windows)
    out = _check_out(Path(out), (".yaml", ".yml"), "plan")
    for flag, v in (("--max-ppl-increase", max_ppl_increase), ("--max-answer-nll-increase", max_answer_nll_increase)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise HeadplanError(f"{flag} must be a non-negative number, got {v}")
    names = _baseline_names(list(baselines) if baselines else None)
    whole_number("--refine", refine)
    spec = load_task_file(data, "select")
    check_arguments(spec, samples, tolerance)
    load_texts(texts)
    prof = load_profile(profile_path)
    if lm is None:
        lm = load_model(model, dtype=dtype, device=device, progress=rep.log)
    if lm.identity.fingerprint != prof.model.fingerprint:
        raise HeadplanError(f"the profile is for another model ({prof.model_spec}) than {model}")
    ref = make_ref(profile_path, out, prof.sha256)
    vlen = optional_lengths(lengths) or prof.lengths
    sig = _signal_weights(signals, "--signals")
    seen: dict = {}

    def template_at(i):
        """The plain search at grid budget i (what a baseline takes its budget from), without validating it."""
        g = QUALITY_GRID[i]
        try:
            return {"search": search(prof, SearchSettings(density=g, kv_budget=g, lengths=optional_lengths(lengths),
                                                          signals=sig, granularity=granularity,
                                                          format_windows=format_windows), ref)}
        except HeadplanError:
            return {}

    def family_at(i):
        if i not in seen:
            g = QUALITY_GRID[i]
            base = SearchSettings(density=g, kv_budget=g, lengths=optional_lengths(lengths), signals=sig,
                                  granularity=granularity, format_windows=format_windows)
            try:
                plans = build_family(prof, base, ref)
            except HeadplanError:
                plans = {}
            if refine and plans and g < 1.0:
                with tempfile.TemporaryDirectory() as tmp:
                    plans["refined"], _ = do_refine(model, profile_path, Path(tmp) / "plan.yaml", density=g,
                                                    kv_budget=g, lengths=lengths, rounds=refine,
                                                    exclude_kinds=DEFAULT_RUN_EXCLUDE, texts=texts, reporter=rep,
                                                    lm=lm, dtype=dtype, device=device, granularity=granularity,
                                                    format_windows=format_windows)
                plans["refined"].provenance["profile"] = ref  # refined in a scratch folder: point at the profile
            seen[i] = (plans, validate(lm, plans, spec, vlen, texts, samples, rep) if plans else {})
        return seen[i]

    def ok_rows(table):
        return {m: r for m, r in table.items()
                if m != "dense" and meets(r, table["dense"], max_ppl_increase, max_answer_nll_increase)}

    i = cheapest(QUALITY_GRID, lambda j: bool(ok_rows(family_at(j)[1])))
    if i is None:
        raise HeadplanError(f"no plan meets the constraint even at density {QUALITY_GRID[-1]}")
    plans, table = family_at(i)
    ok = ok_rows(table)
    pick = choose({"dense": table["dense"], **ok}, tolerance)
    plan = plans[pick]
    n = max(plan.budget.lengths)
    budgets = {"headplan": {"density": QUALITY_GRID[i], "kv_share": plan.budget.achieved_kv[-1], "length": n,
                            "member": pick, "measured": {k: round(v, 6) for k, v in table[pick].items()}}}
    for name in names:  # the budget each baseline needs for the same constraint (same grid, same samples)
        bl = {}

        def passes(j, name=name, bl=bl):
            plans_j = seen[j][0] if j in seen else template_at(j)
            if not plans_j:
                return False
            b = build_baselines(prof, next(iter(plans_j.values())), [name])[name]
            row = validate(lm, {name: b}, spec, vlen, texts, samples, rep)
            bl[j] = (b, row[name])
            return meets(row[name], row["dense"], max_ppl_increase, max_answer_nll_increase)

        j = cheapest(QUALITY_GRID, passes)
        budgets[name] = ({"density": None, "kv_share": None, "measured": None} if j is None else
                         {"density": QUALITY_GRID[j], "kv_share": bl[j][0].budget.achieved_kv[-1], "length": n,
                          "measured": {k: round(v, 6) for k, v in bl[j][1].items()}})
    plan.provenance["quality"] = {"max_ppl_increase": max_ppl_increase,
                                  "max_answer_nll_increase": max_answer_nll_increase,
                                  "grid": list(QUALITY_GRID), "lengths": list(vlen), "budgets": budgets}
    save_plan(plan, out)
    return plan, budgets


def do_apply(model: str, plan_path: str | Path, *, prompt: str | None = None, max_new_tokens: int = 32,
             out: str | Path | None = None, force: bool = False, dtype: str = "float32", device: str = "cpu",
             reporter: Reporter | None = None, lm=None) -> dict:
    """Load MODEL, patch it to run the plan; with ``prompt`` generate greedily, dense and with the plan; with
    ``out`` save the patched model there (``force``: into a non-empty directory that is not a headplan
    output). Returns {"lm", "counts", "dense", "plan"} (the two continuations, or None without a prompt)."""
    import torch

    from .models import load_model
    from .runtime import apply as apply_plan
    from .runtime import check_patched_out, check_plan_fits, dense, save_patched

    rep = reporter or Reporter()
    p = load_plan(plan_path)
    if out is not None:
        check_patched_out(out, force)
    if lm is None:
        lm = load_model(model, dtype=dtype, device=device, progress=rep.log)
    check_plan_fits(lm.model, p)
    apply_plan(lm.model, p)
    res = {"lm": lm, "counts": p.counts(), "dense": None, "plan": None}
    if prompt is not None:
        tok = lm.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = prompt
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=lm.model.device)
        eos = getattr(tok, "eos_token_id", None)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=eos if eos is not None else 0)
        with torch.no_grad():
            with dense(lm.model):
                gd = lm.model.generate(ids, **kw)[0, ids.shape[1]:]
            gp = lm.model.generate(ids, **kw)[0, ids.shape[1]:]
        res["dense"] = tok.decode(gd.tolist(), skip_special_tokens=True)
        res["plan"] = tok.decode(gp.tolist(), skip_special_tokens=True)
    if out is not None:
        save_patched(lm.model, p, out, lm.tokenizer, force=force)
    return res


def _ruler_part(spec: dict, max_positions: int, tasks, lengths, samples, gen_tokens, only: bool) -> dict:
    """The eval spec with its ``ruler`` section from the --ruler flags (over the spec's own), checked before
    any work (lm-eval installed, offline tasks, lengths that fit); ``only``: that section alone."""
    from .eval.ruler import ruler_spec

    if tasks is None and "ruler" not in spec:
        given = [f for f, v in (("--ruler-lengths", lengths), ("--ruler-samples", samples),
                                ("--ruler-gen-tokens", gen_tokens), ("--ruler-only", only or None)) if v is not None]
        if given:
            raise HeadplanError(f"{given[0]} goes with --ruler TASKS (e.g. --ruler niah_single_1)")
        return spec
    base = spec.get("ruler")
    if base is not None and not isinstance(base, dict):
        raise HeadplanError("eval spec: ruler: expected a mapping {tasks, lengths, samples, gen_tokens}")
    r = ruler_spec(tasks, lengths, samples, gen_tokens, max_positions, base)
    if only:
        return {"name": "ruler", "seed": spec.get("seed", 1000), "ruler": r}
    return {**spec, "ruler": r}


def do_eval(model: str, plan_path: str | Path | list, out: str | Path | None = None, *, data: str | None = None,
            texts: list[str] | None = None, dtype: str = "float32", device: str = "cpu",
            reporter: Reporter | None = None, lm=None, baselines: bool | str | list | None = None,
            profile: str | Path | None = None, seed: int = 0, lengths=None, samples: int | None = None,
            ruler=None, ruler_lengths=None, ruler_samples: int | None = None, ruler_gen_tokens: int | None = None,
            ruler_only: bool = False, _stage: Path | None = None) -> dict:
    """Dense vs the plan (and its baselines at the same budget) on held-out samples.

    plan_path: one plan, or a list (several budgets in one run: methods are named ``name@density``).
    baselines: True (all of streaming, duo, moa, random), a comma-separated string or a list of names;
    built from ``profile`` (default: the plan's provenance.profile.path, relative to the plan's folder)
    and saved as ``OUT/baselines/<name>.yaml``. Writes ``OUT/eval.json``. ``lengths`` / ``samples`` replace
    the eval spec's lengths and samples (``headplan.eval.spec_for``). ``ruler``: lm-eval RULER tasks (a
    comma-separated string or a list, e.g. ``niah_single_1,niah_multikey_2``) run at ``ruler_lengths`` with
    ``ruler_samples`` per task and length (``headplan.eval.ruler``; needs ``pip install 'headplan[ruler]'``);
    ``ruler_only`` runs them alone, without the eval spec's own tasks. OUT is written whole
    (``files.staged_dir``); plan_file paths are recorded relative to OUT when inside it. ``_stage``: the
    caller's (do_run's) stage of OUT, written into instead.
    """
    from .data import load_task_file
    from .eval import evaluate, spec_for
    from .search.baselines import build_baselines
    from .models import load_model

    rep = reporter or Reporter()
    if out is not None:
        _check_out(Path(out), (), "eval", directory=True)
    names_given, paths = named_plans(plan_path)
    plans = [load_plan(p) for p in paths]
    spec, note = spec_for(load_task_file(data, "eval"), min(p.model.max_positions for p in plans), lengths, samples,
                          given=data is not None)
    spec = _ruler_part(spec, min(p.model.max_positions for p in plans), ruler, ruler_lengths, ruler_samples,
                       ruler_gen_tokens, ruler_only)
    names = _baseline_names(baselines)
    multi = len(plans) > 1

    def label(name, plan):
        b = plan.budget
        tag = f"{b.density:g}" if b.density is not None else f"kv{b.kv_budget:g}" if b.kv_budget is not None else "?"
        return f"{name}@{tag}" if multi else name

    methods, files, sources = {}, {}, {}
    for given_name, path, plan in zip(names_given, paths, plans):
        m = given_name or label("headplan", plan)
        if m in methods:
            raise HeadplanError(f"--plan: two methods named {m!r}; name them with NAME=PATH")
        methods[m] = plan
        files[m] = _final(path, _stage, out) if out is not None else path.resolve()
        if names:
            prof, pp = _plan_profile(path, plan, profile)
            for name, bp in build_baselines(prof, plan, names, seed).items():
                methods[label(name, bp)] = bp
                sources[label(name, bp)] = (pp, prof.sha256)
    if out is not None:
        for m in methods:
            if m not in files:
                files[m] = Path(out) / "baselines" / f"{m}.yaml"
    if lm is None:
        lm = load_model(model, dtype=dtype, device=device, progress=rep.log)
    if note:  # said once the inputs are known good
        rep.log(note)
    if spec.get("ruler"):  # RULER prompts that lm-eval cannot make with this tokenizer: refused before any work
        from .eval.ruler import check_fits, hf_tokenizer

        tok = hf_tokenizer(lm.tokenizer)
        for n in spec["ruler"]["lengths"]:
            check_fits(spec["ruler"]["tasks"], n, tok)
    first = next(iter(methods))
    t0 = time.time()
    res = evaluate(lm, methods[first], spec, texts, rep, {k: v for k, v in methods.items() if k != first}, first)
    res["seconds"] = time.time() - t0
    res["plan"] = str(_final(paths[0], _stage, out))
    res["eval_spec"] = spec
    for info in res["methods"]:
        f = files.get(info["name"])
        info["plan_file"] = None if f is None else str(f) if out is None else _record_path(f, out)
        info["base"] = info["name"].split("@")[0]
    if out is not None:
        with contextlib.nullcontext(_stage) if _stage is not None else staged_dir(out) as stage:
            for m, bp in methods.items():
                if m in sources:
                    _save_baseline(bp, files[m], _final(sources[m][0], _stage, out), sources[m][1],
                                   stage / "baselines" / f"{m}.yaml")
            atomic_write(stage / "eval.json", json.dumps(res, indent=2, sort_keys=True))
    return res


def do_baselines(plan_path: str | Path, out: str | Path, *, names=None, profile: str | Path | None = None,
                 seed: int = 0) -> dict[str, Path]:
    """Write the baseline plans (streaming, duo, moa, random) at PLAN's budget, built from the profile
    the plan was searched from, as ``OUT/<name>.yaml`` (OUT written whole), without evaluating them."""
    from .search.baselines import build_baselines

    path = Path(plan_path)
    _check_out(Path(out), (), "baselines", directory=True)
    plan = load_plan(path)
    names = _baseline_names(names or True)
    prof, pp = _plan_profile(path, plan, profile)
    files = {}
    built = build_baselines(prof, plan, names, seed)
    with staged_dir(out) as stage:
        for name, bp in built.items():
            files[name] = Path(out) / f"{name}.yaml"
            _save_baseline(bp, files[name], pp, prof.sha256, stage / f"{name}.yaml")
    return files


def do_report(run_dir: str | Path, out: str | Path, reporter: Reporter | None = None) -> dict:
    """Markdown + HTML report with PNGs from the eval.json files in RUN_DIR (see headplan.report), OUT
    written whole. Returns {"markdown", "html", "images", "evals"}."""
    from .report import write_report

    _check_out(Path(out), (), "report", directory=True)
    with staged_dir(out) as stage:
        r = write_report(run_dir, stage, reporter)
    moved = lambda p: Path(out) / Path(p).relative_to(stage)  # noqa: E731
    return {**r, "markdown": moved(r["markdown"]), "html": moved(r["html"]), "images": [moved(p) for p in r["images"]]}


def feasible_or_raise(cands, lengths: list[int], density: float | None, kv_budget: float | None,
                      model=None) -> None:
    """Fail before any work if no assignment of these candidates can meet the budget (against the
    model's own attention when its identity is given: sliding layers count their window as dense)."""
    from .candidates import budget_tables
    from .plan import ModelIdentity

    ident = model or ModelIdentity("", 1, 1, 1, 1, 1, "")
    tables = dict(zip(("density", "kv_budget"), budget_tables(cands, lengths, 64, ident)))  # (L, C, lengths)
    for name, bound in (("density", density), ("kv_budget", kv_budget)):
        check_budget(name, bound, lengths, lambda j, t=tables[name]: float(t[:, :, j].min(axis=1).mean()))


def do_run(model: str, out: str | Path, *, density: float = DEFAULT_DENSITY, kv_budget: float | None = None,
           lengths=None, samples: int | None = None, data: str | None = None,
           eval_data: str | None = None, texts: list[str] | None = None, dtype: str = "float32",
           device: str = "cpu", reporter: Reporter | None = None, candidates: str = "default",
           method: str = DEFAULT_RUN_METHOD, select: bool = False, tolerance: float = 0.02,
           baselines: str | list | None = "moa", refine: int = DEFAULT_REFINE_ROUNDS,
           exclude_kinds: str | list | None = DEFAULT_RUN_EXCLUDE, shrink_worths: bool = False,
           profile_windows: bool = DEFAULT_PROFILE_WINDOWS, max_length=None, granularity: str = "kv_head",
           format_windows: str | None = None) -> dict:
    """The whole pipeline: profile, search (or, with ``select``, ``headplan select``'s measured choice among a
    family of plans), eval beside dense and ``baselines`` (default: the MoA-style baseline at the same
    budget, so the first run shows the margin); writes profile, plan.yaml, eval.json, summary.json (OUT written
    whole: ``files.staged_dir``)."""
    from .data import load_task_file
    from .models import load_model

    rep = reporter or Reporter()
    t0 = time.time()
    out = _check_out(Path(out), (), "run", directory=True)
    load_task_file(data, "profile")
    load_task_file(eval_data, "eval")
    _baseline_names(baselines)  # a bad name fails before any work
    whole_number("--refine", refine)
    kinds = pattern_kinds(None if str(exclude_kinds).strip().lower() == "none" else exclude_kinds)
    from .search.settings import check_granularity

    granularity, format_windows = check_granularity(granularity, format_windows)
    if refine and not select:  # plan in the loop needs answered calibration samples: fail before profiling
        from .profile.runner import gate_options

        gate_options(load_task_file(data, "profile"), parse_lengths(lengths or DEFAULT_LENGTHS))
    allowed = [c for c in candidate_set(candidates) if c.pattern.kind not in kinds]
    if not allowed:
        raise HeadplanError(f"--exclude-kinds leaves no candidate of the {candidates!r} set")
    feasible_or_raise(allowed, parse_lengths(lengths or DEFAULT_LENGTHS), density, kv_budget)
    max_length = optional_length("--max-length", max_length)
    with staged_dir(out) as stage:  # written whole: a failure leaves an existing OUT as it was
        lm = load_model(model, dtype=dtype, device=device, progress=rep.log)
        lengths = fit_lengths(lengths, lm.identity.max_positions, reporter=rep)
        feasible_or_raise(allowed, parse_lengths(lengths), density, kv_budget, lm.identity)
        if max_length is None:  # the budget binds up to the longest length the eval measures
            max_length = eval_max_length(eval_data, lm.identity.max_positions)
        elif max_length > lm.identity.max_positions:
            raise HeadplanError(f"--max-length {max_length} exceeds the model's {lm.identity.max_positions} positions")
        if refine and not select:
            refine = _refine_fits(lm, data, texts, parse_lengths(lengths), refine, rep)
        t_load = time.time() - t0
        prof_path = stage / "profile.safetensors"
        plan_path = stage / "plan.yaml"
        prof, _ = do_profile(model, prof_path, lengths=lengths, samples=samples, data=data, texts=texts,
                             candidates=candidates, dtype=dtype, device=device, reporter=rep, lm=lm, method=method)
        t_prof = time.time() - t0 - t_load
        selection = None
        if select:
            plan, table = do_select(model, prof_path, plan_path, density=density, kv_budget=kv_budget,
                                    tolerance=tolerance, texts=texts, reporter=rep, lm=lm, max_length=max_length,
                                    granularity=granularity, format_windows=format_windows)
            selection = {"chosen": plan.provenance["selection"]["chosen"], "tolerance": tolerance, "candidates": table}
        elif refine:
            plan, hist = do_refine(model, prof_path, plan_path, density=density, kv_budget=kv_budget, rounds=refine,
                                   data=data, validate=True, tolerance=tolerance, exclude_kinds=kinds, texts=texts,
                                   reporter=rep, lm=lm, shrink_worths=shrink_worths, profile_windows=profile_windows,
                                   max_length=max_length, granularity=granularity, format_windows=format_windows)
            selection = {"chosen": plan.provenance["search"]["refine"]["kept"], "tolerance": tolerance,
                         "candidates": {h["round"]: {**h.get("measured", {}), "counts": h["counts"]} for h in hist}}
        else:
            plan = do_search(prof_path, plan_path, density=density, kv_budget=kv_budget, exclude_kinds=kinds,
                             max_length=max_length, granularity=granularity, format_windows=format_windows)
        res = do_eval(model, plan_path, out, data=eval_data, texts=texts, reporter=rep, lm=lm, baselines=baselines,
                      profile=prof_path, _stage=stage)
        summary = {
            "model": model, "method": prof.method, "density_budget": density, "kv_budget": kv_budget,
            "profiled_lengths": list(prof.lengths), "plan_counts": plan.counts(), "max_length": max_length,
            "achieved_density": dict(zip(map(str, plan.budget.lengths), plan.budget.achieved_density)),
            "achieved_kv": dict(zip(map(str, plan.budget.lengths), plan.budget.achieved_kv)),
            "eval": res, "seconds": {"load": t_load, "profile": t_prof, "total": time.time() - t0},
            **({"selection": selection} if selection else {}),
            **({"refine_rounds": refine} if refine and not select else {}),
            "files": {"profile": str(out / "profile.safetensors"), "plan": str(out / "plan.yaml"),
                      "eval": str(out / "eval.json"), "summary": str(out / "summary.json")},
        }
        atomic_write(stage / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return summary


def eval_max_length(eval_data: str | None, max_positions: int) -> int:
    """The longest length the eval spec (default: the built-in one) measures on a model of ``max_positions``:
    `run`'s default --max-length, so the plan's budget binds at every eval length."""
    from .data import load_task_file
    from .eval import spec_for

    spec, _ = spec_for(load_task_file(eval_data, "eval"), max_positions, given=eval_data is not None)
    lens = [int(n) for k, v in spec.items() if isinstance(v, dict) for n in (v.get("lengths") or [])]
    return min(max(lens), int(max_positions)) if lens else int(max_positions)


def _refine_fits(lm, data, texts, lengths: list[int], rounds: int, rep: Reporter) -> int:
    """``rounds``, or 0 with one line when the calibration length (the mixture's gates.length, at most the
    longest profiled length) cannot hold the mixture's answered samples."""
    from .data import Haystack, answer_options, load_task_file, load_texts, mixture_samples
    from .profile.runner import gate_options

    spec = load_task_file(data, "profile")
    opt = gate_options(spec, lengths)
    try:
        mixture_samples(Haystack(lm.tokenizer, load_texts(texts)[0]), spec, opt["length"], opt["samples"],
                        reserve=answer_options(spec)[1])
    except HeadplanError as e:
        rep.log(f"plan in the loop skipped: its calibration samples at {opt['length']} tokens do not fit ({e})")
        return 0
    return rounds


def _flat(d, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def plan_diff(old: Plan, new: Plan) -> list[str]:
    """What differs between two plans as data (formatting ignored): one line per KV head whose pattern
    changed (``layer 3 kv_head 1: sink64+win256 -> full``), then one per other changed field
    (``budget.achieved_density: [0.25] -> [0.24]``). [] when they are the same plan."""
    def label(e, other):
        name = e.candidate or e.pattern.kind
        if other is not None and name == (other.candidate or other.pattern.kind):
            name += " " + json.dumps(e.pattern.row(), sort_keys=True)  # same name, other parameters
        return name

    lines = []
    if len(old.layers) == len(new.layers) and all(len(a) == len(b) for a, b in zip(old.layers, new.layers)):
        for li, (la, lb) in enumerate(zip(old.layers, new.layers)):
            for a, b in zip(la, lb):
                if a != b:
                    lines.append(f"layer {li} kv_head {a.kv_head}: {label(a, b)} -> {label(b, a)}")
    else:
        lines.append(f"layers: {[len(x) for x in old.layers]} KV heads -> {[len(x) for x in new.layers]}")
    fa, fb = ({k: v for k, v in _flat(p.to_dict()).items() if k != "layers"} for p in (old, new))
    for k in list(fa) + [k for k in fb if k not in fa]:
        if fa.get(k, "(absent)") != fb.get(k, "(absent)"):
            show = [json.dumps(x.get(k), sort_keys=True, default=str) if k in x else "(absent)" for x in (fa, fb)]
            lines.append(f"{k}: {show[0]} -> {show[1]}")
    return lines


def do_check(plan_path: str | Path, profile_path: str | Path | None = None, *,
             root: str | Path | None = None) -> tuple[bool, str]:
    """Regenerate a plan from its recorded provenance (a baseline plan, ``provenance.baseline``, as that
    baseline) and compare the two as data (parsed and validated: formatting, key order and comments do
    not count). (True, "") if they are the same plan, else (False, plan_diff's lines). Files the
    provenance names must lie in the plan's folder, or under ``root`` when given."""
    import yaml

    from .plan import plan_from_dict

    plan_path = Path(plan_path)
    plan = load_plan(plan_path)
    prov = plan.provenance or {}
    pref = prov.get("profile") or {}
    if profile_path is None:
        if "path" not in pref:
            raise PlanError(f"{plan_path.name}.provenance.profile.path: missing; pass --profile")
        profile_path = provenance_file(plan_path, pref["path"], "provenance.profile.path", "pass --profile", root)
    prof = _recorded_profile(profile_path, pref)
    if (prov.get("search") or {}).get("refine"):
        from .search.refine import replay

        try:
            new = replay(prof, plan, pref or None)
        except HeadplanError as e:
            raise PlanError(f"{plan_path.name}: {e}") from None
    elif prov.get("baseline"):
        from .search.baselines import regenerate

        new = regenerate(prof, plan)
    else:
        new = _regenerate_search(plan_path, plan, prof, pref, root)
    new = plan_from_dict(yaml.safe_load(new.to_yaml()), plan_path.name)  # the plan as save_plan would write it
    lines = plan_diff(plan, new)
    if not lines:
        return True, ""
    return False, "".join(f"{line}\n" for line in [f"{plan_path} (committed) -> regenerated:", *lines])


def _regenerate_search(plan_path: Path, plan: Plan, prof, pref: dict, root=None) -> Plan:
    from .search import SearchSettings, search

    prov = plan.provenance or {}
    s = prov.get("search") or {}
    try:
        settings = SearchSettings.from_dict(s)
    except (TypeError, ValueError, KeyError):
        raise PlanError(f"{plan_path.name}.provenance.search: malformed search settings") from None
    cost = None
    if s.get("cost_table"):
        ct = s["cost_table"].get("path") or "analytic"
        m = prof.model
        cost = load_cost(ct if ct == "analytic" else
                         str(provenance_file(plan_path, ct, "provenance.search.cost_table.path", root=root)), m.head_dim,
                         m.num_query_heads // m.num_kv_heads)
    new = search(prof, settings, pref or None, cost)
    if s.get("cost_table", {}).get("path"):
        new.provenance["search"]["cost_table"]["path"] = s["cost_table"]["path"]
    if "selection" in prov:  # `headplan select`'s measurements need the model: kept as recorded, the plan is
        new.provenance["selection"] = prov["selection"]  # regenerated from the chosen candidate's settings
    return new
