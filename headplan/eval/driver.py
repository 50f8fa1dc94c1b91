"""The evaluation driver (``evaluate``; the module is not named evaluate.py, which the face's function
``headplan.eval.evaluate`` would shadow): dense and every method on the samples an eval spec describes (perplexity,
retrieval grids, continuations), and the spec fitted to the model's positions."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

from ..candidates import plan_shares
from ..errors import HeadplanError
from ..plan import Plan
from ..progress import Reporter
from .loop import MethodLoop
from .prompts import SETTINGS, prefilled_cache, prompt_settings, setting_parts  # noqa: F401
from .scoring import hit, mean_nll, perplexity, summed_kl, summed_nll, top1_agreements


def _plan_budget(plan: Plan, n: int) -> tuple[float, float]:
    return plan_shares(plan.model, [[e.pattern for e in layer] for layer in plan.layers], n, plan.block_size)


SCORE_CHUNK = 64  # tokens per chunk when scored positions run through a compressed cache (select heads)


def _selects(model) -> bool:
    """Whether a plan with select heads is applied now (their cache, not one forward, decides what later
    tokens see)."""
    from ..kernels import patterns as P
    from ..runtime import NAME, state_of

    st = state_of(model)
    return st is not None and model.config._attn_implementation == NAME and \
        any(bool((t[:, P.C_KIND] == P.SELECT).any()) for t in st.tables)


@torch.no_grad()
def logits(model, ids: torch.Tensor, keep: int = 0, split: int | None = None, scorer: str = "obs") -> torch.Tensor:
    """Logits of the last ``keep`` positions (all when 0), float32.

    ``split``: the question comes after compression: the first ``split`` tokens are prefilled into a cache
    alone (a plan compresses them, seeing none of what follows), and the rest run as one more chunk. Where
    a plan with select heads is applied, the scored positions are never part of one forward with the
    context either: the context is prefilled and they follow in chunks of ``SCORE_CHUNK`` tokens, each one
    attending to what the cache kept, as generated tokens do. ``scorer``: the select heads' scorer
    (``headplan.runtime.new_cache``)."""
    L = ids.shape[1]
    if split is None and keep and keep < L and _selects(model):
        return _through_cache(model, ids, L - keep, SCORE_CHUNK, scorer)[-keep:]
    if split is not None and 0 < split < L:
        lg = _through_cache(model, ids, split, L - split, scorer)
        return lg[-keep:] if keep else lg
    try:
        out = model(ids, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(ids, use_cache=False)
    lg = out.logits[0]
    return (lg[-keep:] if keep else lg).float()


def _through_cache(model, ids: torch.Tensor, split: int, chunk: int, scorer: str = "obs") -> torch.Tensor:
    """Prefill ``ids[:, :split]`` into a fresh cache (the plan's per-head cache, or the model's own when
    dense), then the rest in chunks; returns the float32 logits of positions split..L-1."""
    from transformers import DynamicCache

    from ..runtime import NAME, cache_kwarg, new_cache

    L = ids.shape[1]
    plan_mode = model.config._attn_implementation == NAME
    cache = new_cache(model, L + 1, scorer=scorer) if plan_mode else DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    model(ids[:, :split], logits_to_keep=1, **kw)
    out = [model(ids[:, a:min(L, a + chunk)], **kw).logits[0].float() for a in range(split, L, chunk)]
    return torch.cat(out)


def answer_nll(model, full: torch.Tensor, tgt: torch.Tensor, split: int | None = None, scorer: str = "obs") -> float:
    """Mean negative log-likelihood (nats per token) of the last ``len(tgt)`` tokens of ``full``,
    teacher-forced through whatever attention the model runs now (``split``, ``scorer``: as in ``logits``)."""
    return mean_nll(_logits(model, full, len(tgt) + 1, split, scorer)[:-1].log_softmax(-1), tgt)


_logits = logits  # every forward of the driver goes through this name (one place to hook them)


def _generate(model, ids: torch.Tensor, n_new: int, eos, mem: dict | None = None, key: str | None = None,
              split: int | None = None, scorer: str = "obs") -> list[int]:
    """Greedy continuation; records the KV bytes the cache really holds in ``mem[key]`` (dense or plan).
    ``split``: the first ``split`` tokens are prefilled (and compressed) alone before the rest is seen;
    ``scorer``: the select heads' scorer."""
    from ..runtime import NAME, cache_kwarg

    plan_mode = model.config._attn_implementation == NAME
    cache = prefilled_cache(model, ids, split, ids.shape[1] + n_new + 1, scorer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=eos if eos is not None else 0, **{cache_kwarg(model): cache})
    if mem is not None:
        if plan_mode:
            b = cache.kv_bytes()
        else:
            b = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
                    if getattr(layer, "keys", None) is not None)
        key = key or ("plan" if plan_mode else "dense")
        mem[key] = max(mem.get(key, 0), b)
    return out[0, ids.shape[1]:].tolist()


