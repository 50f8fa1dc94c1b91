"""The profiler: run the model on calibration samples at each length and measure every KV head.

The profile stores, per (layer, KV head, candidate, length), the *loss* the candidate would cost
(larger = worse; ``full`` is always 0). Signals (``--method``, see ``stats.py`` for the formulas):

- ``recall``:   the attention probability mass the candidate drops (``1 - recall``), averaged over
                query rows, the query heads of the KV group and samples. Forward only.
- ``gradient``: MoA attention influence: the first-order increase of the calibration loss (mean NLL
                of the answer tokens; of the last ``lm_tail`` of an lm sample) from dropping the
                entries the candidate does not keep, with the row renormalised; summed over the
                dropped entries and the group's query heads, averaged over samples. One forward
                and one backward pass per sample; statistics are taken block by block from Q, K, V
                and dL/dO inside the backward of each layer's attention.
- ``mse``:      the candidate's head output error against dense attention, normalised per head
                (Sparse-vDiT). Forward only.

Combining signals: see ``signals.py``.

Memory stays bounded: statistics are taken one layer, one KV head and one block of query rows at a
time (never all heads' N x N at once).

Resumable: with ``resume=DIR`` each finished sample's statistics are written to ``DIR`` (safetensors,
no pickle) and a later run with the same settings skips them; the profile is always reduced from the
per-sample statistics in sample order, so a resumed run gives the same profile, bit for bit.
Data-parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) samples are dealt round-robin to ranks and the
per-sample statistics are all-reduced (NCCL on CUDA, gloo on CPU) before the same ordered reduction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..candidates import Candidate, density, kv_share
from ..errors import HeadplanError
from ..plan import ModelIdentity
from ..progress import Reporter
from .format import Profile, versions
from .hook import _ATTN_NAME, _STATE, _register
from .resume import _StateDir
from .gates import head_scaled_loss, reference_candidate, train_gates
from .signals import DERIVED, combine, method_name, parse_method
from .stats import SIGNALS, Stats


# ------------------------------------------------------------------------------------------------
# calibration sequences
# ------------------------------------------------------------------------------------------------

@dataclass
class _Seq:
    ids: list[int]
    loss_from: int  # the loss is on tokens ids[loss_from:] (predicted from the previous position)
    meta: dict


def _model_answer(lm, prompt: list[int], n_new: int, dev) -> list[int]:
    """The dense model's greedy answer (SDPA, before the profiling attention is switched on)."""
    model = lm.model
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    ids = torch.tensor([prompt], device=dev)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                             pad_token_id=eos if eos is not None else 0)
    gen = out[0, ids.shape[1]:].tolist()
    stops = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    for t, tok in enumerate(gen):
        if tok in stops:
            return gen[:t]
    return gen


def _sequence(lm, smp, length: int, answers: str, reserve: int, lm_tail: float, dev) -> _Seq:
    from ..data import ANSWER_TASKS

    meta = dict(smp.meta)
    ids = list(smp.input_ids)
    if smp.task not in ANSWER_TASKS:
        tail = max(1, int(round(length * lm_tail)))
        meta.update({"loss": f"last {tail} tokens", "tokens": len(ids)})
        return _Seq(ids, len(ids) - tail, meta)
    ref = list(smp.answer_ids)[:reserve]
    ans, src = ref, "reference"
    if answers == "model":
        gen = _model_answer(lm, ids, reserve, dev)
        if gen:
            ans, src = gen, "model"
        text = lm.tokenizer.decode(gen, skip_special_tokens=True)
        meta.update({"model_answer": text, "model_answer_ids": list(gen), "model_correct": smp.answer.strip() in text})
    meta.update({"loss": f"{src} answer", "answer_source": src, "reference": smp.answer,
                 "tokens": len(ids) + len(ans), "answer_tokens": len(ans)})
    return _Seq(ids + ans, len(ids), meta)


