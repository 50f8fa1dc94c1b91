"""The KV memory a plan predicts, per layer, against the model's own dense cache."""

from __future__ import annotations

from ..plan import Pattern, Plan

P_FULL = Pattern("full")


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