# retrieval tasks of the grid: spec key -> (sample task in headplan.data, fixed options)
GRID_TASKS = {"passkey": ("passkey", {}), "multikey": ("passkey", {"keys": 4}), "needle": ("needle", {}),
              "kv_retrieval": ("kv_retrieval", {})}


GEN_ROOM = 32  # positions a default-spec retrieval case keeps free for its generated answer


def spec_for(spec: dict, max_positions: int, lengths=None, samples: int | None = None,
             given: bool = True) -> tuple[dict, str | None]:
    """The eval spec to run on a model of ``max_positions`` positions. ``lengths`` / ``samples`` (``eval
    --lengths/--samples``) replace the lengths and samples of every task the spec has. Lengths must fit:
    in a spec the user ``given`` (or given ``lengths``) one that does not is refused with what to pass;
    from the default spec it is dropped. Returns (spec, the one line that says what was dropped, or None)."""
    import copy

    from ..lengths import fit_lengths

    mp = int(max_positions)
    s = copy.deepcopy(spec)
    if samples is not None and int(samples) < 1:
        raise HeadplanError(f"--samples must be at least 1, got {samples}")
    keys = [k for k in ("perplexity", *GRID_TASKS) if isinstance(s.get(k), dict)]
    for k in keys:
        if lengths is not None:
            s[k]["lengths"] = fit_lengths(lengths, mp)
        if samples is not None:
            s[k]["samples"] = int(samples)
    dropped = []
    for k in keys:
        lens = [int(n) for n in s[k].get("lengths") or []]
        if given or lengths is not None:
            if lens:
                fit_lengths(lens, mp)
        else:  # retrieval also generates the answer: room for it past the prompt
            room = 0 if k == "perplexity" else GEN_ROOM
            dropped += [n for n in lens if n + room > mp]
            s[k]["lengths"] = [n for n in lens if n + room <= mp]
    c = s.get("continuations")
    if isinstance(c, dict) and int(c.get("length", 512)) + int(c.get("tokens", 32)) > mp and not given:
        dropped.append(int(c.get("length", 512)))
        c["length"] = mp - int(c.get("tokens", 32))
    note = None
    if dropped:
        note = (f"eval spec {s.get('name', '')}: lengths {','.join(map(str, sorted(set(dropped))))} do not fit the "
                f"model's {mp} positions (retrieval keeps {GEN_ROOM} for the answer); left out")
    return s, note




def method_info(name: str, plan: Plan, lengths: list[int], base: str | None = None) -> dict:
    return {"name": name, "base": base or name.split("@")[0], "density_budget": plan.budget.density,
            "kv_budget": plan.budget.kv_budget, "counts": plan.counts(),
            "expected_loss": plan.budget.expected_loss,
            "budget": [{"length": n, "density": d, "kv_share": k}
                       for n in lengths for d, k in [_plan_budget(plan, n)]]}


def _grid_cells(task, g):
    if task == "kv_retrieval":
        return [{} for _ in range(int(g.get("samples", 3)))]
    return [{"depths": [float(d)]} for d in g.get("depths", [0.5]) for _ in range(int(g.get("samples", 1)))]


def _check_spec(spec: dict, plan: Plan) -> tuple[dict, dict, dict]:
    """(perplexity, continuations, retrieval grids) of an eval spec, refused on an unknown key or a length
    beyond the model's positions."""
    ppl_spec, cont_spec = spec.get("perplexity") or {}, spec.get("continuations") or {}
    grids = {t: spec[t] for t in GRID_TASKS if spec.get(t) and spec[t].get("lengths")}
    for k in spec:
        if k not in (*GRID_TASKS, "perplexity", "continuations", "ruler", "name", "seed", "description"):
            raise HeadplanError(f"eval spec: unknown key {k!r} (known: perplexity, {', '.join(GRID_TASKS)}, "
                                "continuations, ruler, name, seed)")
    all_lengths = list(ppl_spec.get("lengths", [])) + [n for g in grids.values() for n in g["lengths"]]
    if cont_spec:
        all_lengths.append(int(cont_spec.get("length", 512)) + int(cont_spec.get("tokens", 32)))
    for n in all_lengths:
        if int(n) > plan.model.max_positions:
            raise HeadplanError(f"eval length {n} exceeds the model's {plan.model.max_positions} positions")
    return ppl_spec, cont_spec, grids


