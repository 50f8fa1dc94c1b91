"""How an eval prompt meets the cache: the retrieval prompt settings (the question in the prompt, or after the
context was compressed) and the cache a generation starts from. Shared by the grid (``driver``) and RULER."""

from __future__ import annotations

import torch

from ..errors import HeadplanError

SETTINGS = ("single", "after", "after-context", "single-context")


def setting_parts(setting: str) -> tuple[bool, str]:
    """(the context is compressed before the question, the select heads' scorer) of a prompt setting."""
    return setting.split("-")[0] == "after", "context" if setting.endswith("-context") else "obs"


def prompt_settings(task: str, g: dict) -> list[str]:
    """A retrieval task's prompt settings (spec key ``settings``, default single): ``single``, one prompt with
    the question at its end; ``after``, the question after compression: the context (instruction and
    haystack) is prefilled alone, so a plan compresses it before the question is seen, as in a multi-turn
    chat; the question follows as the next chunk (shown as ``TASK-after``); ``after-context``, the same with
    select heads scoring query-agnostically (``new_cache(scorer="context")``, shown as ``TASK-after-context``);
    ``single-context``, one prompt with the select heads scoring query-agnostically."""
    st = g.get("settings", ["single"])
    if not isinstance(st, list) or not st or any(x not in SETTINGS for x in st):
        raise HeadplanError(f"eval spec: {task}.settings must be a list of {', '.join(SETTINGS)}")
    return list(dict.fromkeys(st))


def prefilled_cache(model, ids: torch.Tensor, split: int | None, max_length: int, scorer: str = "obs"):
    """The cache a generation starts from: the plan's per-head cache for ``max_length`` tokens (select heads
    scoring with ``scorer``) where a plan is applied, else the model's own (its sliding layers keep only their
    window, as in plain generate()); with ``split``, ``ids[:, :split]`` already prefilled into it (and so
    compressed) before anything after it is seen."""
    from transformers import DynamicCache

    from ..runtime import NAME, cache_kwarg, new_cache

    cache = new_cache(model, max_length, scorer=scorer) if model.config._attn_implementation == NAME else \
        DynamicCache(config=model.config)
    if split is not None and 0 < split < ids.shape[1]:
        with torch.no_grad():
            model(ids[:, :split], logits_to_keep=1, use_cache=True, **{cache_kwarg(model): cache})
    return cache
