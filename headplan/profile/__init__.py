"""Profiling: what each KV head would cost the model under each candidate pattern, at several lengths.

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

Combining signals (``--method gradient,recall`` or with weights ``gradient=0.7,recall=0.3``;
default weights are equal): each signal's profile (clamped at 0) is divided by its mean over all
(layer, KV head, candidate, length) entries, then the weighted sum is stored as ``loss``. The header
records, under ``signals``, each signal's weight and scale; each signal's raw profile is stored too,
as tensor ``loss.<signal>``. A single signal is stored in its own units (weight 1, scale 1), clamped
at 0 (a negative first-order estimate, i.e. dropping would help, counts as 0).

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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..candidates import Candidate, density, kv_share
from ..errors import HeadplanError, PlanError, ProfileError
from ..plan import ModelIdentity, atomic_write
from ..progress import Reporter
from .stats import SIGNALS, Stats

FORMAT = "headplan-profile"
FORMAT_VERSION = 1
ROW_BLOCK = 256
_ATTN_NAME = "headplan_profile"
# the gradient signal split by the calibration samples' task, stored beside it (``loss.<name>``):
# ``gradient.lm`` over plain-text samples only (a next-token-loss proxy: what perplexity needs),
# ``gradient.answer`` over the answered samples only (passkey, needle, key->value: what retrieval needs)
DERIVED = {"gradient.lm": ("gradient", True), "gradient.answer": ("gradient", False)}
STATE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    model: ModelIdentity
    model_spec: str
    method: str
    lengths: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    block_size: int
    data: dict
    samples: int
    loss: torch.Tensor  # (layers, kv_heads, candidates, lengths) float32
    density: torch.Tensor  # (candidates, lengths) float64
    kv: torch.Tensor  # (candidates, lengths) float64
    versions: dict
    sha256: str = ""  # of the file it was loaded from
    signals: dict = field(default_factory=dict)  # {signal: {"weight": w, "scale": s}}; {} in old profiles
    parts: dict = field(default_factory=dict)  # {signal: (layers, kv_heads, candidates, lengths) float32}

    def header(self) -> dict:
        h = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
            "model": self.model.to_dict(), "model_spec": self.model_spec, "lengths": list(self.lengths),
            "candidates": [c.to_dict() for c in self.candidates], "block_size": self.block_size,
            "data": self.data, "samples": self.samples, "versions": self.versions,
        }
        if self.signals:
            h["signals"] = self.signals
        return h


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes that depend only on the contents: the JSON header is re-written with sorted keys
    (the library's own header order varies from process to process); the tensor data is unchanged."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    head = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data[8 + n:]


def save_profile(prof: Profile, path: str | Path) -> str:
    tensors = {"loss": prof.loss.float().contiguous(), "density": prof.density.double().contiguous(),
               "kv": prof.kv.double().contiguous()}
    for name, t in prof.parts.items():
        tensors[f"loss.{name}"] = t.float().contiguous()
    header = prof.header()
    meta = {"headplan": json.dumps(header, sort_keys=True), "digest": _digest(header, tensors)}
    data = _safetensors_bytes(tensors, meta)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_profile(path: str | Path) -> Profile:
    """Load and verify a profile (safetensors; never pickle). Reads recall-only profiles too.

    Every header field and tensor is checked (types, ranges, shapes, finite values); errors name the
    field, never the file's contents."""
    from safetensors.torch import load

    from ..plan import read_input

    p = Path(path)
    raw = read_input(p, "profile", ProfileError, text=False)
    try:
        tensors = load(raw)
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
    except Exception:  # noqa: BLE001 - safetensors raises several error types
        raise ProfileError(f"{p}: not a safetensors profile") from None
    if not isinstance(meta, dict) or "headplan" not in meta or "digest" not in meta:
        raise ProfileError(f"{p}: safetensors file has no headplan profile header")
    try:
        header = json.loads(meta["headplan"])
    except (TypeError, json.JSONDecodeError):
        raise ProfileError(f"{p}: profile header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ProfileError(f"{p}: profile header is not a mapping")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ProfileError(f"{p}: unsupported profile format (format, format_version)")
    for k in ("loss", "density", "kv"):
        if k not in tensors:
            raise ProfileError(f"{p}: profile lacks tensor {k!r}")
    if _digest(header, tensors) != meta["digest"]:
        raise ProfileError(f"{p}: profile header or tensors were modified (digest mismatch)")
    try:
        prof = _checked_profile(header, tensors, hashlib.sha256(raw).hexdigest())
    except PlanError as e:
        raise ProfileError(f"{p}: {e}") from None
    return prof


def _checked_profile(header: dict, tensors: dict[str, torch.Tensor], sha256: str) -> Profile:
    """A Profile from a verified header and tensors, every field checked (PlanError naming the field)."""
    from ..plan import MAX_BLOCK, _float, _int, _keys, _list, _need, _short, model_identity, pattern_of_row

    known = ("format", "format_version", "method", "model", "model_spec", "lengths", "candidates", "block_size",
             "data", "samples", "versions", "signals")
    _keys(header, known, "header")
    model = model_identity(_need(header, "model", "header"), "header.model")
    lengths = tuple(_int(x, f"header.lengths[{i}]", 1)
                    for i, x in enumerate(_list(_need(header, "lengths", "header"), "header.lengths")))
    if not lengths or list(lengths) != sorted(set(lengths)):
        raise PlanError("header.lengths: expected increasing distinct lengths")
    cands = []
    for i, c in enumerate(_list(_need(header, "candidates", "header"), "header.candidates")):
        name = _need(c, "name", f"header.candidates[{i}]")
        if not isinstance(name, str) or not name:
            raise PlanError(f"header.candidates[{i}].name: expected a name, got {_short(name)}")
        if any(x.name == name for x in cands):
            raise PlanError(f"header.candidates[{i}].name: {_short(name)} appears twice")
        cands.append(Candidate(name, pattern_of_row(c, f"header.candidates[{i}]")))
    if not cands:
        raise PlanError("header.candidates: empty")
    block = _int(_need(header, "block_size", "header"), "header.block_size", 16, MAX_BLOCK)
    samples = _int(_need(header, "samples", "header"), "header.samples", 1)
    for k in ("method", "model_spec"):
        if not isinstance(_need(header, k, "header"), str):
            raise PlanError(f"header.{k}: expected a string, got {_short(header[k])}")
    for k in ("data", "versions"):
        if not isinstance(_need(header, k, "header"), dict):
            raise PlanError(f"header.{k}: expected a mapping, got {type(header[k]).__name__}")
    signals = header.get("signals", {})
    if not isinstance(signals, dict):
        raise PlanError(f"header.signals: expected a mapping, got {type(signals).__name__}")
    for s, v in signals.items():
        if s not in SIGNALS:
            raise PlanError(f"header.signals.{s}: unknown signal (known: {', '.join(SIGNALS)})")
        _keys(v, ("weight", "scale"), f"header.signals.{s}")
        for k in ("weight", "scale"):
            if _float(_need(v, k, f"header.signals.{s}"), f"header.signals.{s}.{k}") <= 0:
                raise PlanError(f"header.signals.{s}.{k}: must be positive")
    L, H, C, N = model.num_layers, model.num_kv_heads, len(cands), len(lengths)
    parts = {}
    for k, t in tensors.items():
        if k in ("loss", "density", "kv"):
            continue
        name = k[len("loss."):] if k.startswith("loss.") else None
        if name not in SIGNALS and name not in DERIVED:
            raise PlanError(f"tensor {_short(k)}: not a profile tensor")
        parts[name] = t
    for k, t, shape, dtype in ([("loss", tensors["loss"], (L, H, C, N), torch.float32),
                                ("density", tensors["density"], (C, N), torch.float64),
                                ("kv", tensors["kv"], (C, N), torch.float64)]
                               + [(f"loss.{n}", t, (L, H, C, N), torch.float32) for n, t in parts.items()]):
        if tuple(t.shape) != shape:
            raise PlanError(f"tensor {k}: has shape {tuple(t.shape)}, the header implies {shape}")
        if t.dtype != dtype:
            raise PlanError(f"tensor {k}: expected {dtype}, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise PlanError(f"tensor {k}: holds NaN or infinite values")
        if k in ("density", "kv") and not bool(((t >= 0) & (t <= 1)).all()):
            raise PlanError(f"tensor {k}: values must be in [0, 1]")
        if k == "loss" and bool((t < 0).any()):
            raise PlanError("tensor loss: values must be >= 0")
    return Profile(model=model, model_spec=header["model_spec"], method=header["method"], lengths=lengths,
                   candidates=tuple(cands), block_size=block, data=header["data"], samples=samples,
                   loss=tensors["loss"], density=tensors["density"], kv=tensors["kv"], versions=header["versions"],
                   sha256=sha256, signals=signals, parts=parts)


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------

def parse_method(method: str | dict, known: tuple[str, ...] = SIGNALS) -> dict[str, float]:
    """'gradient' | 'gradient,recall' | 'gradient=0.7,recall=0.3' -> {signal: weight} (ordered).

    known: the accepted names (the profiling signals; ``--signals``/``--keep`` also accept the
    stored task splits of the gradient signal, ``DERIVED``)."""
    if isinstance(method, dict):
        items = [(str(k), v) for k, v in method.items()]
    else:
        items = []
        for part in str(method).replace(" ", "").split(","):
            if not part:
                continue
            name, _, w = part.replace(":", "=").partition("=")
            items.append((name, w if w else None))
    if not items:
        raise HeadplanError("--method is empty (known: " + ", ".join(known) + ")")
    out: dict[str, float] = {}
    for name, w in items:
        if name not in known:
            raise HeadplanError(f"unknown profiling method {name!r} (known: {', '.join(known)})")
        if name in out:
            raise HeadplanError(f"--method names {name!r} twice")
        try:
            out[name] = float(w) if w is not None else 1.0 / len(items)
        except (TypeError, ValueError):
            raise HeadplanError(f"--method: weight of {name!r} is not a number: {w!r}") from None
        if not (out[name] > 0 and math.isfinite(out[name])):
            raise HeadplanError(f"--method: weight of {name!r} must be positive, got {w}")
    return out


def method_name(weights: dict[str, float]) -> str:
    return "+".join(weights)


def combine(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict]:
    """The stored loss from each signal's profile: a weighted sum after dividing each by its mean."""
    if len(weights) == 1:
        (name,) = weights
        return parts[name].clamp(min=0.0), {name: {"weight": 1.0, "scale": 1.0}}
    loss = torch.zeros_like(next(iter(parts.values())))
    hdr = {}
    for name, w in weights.items():
        x = parts[name].clamp(min=0.0)
        scale = float(x.mean())
        scale = scale if scale > 0 else 1.0
        loss += w * x / scale
        hdr[name] = {"weight": w, "scale": scale}
    return loss, hdr


# ------------------------------------------------------------------------------------------------
# the attention function the model runs while profiling
# ------------------------------------------------------------------------------------------------

class _State:
    stats: Stats | None = None
    grad: bool = False


_STATE = _State()


class _Collector(Stats):
    """Recall-only statistics (kept for callers of the first profiler): ``.layer(l, q, k, scale)``."""

    def __init__(self, candidates: list[Candidate], n_layers: int, n_kv: int, block: int):
        super().__init__(candidates, n_layers, n_kv, block, ("recall",))

    @property
    def loss(self) -> torch.Tensor:
        return self.acc["recall"]

    def layer(self, layer_idx, q, k, scale, v=None, dout=None):  # noqa: D102
        return super().layer(layer_idx, q, k, v, scale, dout)


def _sdpa(q, k, v, scale, lwin: int = 0):
    """The layer's own dense attention: causal, within its sliding window ``lwin`` (0 = none)."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    if not lwin:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(q.shape[2], device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < lwin), scale=scale)


class _GradAttention(torch.autograd.Function):
    """Causal SDPA whose backward first hands (q, k, v, dL/dO) to the active statistics."""

    @staticmethod
    def forward(ctx, q, k, v, scale, layer_idx, lwin):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        ctx.layer_idx = layer_idx
        ctx.lwin = lwin
        return _sdpa(q, k, v, scale, lwin)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        if _STATE.stats is not None:
            _STATE.stats.layer(ctx.layer_idx, q[0], k[0], v[0], ctx.scale, dout[0], lwin=ctx.lwin)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = _sdpa(qq, kk, vv, ctx.scale, ctx.lwin)
            dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), dout)
        return dq, dk, dv, None, None, None


def _profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = _STATE.stats
    if st is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        lwin = int(kwargs.get("sliding_window") or 0)  # the layer's own window: the dense reference
        if kwargs.get("softcap"):
            raise HeadplanError("attention logit softcapping is not supported by headplan")
        if _STATE.grad:
            out = _GradAttention.apply(query, key, value, scale, module.layer_idx, lwin)
            return out.transpose(1, 2).contiguous(), None
        st.layer(module.layer_idx, query[0].detach(), key[0].detach(), value[0].detach(), scale, lwin=lwin)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTN_NAME, _profile_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)


def versions() -> dict:
    import transformers

    return {"headplan": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


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


# ------------------------------------------------------------------------------------------------
# resumable state
# ------------------------------------------------------------------------------------------------

class _StateDir:
    """Per-sample statistics on disk: DIR/run.json (the run's key) and DIR/n<len>-s<idx>.safetensors."""

    def __init__(self, path: str | Path, key: str, desc: dict, rank: int):
        self.dir = Path(path)
        self.key = key
        if self.dir.exists() and not self.dir.is_dir():
            raise HeadplanError(f"--resume must be a directory: {self.dir}")
        run = self.dir / "run.json"
        if run.is_file():
            try:
                old = json.loads(run.read_text()).get("key")
            except (OSError, json.JSONDecodeError, AttributeError):
                raise HeadplanError(f"--resume {self.dir}: run.json is unreadable; use an empty directory") from None
            if old != key:
                raise HeadplanError(f"--resume {self.dir} holds another run's statistics (different model, data, "
                                    "method, candidates or lengths); use an empty directory")
        elif rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run, json.dumps({"key": key, "state_version": STATE_VERSION, **desc}, indent=1,
                                         sort_keys=True))

    def _file(self, n: int, i: int) -> Path:
        return self.dir / f"n{n}-s{i}.safetensors"

    def load(self, n: int, i: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors import safe_open
        from safetensors.torch import load

        f = self._file(n, i)
        if not f.is_file():
            return None
        try:
            raw = f.read_bytes()
            t = load(raw)
            with safe_open(str(f), framework="pt") as g:
                meta = g.metadata() or {}
        except Exception:  # noqa: BLE001 - a torn or foreign file: recompute the sample
            return None
        if meta.get("key") != self.key:
            return None
        try:
            smeta = json.loads(meta.get("sample", "{}"))
        except json.JSONDecodeError:
            return None
        return t, smeta

    def save(self, n: int, i: int, stats: dict[str, torch.Tensor], meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = _safetensors_bytes({k: v.contiguous() for k, v in stats.items()},
                                  metadata={"key": self.key, "sample": json.dumps(meta, sort_keys=True, default=str)})
        atomic_write(self._file(n, i), data)


@contextlib.contextmanager
def _nullctx():
    yield lambda n=1: None


def _dist_info(dev: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
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
    signals = tuple(s for s in SIGNALS if s in weights)
    grad = "gradient" in weights
    ident: ModelIdentity = lm.identity
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
    answers, reserve, lm_tail = answer_options(data_spec)
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
    cand_dicts = [c.to_dict() for c in candidates]
    desc = {"model": ident.fingerprint, "model_spec": lm.spec, "method": weights, "lengths": lengths,
            "candidates": cand_dicts, "block": block, "data": data}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
    state = _StateDir(resume, key, desc, rank) if resume is not None else None
    if state is not None and world > 1:
        import torch.distributed as dist

        dist.barrier()

    model = lm.model
    L, H, C = ident.num_layers, ident.num_kv_heads, len(candidates)
    per = {s: torch.zeros(len(jobs), L, H, C, dtype=torch.float64) for s in signals}
    metas: list[dict | None] = [None] * len(jobs)
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

    _register()
    prev = model.config._attn_implementation
    ckpt = (dev.type == "cuda") if checkpointing is None else bool(checkpointing)
    # the sequences; model answers are written by the dense (SDPA) model before profiling starts
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
    try:
        model.set_attn_implementation(_ATTN_NAME)
        stats = Stats(candidates, L, H, block, signals)
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

    if world > 1:  # each sample's statistics come from exactly one rank: the sum is exact
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, metas)
        metas = [next((g[t] for g in gathered if g[t] is not None), None) for t in range(len(jobs))]
        for s in signals:
            buf = per[s].to(dev) if dist.get_backend() == "nccl" else per[s]
            dist.all_reduce(buf)
            per[s] = buf.cpu()
    full = [ci for ci, c in enumerate(candidates) if c.pattern.kind == "full"]

    def reduce(stats, chosen) -> torch.Tensor:  # per length: the mean of the chosen samples, in sample order
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
    loss, sig_hdr = combine({s: parts[s].double() for s in signals}, weights)
    dens = torch.tensor([[density(c.pattern, n, block) for n in lengths] for c in candidates], dtype=torch.float64)
    kv = torch.tensor([[kv_share(c.pattern, n) for n in lengths] for c in candidates], dtype=torch.float64)
    if all(m is not None for m in metas):
        data["samples"] = metas  # how each sample was made (task, options, seed, answer source, loss span)
    plain = signals == ("recall",)  # a recall-only profile stores just its loss (the first format)
    return Profile(model=ident, model_spec=lm.spec, method=method_name(weights), lengths=tuple(lengths),
                   candidates=tuple(candidates), block_size=block, data=data, samples=n_samp,
                   loss=loss.float(), density=dens, kv=kv, versions=versions(),
                   signals={} if plain else sig_hdr, parts={} if plain else parts)


# ------------------------------------------------------------------------------------------------
# pictures: short-window heat map and the most retrieval-like heads
# ------------------------------------------------------------------------------------------------

def short_window(prof: Profile) -> int:
    """Index of the short-window candidate: the fixed streaming window with the least KV."""
    best = None
    for ci, c in enumerate(prof.candidates):
        p = c.pattern
        if p.kind == "streaming" and p.window.beta == 0.0:
            k = (p.window.alpha, p.sink)
            if best is None or k < best[0]:
                best = (k, ci)
    if best is None:
        raise HeadplanError("the profile has no fixed sink + window candidate to plot")
    return best[1]


def retrieval_heads(prof: Profile, top: int = 10) -> list[dict]:
    """Heads that lose most under the short window (averaged over lengths): retrieval-like heads."""
    ci = short_window(prof)
    x = prof.loss[:, :, ci, :].double().mean(-1)  # (layers, kv)
    order = torch.argsort(x.flatten(), descending=True, stable=True)[:top]
    H = prof.model.num_kv_heads
    out = []
    for rank, f in enumerate(order.tolist()):
        layer, h = divmod(f, H)
        row = {"rank": rank + 1, "layer": layer, "kv_head": h, "candidate": prof.candidates[ci].name,
               "loss": float(x[layer, h])}
        for s, t in prof.parts.items():
            row[s] = float(t[layer, h, ci].double().mean())
        out.append(row)
    return out


def plot_profile(prof: Profile, path: str | Path) -> Path:
    """PNG heat map (layers x KV heads) of the loss under the short-window candidate."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ci = short_window(prof)
    x = prof.loss[:, :, ci, :].double().mean(-1).numpy()
    L, H = x.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.45 * H), max(3.0, 0.8 + 0.22 * L)), dpi=110)
    im = ax.imshow(x, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    step = max(1, L // 16)
    ax.set_yticks(range(0, L, step))
    ax.set_title(f"{prof.method} loss under {prof.candidates[ci].name}\n"
                 f"(mean over lengths {', '.join(map(str, prof.lengths))})", fontsize=9)
    fig.colorbar(im, ax=ax, label="loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
