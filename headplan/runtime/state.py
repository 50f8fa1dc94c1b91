"""What a patched model carries: one PlanState on one attribute, and the per-layer runtimes it lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ATTR = "_headplan"  # the model's PlanState; each patched attention module's LayerRuntime


@dataclass
class PlanState:
    """Everything ``apply`` puts on a model, so ``unapply`` can take it all off again.

    ``modules[i]`` carries ``runtimes[i]`` (the attention function is only handed its module);
    ``orig_generate``/``own_generate`` and ``orig_attn`` are what the model had before the first apply."""

    plan: Any
    tables: list
    modules: list
    runtimes: list
    prefill_chunk: int | None
    orig_generate: Any
    own_generate: bool  # `generate` was an instance attribute before apply
    orig_attn: str | None
    decode: str = "auto"  # generate()'s decode mode (runtime/graphs.py MODES)
    decoders: dict = field(default_factory=dict)  # the kept graph-captured decode step (graphs.decoder_for)
    last_decode: tuple | None = None  # (mode taken, reason it fell back to eager or None) of the last generate()


def state_of(model) -> PlanState | None:
    """The model's PlanState, or None when no plan is applied."""
    st = model.__dict__.get(ATTR)
    return st if isinstance(st, PlanState) else None
