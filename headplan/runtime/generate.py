"""Generation through the per-head cache: new_cache, the wrapped ``generate``, chunked prefill."""

from __future__ import annotations

import torch

from ..models import cache_kwarg  # noqa: F401  (re-exported by runtime)
from ..errors import HeadplanError
from ..kernels import patterns as P
from ..plan import Plan
from .attention import NAME
from .cache import HeadplanCache
from .state import PlanState, state_of


def _state(model) -> PlanState:
    st = state_of(model)
    if st is None:
        raise HeadplanError("no plan is applied to this model (headplan.apply(model, plan) first)")
    return st


def new_cache(model, max_length: int | None = None, grow: bool = True, scorer: str = "obs") -> HeadplanCache:
    """A per-head cache for ``model`` (after apply), preallocated for ``max_length`` tokens.

    With ``grow=False`` a longer sequence raises a clear error instead of reallocating. ``scorer``: how select
    heads choose the tokens they keep at the end of each prefill chunk: ``obs`` (the chunk's last queries, as
    SnapKV; right when the question ends the prompt) or ``context`` (query-agnostic: every query of the chunk
    reading the whole text; for a context compressed before its question is known)."""
    st = _state(model)
    plan: Plan = st.plan
    if max_length is None:
        max_length = plan.model.max_positions
    return HeadplanCache(st.tables, int(max_length), grow, scorer)


def generate(orig, model, *args, **kwargs):
    """``model.generate`` while a plan is applied: gives it a per-head cache sized for the request (and
    feeds long prompts through it in chunks) unless the caller brought a cache or runs dense. On CUDA its
    decode steps are replayed from a captured CUDA graph (runtime/graphs.py; ``apply(..., decode=)``)."""
    from . import graphs

    st = state_of(model)
    if st is not None and kwargs.get("past_key_values") is None and kwargs.get("cache") is None \
            and kwargs.get("use_cache", True) and model.config._attn_implementation == NAME:
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = ids.shape[1] if ids is not None else 0
        new = _new_tokens(model, kwargs, n)
        if int(kwargs.get("num_beams", 1) or 1) > 1 and any(
                bool(((t[:, P.C_KIND] == P.STREAMING) | (t[:, P.C_KIND] == P.SELECT)).any()) for t in st.tables):
            raise HeadplanError("beam search is not supported with streaming or select heads (evicted tokens cannot be "
                                "re-ordered back); use greedy or sampling")
        need = n + int(new) + 1
        mode = graphs.resolve(st.decode, model)
        why = "decode='eager'" if mode == "eager" else graphs.eager_reason(model, st, kwargs, ids, mode == "graph")
        st.last_decode = (mode if why is None else "eager", why)
        step = None if why is not None else graphs.decoder_for(model, st, ids.shape[0], need, mode == "graph")
        cache = new_cache(model, need) if step is None else step.cache
        kwargs[cache_kwarg(model)] = cache
        chunk = st.prefill_chunk
        if chunk and ids is not None and n > chunk:
            prefill_chunked(model, ids, cache, chunk, kwargs.get("attention_mask"), upto=n - 1)
        if step is not None:
            with graphs.intercept(model, step):
                return orig(*args, **kwargs)
    return orig(*args, **kwargs)


def _new_tokens(model, kwargs: dict, n: int) -> int:
    """How many tokens ``generate`` may add to an ``n``-token prompt, as transformers reads it: the call's
    ``max_new_tokens``, else its ``max_length``, else the generation config's (the call's, then the model's)."""
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    if kwargs.get("max_length") is not None:
        return max(0, int(kwargs["max_length"]) - n)
    gc = kwargs.get("generation_config") or model.generation_config
    return int(getattr(gc, "max_new_tokens", None) or max(0, (gc.max_length or 0) - n))


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
