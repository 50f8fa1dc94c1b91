"""Run a plan inside a transformers model: attention function, per-head KV cache, apply/save/load."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import HeadplanError, PlanError
from ..kernels import patterns as P
from ..plan import Pattern, Plan, _umask, load_plan, save_plan
from .attention import NAME, LayerRuntime, headplan_attention
from .cache import HeadplanCache, HeadplanLayer

__all__ = ["apply", "dense", "compile_tables", "HeadplanCache", "HeadplanLayer", "save_patched", "load_patched",
           "register", "new_cache", "kv_report", "prefill_chunked"]

_REGISTERED = False
P_FULL = Pattern("full")


def register() -> None:
    """Register the "headplan" attention function and its mask function with transformers."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, headplan_attention)
    AttentionMaskInterface.register(NAME, causal_padding_mask)
    _REGISTERED = True


def causal_padding_mask(*args, **kwargs):
    """transformers' SDPA mask without the sliding-window overlay: the layer's own window is applied
    by the head table (column C_LWIN) in every implementation, so the mask only carries causality and
    padding, and the attention function can read each key's validity from its last row."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if kwargs.get("local_size") is not None:
        kwargs["mask_function"] = causal_mask_function
        kwargs["local_size"] = None
    return sdpa_mask(*args, **kwargs)


def compile_tables(plan: Plan) -> list[torch.Tensor]:
    """One int32 head table (Hkv, NCOLS) per layer, bounded by the layer's own sliding window."""
    return [P.make_table([e.pattern.row() for e in heads], layer_window=plan.model.window(li))
            for li, heads in enumerate(plan.layers)]


def attention_modules(model) -> list:
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention") and hasattr(m, "config")]
    return sorted(mods, key=lambda m: m.layer_idx)


def check_plan_fits(model, plan: Plan) -> None:
    from ..models import identity_of

    ident = identity_of(model.config)  # also refuses attention features the runtime cannot reproduce
    if ident.fingerprint != plan.model.fingerprint:
        raise PlanError(
            f"plan is for another model: plan has {plan.model.architecture} ({plan.model.num_layers} layers, "
            f"{plan.model.num_kv_heads} KV heads, fingerprint {plan.model.fingerprint}); this model is "
            f"{ident.architecture} ({ident.num_layers} layers, {ident.num_kv_heads} KV heads, "
            f"fingerprint {ident.fingerprint})")
    for f in ("architecture", "num_layers", "num_query_heads", "num_kv_heads", "head_dim", "max_positions",
              "layer_windows"):
        want, have = getattr(plan.model, f), getattr(ident, f)
        if want != have:
            raise PlanError(f"plan is for another model: its model.{f} is {want!r}, this model's is {have!r}")


def new_cache(model, max_length: int | None = None, grow: bool = True) -> HeadplanCache:
    """A per-head cache for ``model`` (after apply), preallocated for ``max_length`` tokens.

    With ``grow=False`` a longer sequence raises a clear error instead of reallocating."""
    plan: Plan = model._headplan_plan
    if max_length is None:
        max_length = plan.model.max_positions
    return HeadplanCache(model._headplan_tables, int(max_length), grow)