@contextlib.contextmanager
def _nullctx():
    yield lambda n=1: None


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain run.
    The one place headplan reads RANK, WORLD_SIZE and LOCAL_RANK."""
    return (int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1),
            int(os.environ.get("LOCAL_RANK", "0") or 0))


def _dist_info(dev: torch.device) -> tuple[int, int]:
    """(rank, world size) of this process, joining the process group under torchrun."""
    world = dist_env()[1]
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if dev.type == "cuda":  # one GPU per rank: NCCL collectives use the current device
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------------------------
# the profiler
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _grad_mode(model, on: bool, ckpt: bool):
    """For the gradient pass: no parameter gradients, a graph from the embeddings on, and optionally
    activation (gradient) checkpointing; everything restored afterwards."""
    if not on:
        yield
        return
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    kw = {"use_reentrant": False}
    new_api = hasattr(model, "activation_checkpointing_enable")
    try:
        if ckpt:
            if new_api:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
            model.train()  # transformers checkpoints only in training mode (attention dropout is 0)
        yield
    finally:
        hook.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, p.requires_grad))
        if ckpt:
            (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        model.train(was_training)


def _run_one(model, seq: _Seq, stats: Stats, grad: bool, dev) -> float:
    ids = torch.tensor([seq.ids], device=dev)
    stats.reset()
    _STATE.stats = stats
    _STATE.grad = grad
    try:
        if not grad:
            with torch.no_grad():
                model(ids, use_cache=False, logits_to_keep=1)
            return float("nan")
        pos = torch.arange(seq.loss_from - 1, len(seq.ids) - 1, device=dev)
        with torch.enable_grad():
            out = model(ids, use_cache=False, logits_to_keep=pos)
            logits = out.logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, seq.loss_from:])
            loss.backward()
        return float(loss.detach())
    finally:
        _STATE.stats = None
        _STATE.grad = False


GATE_DEFAULTS = {"length": 1024, "samples": 8, "steps": 32, "lr": 0.05, "penalty": 0.05, "seed": 0}


def gate_options(spec: dict, lengths: list[int]) -> dict:
    """The gate optimisation's settings: the data spec's ``gates:`` mapping over ``GATE_DEFAULTS``; the
    training length is at most the longest profiled length."""
    given = spec.get("gates") or {}
    if not isinstance(given, dict):
        raise HeadplanError("data spec: gates must be a mapping (length, samples, steps, lr, penalty, seed)")
    unknown = sorted(set(given) - set(GATE_DEFAULTS))
    if unknown:
        raise HeadplanError(f"data spec: gates.{unknown[0]}: unknown key (known: {', '.join(GATE_DEFAULTS)})")
    out = dict(GATE_DEFAULTS)
    for k, v in given.items():
        typ = float if k in ("lr", "penalty") else int
        try:
            out[k] = typ(v)
        except (TypeError, ValueError):
            raise HeadplanError(f"data spec: gates.{k} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not (out[k] >= 0) or (k != "penalty" and k != "seed" and out[k] <= 0):
            raise HeadplanError(f"data spec: gates.{k} must be positive, got {v!r}")
    out["length"] = min(out["length"], max(lengths))
    if out["length"] < 64:
        raise HeadplanError(f"data spec: gates.length must be at least 64, got {out['length']}")
    from ..data import ANSWER_TASKS, mixture_counts

    counts = mixture_counts(spec, out["samples"])
    if not sum(c for t, c in zip(spec.get("tasks") or [], counts) if t.get("task") in ANSWER_TASKS):
        raise HeadplanError(f"the gate signal needs answered samples (passkey, needle, kv_retrieval) among its "
                            f"{out['samples']} samples: add one to the data spec's tasks or raise gates.samples")
    return out


def gate_sequences(lm, hay, spec: dict, n: int, samples: int, dev) -> list[_Seq]:
    """The mixture's samples at length ``n`` with their reference answers appended (what the gates fit)."""
    from ..data import answer_options, mixture_samples

    _, reserve, lm_tail = answer_options(spec)
    return [_sequence(lm, s, n, "reference", reserve, lm_tail, dev)
            for s in mixture_samples(hay, spec, n, samples, reserve=reserve)]


def _gates(lm, hay, spec: dict, lengths: list[int], candidates: list[Candidate], rep: Reporter, dev):
    """Gate optimisation (``gates.py``) on the mixture's samples at the gate length, every head's sparse side
    the reference candidate. Returns (gates (layers, KV heads), reference index, header info)."""
    opt = gate_options(spec, lengths)
    n = opt["length"]
    ref = reference_candidate(candidates, n)
    seqs = gate_sequences(lm, hay, spec, n, opt["samples"], dev)
    ident = lm.identity
    rows = [[candidates[ref].pattern.row()] * ident.num_kv_heads for _ in range(ident.num_layers)]
    with rep.task(f"training gates ({opt['steps']} steps at {n} tokens)", opt["steps"]) as advance:
        g, losses = train_gates(lm, seqs, rows, opt["steps"], lr=opt["lr"], penalty=opt["penalty"],
                                seed=opt["seed"], advance=advance)
    info = {**opt, "reference": candidates[ref].name, "first_loss": round(losses[0], 6),
            "last_loss": round(losses[-1], 6), "values": [[round(float(x), 4) for x in row] for row in g.tolist()]}
    return g, ref, info


def _check_lengths(lengths, ident: ModelIdentity, candidates) -> list[int]:
    lengths = sorted(set(int(x) for x in lengths))
    if not lengths:
        raise HeadplanError("no lengths to profile")
    for n in lengths:
        if n > ident.max_positions:
            raise HeadplanError(f"length {n} exceeds the model's {ident.max_positions} positions")
        if n < 64:
            raise HeadplanError(f"length {n} is too short to profile (minimum 64)")
    if not candidates:
        raise HeadplanError("no candidate patterns")
    return lengths