def _perplexity(loop: MethodLoop, hay, seed: int, dev, n: int, n_ppl: int, tail: float, primary: str) -> dict:
    """Perplexity, KL(dense||method) and top-1 agreement on the last ``tail`` of ``n_ppl`` samples of n tokens."""
    from ..data import make_sample

    acc = {m: [0.0, 0.0, 0.0] for m in loop.names}  # nll, kl, agree
    nll_d, count = 0.0, 0
    for i in range(n_ppl):
        s = make_sample(hay, "lm", n, random.Random(f"{seed}:ppl:{n}:{i}"), {})
        ids = torch.tensor([s.input_ids], device=dev)
        keep = n - int(n * (1 - tail))
        tgt = ids[0, n - keep + 1:]
        ref = {}

        def score(m):
            lp = _logits(loop.model, ids, keep)[:-1].log_softmax(-1)
            if m == "dense":  # the reference every method is scored against
                ref["lp"], ref["top"] = lp, lp.argmax(-1)
                return summed_nll(lp, tgt)
            return summed_nll(lp, tgt), summed_kl(ref["lp"], lp), top1_agreements(ref["top"], lp)

        out = loop.each(score)
        nll_d += out.pop("dense")
        for m, v in out.items():
            acc[m] = [x + y for x, y in zip(acc[m], v)]
        count += tgt.numel()
    by = {m: {"ppl": perplexity(a[0], count), "kl": a[1] / count, "top1_agree": a[2] / count} for m, a in acc.items()}
    return {"length": n, "samples": n_ppl, "tokens_scored": count, "ppl_dense": perplexity(nll_d, count),
            "ppl_plan": by[primary]["ppl"], "kl": by[primary]["kl"], "top1_agree": by[primary]["top1_agree"],
            "methods": by}


def _retrieval_sample(loop: MethodLoop, lm, s, dev, setting: str, mem: dict) -> tuple[dict, dict]:
    """One retrieval sample: each method's greedy answer (KV bytes and CUDA peaks into ``mem``) and its
    teacher-forced answer NLL ({} without an answer)."""
    ids = torch.tensor([s.input_ids], device=dev)
    first, scorer = setting_parts(setting)
    split = s.meta.get("context") if first else None
    k, eos = len(s.answer_ids) + 2, getattr(lm.tokenizer, "eos_token_id", None)

    def gen(m):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = lm.tokenizer.decode(_generate(loop.model, ids, k, eos, mem, m, split, scorer), skip_special_tokens=True)
        if dev.type == "cuda":
            mem[f"peak_{m}"] = torch.cuda.max_memory_allocated()
        return out

    outs = loop.each(gen)
    if not s.answer_ids:
        loop.advance(len(loop.names) + 1)
        return outs, {}
    full = torch.tensor([list(s.input_ids) + list(s.answer_ids)], device=dev)
    tgt = full[0, -len(s.answer_ids):]
    return outs, loop.each(lambda m: answer_nll(loop.model, full, tgt, split, scorer))


def _retrieval(loop: MethodLoop, lm, hay, seed: int, dev, task: str, g: dict, setting: str, n: int, primary: str,
               memory: dict) -> tuple[dict, list[dict]]:
    """One retrieval cell (task, prompt setting, length): its row and its rows per depth."""
    from ..data import make_sample

    stask, fixed = GRID_TASKS[task]
    variants = _grid_cells(task, g)
    ok = {m: 0 for m in ["dense", *loop.names]}
    nll_sum, nll_n, cell_ok, cases = {}, 0, {}, []
    for i, var in enumerate(variants):
        opts = {**{k: v for k, v in g.items() if k not in ("lengths", "samples", "settings")}, **fixed, **var}
        s = make_sample(hay, stask, n, random.Random(f"{seed}:{task}:{n}:{i}"), opts)
        mem: dict = {}
        outs, nll = _retrieval_sample(loop, lm, s, dev, setting, mem)
        if nll:
            for m, v in nll.items():
                nll_sum[m] = nll_sum.get(m, 0.0) + v
            nll_n += 1
        for key, val in mem.items():
            memory.setdefault(n, {})[key] = max(memory.get(n, {}).get(key, 0), val)
        memory.setdefault(n, {})
        depth = s.meta.get("depth") if task != "kv_retrieval" else None
        c = cell_ok.setdefault(depth, {"n": 0, **{m: 0 for m in ok}})
        c["n"] += 1
        for m in ok:
            hit_m = hit(s.answer, outs[m])
            ok[m] += hit_m
            c[m] += hit_m
        cases.append({"depth": depth, "answer": s.answer, "dense": outs["dense"].strip(), "plan": outs[primary].strip(),
                      "methods": {m: outs[m].strip() for m in loop.names}, **({"answer_nll": nll} if nll else {})})
    name = task if setting == "single" else f"{task}-{setting}"
    tot = len(variants)
    row = {"task": name, "length": n, "samples": tot, "acc_dense": ok["dense"] / tot, "acc_plan": ok[primary] / tot,
           "acc": {m: v / tot for m, v in ok.items()},
           **({"answer_nll": {m: v / nll_n for m, v in nll_sum.items()}} if nll_n else {}), "cases": cases}
    grid = [{"task": name, "length": n, "depth": depth, "samples": c["n"], "acc": {m: c[m] / c["n"] for m in ok}}
            for depth, c in sorted(cell_ok.items(), key=lambda x: (x[0] is None, x[0] or 0))]
    return row, grid


