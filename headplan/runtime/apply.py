"""Put a plan on a model and take it off again: one PlanState on the model, ``apply``/``unapply``,
the ``applied`` and ``dense`` context managers, and the checks that a plan fits the model."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from ..errors import HeadplanError, PlanError
from ..kernels import patterns as P
from ..plan import Plan, load_plan
from .attention import NAME, LayerRuntime, headplan_attention
from . import graphs
from .generate import generate
from .state import ATTR, PlanState, state_of

_REGISTERED = False


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


def apply(model, plan: Plan | str | Path, check: bool = True, prefill_chunk: int | None = None,
          dense_below: int | None = None, decode: str = "auto", cost_table=None):
    """Patch ``model`` in place so its attention runs ``plan``; returns the model.

    ``dense_below``: on CUDA, unpadded prompts shorter than this many tokens run dense SDPA instead of
    the plan (measured on an H100: static plans beat dense cuDNN from ~4K tokens; plans with dynamic
    heads pay ~4 ms of index building per layer call, see BENCHMARKS.md). Default: always the plan.
    ``prefill_chunk``: generate() feeds prompts longer than this through the per-head cache in chunks
    of this many tokens, so peak KV memory follows the plan rather than the prompt length.
    ``decode``: how generate() runs its one-token steps: "auto" (CUDA: "graph", else "eager"), "graph" (a
    preallocated cache and a CUDA-graph-captured step, replayed), "static" (that step without the graph),
    "eager" (the model's forward per step). README "Decode with CUDA graphs" lists what falls back to eager.
    ``cost_table``: a cost table (path or ``CostTable``, from ``headplan costmodel measure`` on this GPU) that
    decides, per layer and prompt length, whether the layer's full heads run on the dense library (cuDNN /
    flash) while the others run the sparse kernel. Default: the table shipped for this GPU, else a fixed
    length rule (README "Routing full heads").

    Applying again replaces the plan; ``unapply(model)`` restores the model as it was before the first
    apply. Dense attention is one call away: ``headplan.runtime.dense(model)`` (a context manager).
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
    if cost_table is not None and not hasattr(cost_table, "routes_full"):
        from ..costmodel.table import load_cost_table

        cost_table = load_cost_table(cost_table)
    register()
    tables = compile_tables(plan)
    mods = attention_modules(model)
    if len(mods) != len(tables):
        raise PlanError(f"plan has {len(tables)} layers but the model has {len(mods)} attention modules")
    runtimes = []
    for m, t, layer in zip(mods, tables, plan.layers):
        rt = LayerRuntime(t, plan.block_size, [e.pattern for e in layer], cost_table)
        own = getattr(m, "sliding_window", None)
        if own is not None and int(own or 0) != rt.lwin:
            raise PlanError(f"layer {m.layer_idx}: the model's sliding window {own} differs from the plan's "
                            f"{rt.lwin or 'none'}")
        rt.dense_below = int(dense_below or 0)
        runtimes.append(rt)
    graphs.check_mode(decode)
    if prefill_chunk is not None and int(prefill_chunk) < 1:
        raise HeadplanError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    prev = state_of(model)
    if prev is None:  # first apply: remember the model as it is, and wrap generate once
        orig, own_gen, orig_attn = model.generate, "generate" in model.__dict__, model.config._attn_implementation
    else:
        orig, own_gen, orig_attn = prev.orig_generate, prev.own_generate, prev.orig_attn
        _detach(prev)
    st = PlanState(plan=plan, tables=tables, modules=mods, runtimes=runtimes,
                   prefill_chunk=int(prefill_chunk) if prefill_chunk else None, orig_generate=orig,
                   own_generate=own_gen, orig_attn=orig_attn, decode=decode)
    _attach(model, st)
    if prev is None:
        model.generate = functools.partial(generate, orig, model)
    model.set_attn_implementation(NAME)
    return model


def _attach(model, st: PlanState) -> None:
    for m, rt in zip(st.modules, st.runtimes):
        setattr(m, ATTR, rt)
    setattr(model, ATTR, st)


def _detach(st: PlanState) -> None:
    for m in st.modules:
        m.__dict__.pop(ATTR, None)


def unapply(model):
    """Take the plan off ``model``: its attention implementation and ``generate`` as before the first
    apply, no headplan attribute left on it or its modules. A model without a plan is returned as is."""
    st = state_of(model)
    if st is None:
        return model
    _detach(st)
    st.decoders.clear()
    del model.__dict__[ATTR]
    if st.own_generate:
        model.generate = st.orig_generate
    else:
        model.__dict__.pop("generate", None)
    model.set_attn_implementation(st.orig_attn)
    return model


@contextlib.contextmanager
def applied(model, plan: Plan | str | Path, **kw):
    """``with applied(model, plan): ...`` runs the block with ``plan`` applied (``apply``'s keywords in
    ``kw``) and leaves the model as it found it: without a plan, or with its earlier plan back."""
    prev, prev_attn = state_of(model), model.config._attn_implementation
    apply(model, plan, **kw)
    try:
        yield model
    finally:
        if prev is None:
            unapply(model)
        else:
            _detach(state_of(model))
            _attach(model, prev)
            model.set_attn_implementation(prev_attn)


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