def cache_kwarg(model) -> str:
    """The keyword under which the installed transformers takes a KV cache in ``forward`` and ``generate``:
    ``cache`` where the model's forward names it so (transformers >= 5.2x; ``past_key_values`` is then
    deprecated there and warns), else ``past_key_values`` (5.17, 5.18)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _generate(orig, model, *args, **kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is None and kwargs.get("use_cache", True) \
            and model.config._attn_implementation == NAME:
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = ids.shape[1] if ids is not None else 0
        new = kwargs.get("max_new_tokens")
        if new is None:
            gc = kwargs.get("generation_config") or model.generation_config
            new = getattr(gc, "max_new_tokens", None) or max(0, (gc.max_length or 0) - n)
        if int(kwargs.get("num_beams", 1) or 1) > 1 and any(
                bool((t[:, P.C_KIND] == P.STREAMING).any()) for t in model._headplan_tables):
            raise HeadplanError("beam search is not supported with streaming heads (evicted tokens cannot be "
                                "re-ordered back); use greedy or sampling")
        cache = new_cache(model, n + int(new) + 1)
        kwargs[cache_kwarg(model)] = cache
        chunk = getattr(model, "_headplan_prefill_chunk", None)
        if chunk and ids is not None and n > chunk:
            prefill_chunked(model, ids, cache, chunk, kwargs.get("attention_mask"), upto=n - 1)
    return orig(*args, **kwargs)


@torch.no_grad()
def prefill_chunked(model, ids: torch.Tensor, cache: HeadplanCache, chunk: int, attention_mask=None,
                    upto: int | None = None):
    """Run the prompt through the cache ``chunk`` tokens at a time (streaming heads never hold more
    than their budget, so peak memory follows the plan). Returns the last chunk's logits.

    ``upto`` stops early (generate() then processes the remaining tokens itself)."""
    end = ids.shape[1] if upto is None else upto
    out = None
    for s in range(0, end, chunk):
        e = min(end, s + chunk)
        am = attention_mask[:, :e] if attention_mask is not None else None
        out = model(ids[:, s:e], attention_mask=am, use_cache=True, **{cache_kwarg(model): cache}).logits
    return out


def apply(model, plan: Plan | str | Path, check: bool = True, prefill_chunk: int | None = None,
          dense_below: int | None = None):
    """Patch ``model`` in place so its attention runs ``plan``; returns the model.

    ``dense_below``: on CUDA, unpadded prompts shorter than this many tokens run dense SDPA instead of
    the plan (measured on an H100: static plans beat dense cuDNN from ~4K tokens; plans with dynamic
    heads pay ~4 ms of index building per layer call, see BENCHMARKS.md). Default: always the plan.
    ``prefill_chunk``: generate() feeds prompts longer than this through the per-head cache in chunks
    of this many tokens, so peak KV memory follows the plan rather than the prompt length.

    Dense attention is one call away: ``headplan.runtime.dense(model)`` (a context manager).
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    if check:
        check_plan_fits(model, plan)
    else:
        from ..models import layer_windows

        if tuple(layer_windows(model.config)) != tuple(plan.model.layer_windows):
            raise PlanError(f"plan's layer windows {list(plan.model.layer_windows) or 'none'} differ from the "
                            f"model's {list(layer_windows(model.config)) or 'none'}")
    register()
    tables = compile_tables(plan)
    mods = attention_modules(model)
    if len(mods) != len(tables):
        raise PlanError(f"plan has {len(tables)} layers but the model has {len(mods)} attention modules")
    for m, t in zip(mods, tables):
        m._headplan = LayerRuntime(t, plan.block_size)
        own = getattr(m, "sliding_window", None)
        if own is not None and int(own or 0) != m._headplan.lwin:
            raise PlanError(f"layer {m.layer_idx}: the model's sliding window {own} differs from the plan's "
                            f"{m._headplan.lwin or 'none'}")
        m._headplan.dense_below = int(dense_below or 0)
    model._headplan_plan = plan
    model._headplan_tables = tables
    if prefill_chunk is not None and int(prefill_chunk) < 1:
        raise HeadplanError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    model._headplan_prefill_chunk = int(prefill_chunk) if prefill_chunk else None
    if not hasattr(model, "_headplan_orig_generate"):
        model._headplan_orig_generate = model.generate
        model.generate = functools.partial(_generate, model._headplan_orig_generate, model)
    model.set_attn_implementation(NAME)
    return model