def _continuations(loop: MethodLoop, lm, hay, seed: int, dev, cont_spec: dict) -> list[dict]:
    from ..data import make_sample

    n, k, eos = int(cont_spec.get("length", 512)), int(cont_spec.get("tokens", 32)), getattr(lm.tokenizer,
                                                                                            "eos_token_id", None)
    rows = []
    for i in range(int(cont_spec.get("samples", 2))):
        s = make_sample(hay, "lm", n, random.Random(f"{seed}:cont:{n}:{i}"), {})
        ids = torch.tensor([s.input_ids], device=dev)
        outs = loop.each(lambda m: lm.tokenizer.decode(_generate(loop.model, ids, k, eos), skip_special_tokens=True))
        prompt = lm.tokenizer.decode(list(s.input_ids[-48:]), skip_special_tokens=True)
        rows.append({"length": n, "prompt_tail": prompt, "dense": outs["dense"],
                     "methods": {m: outs[m] for m in loop.names}})
    return rows


def _budgets(results: dict, methods: dict, plan: Plan, primary: str, memory: dict, model) -> None:
    """Each method's budget info, the KV the caches held, and the plan's predicted KV per length, into
    ``results``."""
    from ..runtime import kv_report

    lengths = sorted({r["length"] for r in results["perplexity"] + results["retrieval"] + results.get("ruler", [])})
    results["methods"] = [method_info(m, p, lengths) for m, p in methods.items()]
    results["kv_cache_measured"] = [
        {"length": n, "kv_bytes_dense": m.get("dense"), "kv_bytes_plan": m.get(primary),
         "kv_bytes": {k: v for k, v in m.items() if not k.startswith("peak_")},
         **({"peak_bytes_dense": m["peak_dense"], "peak_bytes_plan": m[f"peak_{primary}"]}
            if f"peak_{primary}" in m else {})}
        for n, m in sorted(memory.items())]
    for n in lengths:
        d, k = _plan_budget(plan, n)
        kvr = kv_report(plan, n, model=model)  # predicted at n tokens in the model's dtype; kv_cache_measured
        results["budget"].append({"length": n, "density": d, "kv_share": k,  # holds what the caches allocated
                                  "kv_dtype_bytes": kvr["dtype_bytes"], "kv_bytes_dense": kvr["dense_bytes"],
                                  "kv_bytes_plan": kvr["plan_bytes"],
                                  "kv_bytes_per_layer": [(x["dense_bytes"], x["plan_bytes"]) for x in kvr["layers"]]})


