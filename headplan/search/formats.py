"""``--format-windows F``: search only among what export format F (``headplan.export``) can express.

Per (layer, candidate), from ``headplan.export``'s own reading of a head (``export.effective``: what it sees as
sink + fixed window in that layer, or ``Unfit``) and of the transformers family (``export.hf_family``):

- a candidate the format cannot state in that layer is not allowed there (elastic windows, the dynamic and
  selection kinds, sinks in a layer with its own window; for ``hf-layer-types`` any sink, a window in a family
  with none (Llama), a layer changing type where the type picks more than the window (Gemma 3));
- what the format holds once for the whole model is a **shape** key: ``hf-layer-types`` one sliding window
  (and, where the family has one ``sliding_window`` for every layer, one attention for every layer),
  ``trtllm`` one sink size among the window layers, ``duo-tsv`` one (sink, window) among the streaming heads.
  The search adds one binary per shape and allows at most one (``shape_rows``).

The plan the search returns is then checked with ``export.refusal`` (the export's own rules are the last word).
"""

from __future__ import annotations

from ..errors import HeadplanError

FREE = "free"  # a choice that takes no shape (full where the format states it without a window)


def format_keys(model, candidates, fmt: str) -> list[list[object]]:
    """(layers, C): None where ``fmt`` cannot express candidate c in layer l, ``FREE`` where it can without a
    model-wide shape, else the shape it takes (hashable; two choices with different shapes cannot coexist)."""
    from ..export import Unfit, _cap, _own, effective, hf_family

    fam = hf_family(model.architecture) if fmt == "hf-layer-types" else None
    mp = model.max_positions
    out = []
    for li in range(model.num_layers):
        cap, row = _cap(model, li), []
        for c in candidates:
            try:
                d = effective(c.pattern, cap, mp)
            except Unfit:
                row.append(None)
                continue
            row.append(_key(fmt, fam, d, _own(cap), bool(model.window(li))))
        out.append(row)
    return out


def _key(fmt: str, fam, d, own, sliding: bool):
    if fmt == "duo-tsv":
        return FREE if d == own else ("stream", d.sink, d.window)
    if fmt == "trtllm":
        return FREE if d.window is None else ("sink", d.sink)
    # hf-layer-types (export._hf_files)
    if d.window is not None and d.sink:
        return None
    if fam.kind == "none":
        return FREE if d.window is None else None
    if fam.typed and (d.window is not None) != sliding:
        return None
    if fam.kind == "global":  # one sliding_window for every layer: every layer sees the same
        return ("attn", d.sink, d.window)
    return FREE if d.window is None else ("window", d.window)


def shape_rows(prob, keys_of_unit) -> None:
    """At most one shape in the plan: one binary per shape, their sum <= 1, and each choice with that shape
    only where its binary is set. ``keys_of_unit(u)``: the (C,) keys of unit ``u``'s layer."""
    C = prob.C
    order: dict = {}
    for u in range(prob.H):
        for k in keys_of_unit(u):
            if k is not None and k != FREE and k not in order:
                order[k] = len(order)
    if len(order) < 2:
        return
    y0 = prob.add_vars(len(order))
    for u in range(prob.H):
        for c, k in enumerate(keys_of_unit(u)):
            if k is not None and k != FREE:
                prob.le([u * C + c, y0 + order[k]], [1.0, -1.0], 0.0)
    prob.le(list(range(y0, y0 + len(order))), [1.0] * len(order), 1.0)


def check_expressible(plan, fmt: str) -> None:
    """The export's own verdict on the searched plan (its rules are the last word)."""
    from ..export import refusal

    why = refusal(plan, fmt)
    if why is not None:
        raise HeadplanError(f"--format-windows {fmt}: the searched plan is not expressible ({why})")