def _resumed(state, mine, jobs, per, metas, signals, rep) -> list[int]:
    """This rank's jobs still to run; what ``state`` (the resume directory) holds goes into ``per``/``metas``."""
    todo = []
    for jb in mine:
        t = jobs.index(jb)
        got = state.load(jb[1], jb[2]) if state is not None else None
        if got is not None and all(s in got[0] for s in signals):
            for s in signals:
                per[s][t] = got[0][s].double()
            metas[t] = got[1]
        else:
            todo.append(t)
    if state is not None and len(todo) < len(mine):
        rep.log(f"resuming from {state.dir}: {len(mine) - len(todo)} of {len(mine)} samples already done")
    return todo


def _sequences(lm, todo, jobs, sets, grad: bool, answers, reserve, lm_tail, dev, rep) -> dict[int, _Seq]:
    """The sequences to profile; model answers are written by the dense (SDPA) model before profiling starts."""
    seqs: dict[int, _Seq] = {}
    n_gen = sum(1 for t in todo if answers == "model" and grad and sets[jobs[t][1]][jobs[t][2]].answer_ids)
    with rep.task("model answers", n_gen) if n_gen else _nullctx() as adv_gen:
        for t in todo:
            _, n, i = jobs[t]
            smp = sets[n][i]
            if grad:
                seqs[t] = _sequence(lm, smp, n, answers, reserve, lm_tail, dev)
                if answers == "model" and smp.answer_ids:
                    adv_gen()
            else:
                seqs[t] = _Seq(list(smp.input_ids), len(smp.input_ids), dict(smp.meta))
    return seqs


def _measure(lm, todo, jobs, seqs, candidates, block, signals, grad, ckpt, state, per, metas, weights, dev, rep):
    """Every sample still to run through the profiling attention; its statistics into ``per``/``metas`` (and
    the resume directory)."""
    model = lm.model
    ident = lm.identity
    _register()
    prev = model.config._attn_implementation
    try:
        model.set_attn_implementation(_ATTN_NAME)
        stats = Stats(candidates, ident.num_layers, ident.num_kv_heads, block, signals)
        with _grad_mode(model, grad and bool(todo), ckpt), \
                rep.task(f"profiling ({method_name(weights)})", len(todo)) as advance:
            for t in todo:
                li, n, i = jobs[t]
                seq = seqs[t]
                nll = _run_one(model, seq, stats, grad, dev)
                for s in signals:
                    per[s][t] = stats.acc[s]
                if grad:
                    seq.meta["nll"] = nll
                metas[t] = seq.meta
                if state is not None:
                    state.save(n, i, {s: per[s][t].clone() for s in signals}, seq.meta)
                advance()
    finally:
        _STATE.stats = None
        _STATE.grad = False
        model.set_attn_implementation(prev)


def _gathered(per, metas, signals, jobs, world, dev):
    """Across ranks: each sample's statistics come from exactly one rank, so the sum is exact."""
    if world <= 1:
        return per, metas
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, metas)
    metas = [next((g[t] for g in gathered if g[t] is not None), None) for t in range(len(jobs))]
    for s in signals:
        buf = per[s].to(dev) if dist.get_backend() == "nccl" else per[s]
        dist.all_reduce(buf)
        per[s] = buf.cpu()
    return per, metas


def _parts(per, metas, signals, jobs, lengths, candidates, ident) -> dict:
    """Each signal's profile (layers, KV heads, candidates, lengths): per length the mean of its samples, in
    sample order (full candidates 0); the gradient split by task where every length has such samples."""
    L, H, C = ident.num_layers, ident.num_kv_heads, len(candidates)
    full = [ci for ci, c in enumerate(candidates) if c.pattern.kind == "full"]

    def reduce(stats, chosen) -> torch.Tensor:
        out = torch.zeros(L, H, C, len(lengths), dtype=torch.float64)
        for li, ts in enumerate(chosen):
            acc = torch.zeros(L, H, C, dtype=torch.float64)
            for t in ts:  # fixed order: same result however the samples were computed
                acc += stats[t]
            out[..., li] = acc / len(ts)
        out[:, :, full] = 0.0
        return out.float()

    by_len = [[t for t, jb in enumerate(jobs) if jb[0] == li] for li in range(len(lengths))]
    parts = {s: reduce(per[s], by_len) for s in signals}
    for name, (s, lm_only) in DERIVED.items():
        if s not in signals or any(m is None for m in metas):
            continue
        sel = [[t for t in ts if (metas[t].get("task") == "lm") == lm_only] for ts in by_len]
        if all(sel):  # a length without such samples: no split (the mixture or --samples is too small)
            parts[name] = reduce(per[s], sel)
    return parts