def evaluate(lm, plan: Plan, spec: dict, texts: list[str] | None = None, reporter: Reporter | None = None,
             others: dict[str, Plan] | None = None, primary: str = "headplan") -> dict:
    """Dense vs ``plan`` (named ``primary``) and every plan in ``others`` (name -> Plan, e.g. the
    baselines at the same budget), on the samples the eval spec describes; dense is run once per
    sample and every method is scored against it. Returns a JSON-ready dict.

    Spec keys (all optional): ``perplexity {lengths, samples, tail}``; retrieval grids
    ``passkey | multikey | needle {lengths, depths, samples}`` (samples per length × depth cell) and
    ``kv_retrieval {lengths, samples, pairs}``; ``continuations {length, samples, tokens}``.
    """
    from ..data import Haystack, load_texts
    from ..runtime import apply, check_plan_fits

    rep = reporter or Reporter()
    methods: dict[str, Plan] = {primary: plan, **(others or {})}
    model = lm.model
    for p in methods.values():
        check_plan_fits(model, p)
    text, text_desc = load_texts(texts)
    hay = Haystack(lm.tokenizer, text)
    seed, dev = int(spec.get("seed", 1000)), next(model.parameters()).device
    ppl_spec, cont_spec, grids = _check_spec(spec, plan)
    names = list(methods)
    results: dict = {"model": lm.spec, "plan_counts": plan.counts(), "texts": text_desc, "primary": primary,
                     "methods": [], "perplexity": [], "retrieval": [], "grid": [], "continuations": [],
                     "budget": []}
    n_ppl, tail = int(ppl_spec.get("samples", 2)), float(ppl_spec.get("tail", 0.5))
    per = len(names) + 1  # steps of the bar: one forward (or generation) of dense and of each method
    jobs = per * (len(ppl_spec.get("lengths", [])) * n_ppl  # retrieval: generation + teacher-forced answer
                  + 2 * sum(len(g["lengths"]) * len(_grid_cells(t, g)) * len(prompt_settings(t, g))
                            for t, g in grids.items())
                  + (int(cont_spec.get("samples", 2)) if cont_spec else 0))
    memory: dict = {}
    bar = rep.task(f"evaluating dense + {len(names)} plan(s)", jobs) if jobs else contextlib.nullcontext(lambda n=1: None)
    with bar as advance:
        loop = MethodLoop(model, methods, advance)
        for n in ppl_spec.get("lengths", []):
            results["perplexity"].append(_perplexity(loop, hay, seed, dev, int(n), n_ppl, tail, primary))
        for task, g, setting in [(t, g, st) for t, g in grids.items() for st in prompt_settings(t, g)]:
            for n in g["lengths"]:
                row, grid = _retrieval(loop, lm, hay, seed, dev, task, g, setting, int(n), primary, memory)
                results["retrieval"].append(row)
                results["grid"].extend(grid)
        if cont_spec:
            results["continuations"] = _continuations(loop, lm, hay, seed, dev, cont_spec)
    if spec.get("ruler"):  # lm-eval's RULER tasks (headplan.eval.ruler), its own progress bar
        from .ruler import run_ruler

        results["ruler"] = run_ruler(lm, methods, spec["ruler"], rep, seed)
    apply(model, plan, check=False)
    _budgets(results, methods, plan, primary, memory, model)
    return results


def named_plans(plan_path) -> tuple[list[str | None], list[Path]]:
    """``eval --plan`` values: PATH, or NAME=PATH naming the method (e.g. a baseline plan built earlier).
    Returns (names, None where unnamed; paths)."""
    given = [str(p) for p in (plan_path if isinstance(plan_path, (list, tuple)) else [plan_path])]
    if not given:
        raise HeadplanError("give a plan: --plan PLAN")
    names, paths = [], []
    for g in given:
        name, sep, rest = g.partition("=")
        if sep and name and not any(c in name for c in "/\\") and not Path(g).is_file():
            if not all(c.isalnum() or c in "_-.@" for c in name):
                raise HeadplanError(f"--plan {g}: a method name may use letters, digits, _ - . @ only")
            names.append(name)
            paths.append(Path(rest))
        else:
            names.append(None)
            paths.append(Path(g))
    return names, paths


def eval_max_length(eval_data: str | None, max_positions: int) -> int:
    """The longest length the eval spec (default: the built-in one) measures on a model of ``max_positions``:
    `run`'s default --max-length, so the plan's budget binds at every eval length."""
    from ..data import load_task_file

    spec, _ = spec_for(load_task_file(eval_data, "eval"), max_positions, given=eval_data is not None)
    lens = [int(n) for k, v in spec.items() if isinstance(v, dict) for n in (v.get("lengths") or [])]
    return min(max(lens), int(max_positions)) if lens else int(max_positions)


def side_by_side(lm, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """Greedy continuations of ``prompt`` (in the model's chat template when it has one), dense and with the
    plan applied to ``lm.model``: (dense text, plan text)."""
    from ..runtime import dense

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
    return (tok.decode(gd.tolist(), skip_special_tokens=True), tok.decode(gp.tolist(), skip_special_tokens=True))


def method_label(name: str, plan: Plan, multi: bool) -> str:
    """A method's name in an eval of several plans: ``name@density`` (or ``@kvK``), else ``name``."""
    b = plan.budget
    tag = f"{b.density:g}" if b.density is not None else f"kv{b.kv_budget:g}" if b.kv_budget is not None else "?"
    return f"{name}@{tag}" if multi else name


def plan_summary(plan: Plan) -> dict:
    """A plan's head counts and the density and KV share it reaches at each budget length (run's summary)."""
    b = plan.budget
    return {"plan_counts": plan.counts(), "achieved_density": dict(zip(map(str, b.lengths), b.achieved_density)),
            "achieved_kv": dict(zip(map(str, b.lengths), b.achieved_kv))}