class dense:
    """Context manager: run ``model`` with dense SDPA attention inside the block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.prev = self.model.config._attn_implementation
        self.model.set_attn_implementation("sdpa")
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.prev)
        return False


def check_patched_out(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an ``--out`` that save_patched() must not touch: a path that exists and is not a directory,
    or a non-empty directory that is not an earlier ``apply --out`` (plan.yaml headplan can read beside
    a config.json) unless ``force``."""
    from ..args import _check_out

    out = _check_out(Path(out_dir), (), "patched model", directory=True)
    if out.is_dir() and any(out.iterdir()) and not force and not _is_patched_dir(out):
        raise HeadplanError(f"--out {out}: directory is not empty and not a headplan output; pass --force to "
                            "write into it (nothing else there is removed)")
    return out


def _is_patched_dir(d: Path) -> bool:
    if not (d / "config.json").is_file():
        return False
    try:
        load_plan(d / "plan.yaml")
    except HeadplanError:
        return False
    return True


def save_patched(model, plan: Plan, out_dir: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Save weights, tokenizer and plan.yaml into a directory that load_patched() restores.

    Written into a fresh temporary directory beside ``out_dir``, then moved into place: a new directory
    is renamed into place whole; into an existing one (empty, an earlier headplan output, or any with
    ``force``) each file is moved over its namesake, and nothing else there is ever removed."""
    import os
    import shutil
    import tempfile

    out = check_patched_out(out_dir, force)
    dest = out.resolve()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise HeadplanError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        with dense(model):
            model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        save_plan(plan, tmp / "plan.yaml")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if not dest.exists():
            tmp.rename(dest)
        else:
            for f in sorted(tmp.iterdir()):
                there = dest / f.name
                if there.is_dir() and not there.is_symlink():
                    raise HeadplanError(f"--out {out}: {f.name} is a directory there; cannot write the file")
                os.replace(f, there)
    except OSError as e:
        raise HeadplanError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_patched(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a directory written by save_patched() and apply its plan; returns LoadedModel."""
    from ..models import load_model

    p = Path(path)
    if not (p / "plan.yaml").is_file():
        raise HeadplanError(f"{p}: no plan.yaml (not a directory written by `headplan apply --out`)")
    lm = load_model(str(p), dtype=dtype, device=device)
    apply(lm.model, load_plan(p / "plan.yaml"))
    return lm


def kv_report(plan: Plan, length: int, dtype_bytes: int | None = None, model=None) -> dict:
    """KV bytes per layer (the model's own dense cache vs the plan) for one sequence of ``length`` tokens,
    as the plan predicts them: the tokens each head keeps at ``length`` (``kv_share``) x ``dtype_bytes`` per
    element — the element size of ``model``'s weights when a model is given, else ``dtype_bytes``, else 2
    (bf16). Dense is what the model itself keeps: ``length`` tokens per head in a global layer, at most the
    window in a sliding layer (as transformers' sliding cache layer does).

    Not the same figure as ``HeadplanCache.kv_bytes()``: the cache reports the buffers it holds, in the
    model's dtype and preallocated for its ``max_length`` (prompt + new tokens), so a float32 model holds
    twice a bf16 prediction, and a cache made for more tokens than ``length`` holds more."""
    from ..candidates import kv_share

    if dtype_bytes is None:
        dtype_bytes = next(model.parameters()).element_size() if model is not None else 2
    per_tok = 2 * plan.model.head_dim * int(dtype_bytes)  # K and V, one head
    layers = []
    for li, heads in enumerate(plan.layers):
        lw = plan.model.window(li)
        dense_b = len(heads) * round(kv_share(P_FULL, length, lw) * length) * per_tok
        plan_b = sum(round(kv_share(e.pattern, length, lw) * length) for e in heads) * per_tok
        layers.append({"dense_bytes": dense_b, "plan_bytes": plan_b})
    tot_d = sum(x["dense_bytes"] for x in layers)
    tot_p = sum(x["plan_bytes"] for x in layers)
    return {"length": length, "dtype_bytes": int(dtype_bytes), "layers": layers, "dense_bytes": tot_d,
            "plan_bytes": tot_p, "kv_share": tot_p / tot_d if tot_d else 0.0}