def profile(lm, lengths: list[int], candidates: list[Candidate], data_spec: dict, texts: list[str] | None = None,
            samples: int | None = None, block: int = 64, reporter: Reporter | None = None,
            method: str | dict = "recall", resume: str | Path | None = None,
            checkpointing: bool | None = None) -> Profile:
    """Run the model on calibration samples at each length and measure every KV head.

    method: see ``parse_method``. resume: a directory for per-sample statistics (continue a killed
    run). checkpointing: gradient checkpointing for the gradient pass (default: on for CUDA).
    """
    from ..data import Haystack, answer_options, load_texts, mixture_samples

    rep = reporter or Reporter()
    weights = parse_method(method)
    gates_on = "gates" in weights  # gate optimisation scales the recall profile: recall is measured too
    signals = tuple(s for s in SIGNALS if s in weights or (gates_on and s == "recall"))
    grad = "gradient" in weights
    ident: ModelIdentity = lm.identity
    lengths = _check_lengths(lengths, ident, candidates)
    answers, reserve, lm_tail = answer_options(data_spec)
    if gates_on:
        gate_options(data_spec, lengths)  # a bad gates: section fails before any work
    text, text_desc = load_texts(texts)
    hay = Haystack(lm.tokenizer, text)
    n_samp = int(samples if samples is not None else data_spec.get("samples_per_length", 4))
    if n_samp < 1:
        raise HeadplanError("--samples must be at least 1")
    # answered sequences (prompt + answer) only when a loss is needed: recall/mse-only profiles keep
    # the exact-length samples of the first profiler
    sets = {n: mixture_samples(hay, data_spec, n, n_samp, reserve=reserve if grad else 0) for n in lengths}
    jobs = [(li, n, i) for li, n in enumerate(lengths) for i in range(len(sets[n]))]
    dev = lm.model.get_input_embeddings().weight.device
    rank, world = _dist_info(dev)
    mine = [jb for t, jb in enumerate(jobs) if t % world == rank]
    data = {"spec": data_spec, "texts": text_desc, "samples_per_length": n_samp}
    if grad:
        data["loss"] = {"answers": answers, "answer_tokens": reserve, "lm_tail": lm_tail}
    desc = {"model": ident.fingerprint, "model_spec": lm.spec, "method": weights, "lengths": lengths,
            "candidates": [c.to_dict() for c in candidates], "block": block, "data": data}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
    state = _StateDir(resume, key, desc, rank) if resume is not None else None
    if state is not None and world > 1:
        import torch.distributed as dist

        dist.barrier()
    L, H, C = ident.num_layers, ident.num_kv_heads, len(candidates)
    per = {s: torch.zeros(len(jobs), L, H, C, dtype=torch.float64) for s in signals}
    metas: list[dict | None] = [None] * len(jobs)
    todo = _resumed(state, mine, jobs, per, metas, signals, rep)
    ckpt = (dev.type == "cuda") if checkpointing is None else bool(checkpointing)
    seqs = _sequences(lm, todo, jobs, sets, grad, answers, reserve, lm_tail, dev, rep)
    _measure(lm, todo, jobs, seqs, candidates, block, signals, grad, ckpt, state, per, metas, weights, dev, rep)
    per, metas = _gathered(per, metas, signals, jobs, world, dev)
    parts = _parts(per, metas, signals, jobs, lengths, candidates, ident)
    if gates_on:
        g, ref, ginfo = _gates(lm, hay, data_spec, lengths, candidates, rep, dev)
        parts["gates"] = head_scaled_loss(g, parts["recall"], torch.full(g.shape, ref)).float()
        data["gates"] = ginfo
    return _assembled(lm, lengths, candidates, block, data, n_samp, metas, parts, weights, signals, gates_on)


def _assembled(lm, lengths, candidates, block, data, n_samp, metas, parts, weights, signals, gates_on) -> Profile:
    loss, sig_hdr = combine({s: parts[s].double() for s in weights}, weights)
    dens = torch.tensor([[density(c.pattern, n, block) for n in lengths] for c in candidates], dtype=torch.float64)
    kv = torch.tensor([[kv_share(c.pattern, n) for n in lengths] for c in candidates], dtype=torch.float64)
    if all(m is not None for m in metas):
        data["samples"] = metas  # how each sample was made (task, options, seed, answer source, loss span)
    plain = signals == ("recall",) and not gates_on  # a recall-only profile stores just its loss (the first format)
    return Profile(model=lm.identity, model_spec=lm.spec, method=method_name(weights), lengths=tuple(lengths),
                   candidates=tuple(candidates), block_size=block, data=data, samples=n_samp,
                   loss=loss.float(), density=dens, kv=kv, versions=versions(),
                   signals={} if plain else sig_hdr, parts={} if plain else parts)
