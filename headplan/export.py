"""Plans a serving engine runs today: export to engine formats, import DuoAttention patterns.

``headplan export PLAN --format F --out DIR [--project]`` writes one of three formats into DIR (staged in a
hidden sibling folder and swapped in whole, so a refused or failed export leaves DIR as it was):

``hf-layer-types`` -> ``DIR/config.json``, a **patch** to merge into the model's own ``config.json``:
    ``layer_types`` (``"full_attention"`` / ``"sliding_attention"`` per layer) and ``sliding_window``, plus
    ``use_sliding_window`` for the families whose config has that switch (Qwen2, Qwen3...: without it their
    config drops the window). Written for the families whose transformers code reads ``config.layer_types``
    per layer (found in transformers' own source at export time: Qwen2, Qwen3, Gemma 2/3, Cohere 2, ...;
    a multimodal config gets the patch under ``text_config``). Families with one ``sliding_window`` for every
    layer and no ``layer_types`` (Mistral, Phi-3: transformers' ``MistralConfig`` only warns about
    ``layer_types``) get ``{"sliding_window": W}`` (or ``null``), so every layer must then be the same;
    families with no sliding window at all (Llama) take only all-full plans (an empty patch). Where a
    family's modeling code ties more than the window to a layer's type (Gemma 3: the layer's RoPE, one
    ``rope_parameters`` per type; Cohere 2: only sliding layers apply RoPE; also read from the source), every
    layer keeps the model's own type and only the window size may change. vLLM loads the same
    ``config.json``; whether its model code honours ``layer_types`` for a family is not checked here
    (transformers is what the tests run).
    Expressible: in each layer every KV head sees the same thing, either every earlier key (``full``) or
    a plain sliding window (a ``streaming`` head with sink 0 and a fixed window, beta 0, or an elastic one
    whose ``W(n)`` does not change within the model's positions), and all sliding layers share one window.
    Semantics match token for token: transformers' sliding window shows key ``j`` to query ``i`` when
    ``i - j < sliding_window``, headplan's window when ``i - j < W(i + 1)``.
    Cannot express: sinks, elastic windows, layers whose KV heads differ, two window sizes, a layer
    changing type where the type picks more than the window, and every other kind (strided, blocksparse,
    vslash, skip, select).

``trtllm`` -> ``DIR/kv_cache_config.json``: TensorRT-LLM's ``KvCacheConfig`` fields ``max_attention_window``
    (one int per layer: a window layer gets ``sink + window``, because TensorRT-LLM counts its sink tokens
    inside the window; a full layer gets the model's max positions) and ``sink_token_length`` (one int for
    every layer). Expressible: every KV head of a layer the same, fixed windows, one sink size across all
    window layers (sink 0 included). TensorRT-LLM's documentation states that with sink tokens its context
    phase runs dense (StreamingLLM's own implementation) and only the kept KV follows the window, so with
    sinks the prefill differs from headplan's; without sinks its sliding window applies to the context too.
    Check that your release (and backend) still takes ``sink_token_length``.
    Cannot express: per-head mixing inside a layer, elastic windows, two sink sizes, and the other kinds.

``duo-tsv`` -> DuoAttention's pattern folder: ``DIR/full_attention_heads.tsv`` (one row per layer, one
    tab-separated column per KV head; 1 = full / retrieval head, i.e. the model's own attention in that
    layer, 0 = streaming head) and ``DIR/config.json`` with ``sink_size`` and ``recent_size`` (0 and 0 when no
    head streams). A DuoAttention streaming head shows key ``j`` to query ``i`` when ``j < sink_size`` or
    ``i - j < recent_size``: headplan's ``streaming`` with ``sink = sink_size``, ``window.alpha = recent_size``.
    Expressible: per-head mixing of full and streaming heads, all streaming heads with one sink and one fixed
    window. Cannot express: two streaming shapes, elastic windows, the other kinds.

In every format a layer's own sliding window (Gemma 3's local layers, Qwen2's upper layers) composes with
the plan as headplan's runtime composes it: ``full`` there is the layer's window, a window at least as wide
is the same, and a sink in such a layer is refused (the layer's window hides it from that distance on).

A plan the format cannot express is refused with one line naming the first layer (and KV head) that does
not fit (:class:`NotExpressible`, exit 2), nothing written. ``--project`` exports instead the nearest plan the
format can express (:func:`project_plan` returns it as a :class:`~headplan.plan.Plan`, to apply and evaluate
with headplan's runtime; the command also writes it as ``DIR/projected-plan.yaml``) and prints its KV share
beside the original's at the plan's budget lengths. The projection, at the reference length ``n`` (the plan's
``budget.max_length``, else its longest budget length):

1. each head on its own: expressible heads stay; an elastic window becomes the fixed window ``W(n)``; a sink
   hidden by the layer's own window is dropped; the other kinds become ``full`` if they keep more than half
   of the ``n`` tokens (``candidates.kv_share``: strided, blocksparse and vslash keep every entry), else a
   window keeping as many tokens (``select``: ``sink`` + ``alpha + K(n)``); ``skip`` heads have no window of
   their own and take the format's window (the layer's choice in the per-layer formats);
2. per layer (``hf-layer-types``, ``trtllm``): the pattern most of its KV heads have, ties to the one keeping
   more KV;
3. across the plan: ``hf-layer-types`` drops sinks and gives every sliding layer the most common window
   (ties to the larger; never wider than a layer's own window; a global layer stays full where the type
   picks more than the window; one pattern for every layer in the one-window families); ``trtllm`` gives
   every window layer the most common sink (0 when the model has sliding layers of its own); ``duo-tsv``
   gives every streaming head the most common (sink, window) and makes full the heads that cannot take it
   (a sink in a layer with its own window).

``headplan export --from-duo FILE_OR_DIR --model MODEL --out PLAN.yaml [--threshold 0.5 | --keep-top F]``
imports a DuoAttention pattern (:func:`import_duo`): the TSV's gate values are clipped to [0, 1] as
DuoAttention's ``load_attn_pattern`` does; a head is full when its value is ``>= threshold`` (DuoAttention's
rule), or, with ``keep_top``, when it is among the top fraction of heads by value (``round(F x heads)``
heads; ties to the earlier layer and head, where DuoAttention breaks them with random noise). The plan is
validated like every plan and written with headplan's YAML writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import HeadplanError
from .files import atomic_write, read_input, staged_dir
from .plan import Budget, HeadEntry, ModelIdentity, Pattern, Plan, load_plan, plan_from_dict

FORMATS = ("hf-layer-types", "trtllm", "duo-tsv")
DUO_TSV = "full_attention_heads.tsv"
PROJECTED = "projected-plan.yaml"


class NotExpressible(HeadplanError):
    """The format cannot express the plan; the message (one line) names the first layer / KV head."""


class Unfit(ValueError):
    """Raised by :func:`effective`: why one head is no sink + fixed window (the message; callers add where)."""


# ---------------------------------------------------------------------------------------------------------
# what a head sees, as a serving engine states it
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attn:
    """A head's visibility in serving-engine terms: the first ``sink`` tokens and the last ``window`` tokens
    (``window`` None: every earlier key; then ``sink`` is 0)."""

    sink: int
    window: int | None

    def kv(self, n: int) -> int:
        """Tokens it keeps after n tokens."""
        return n if self.window is None else min(n, self.sink + self.window)

    def label(self) -> str:
        return "full" if self.window is None else f"sink{self.sink}+win{self.window}"


def _cap(model: ModelIdentity, layer: int) -> int | None:
    """The layer's own sliding window, None for a global layer (or one at least as wide as the positions)."""
    w = model.window(layer)
    return w if 0 < w < model.max_positions else None


def _norm(sink: int, window: int | None, max_pos: int) -> Attn:
    """A window that (with its sink) spans every position is ``full``."""
    if window is None or window >= max_pos or sink + window >= max_pos:
        return Attn(0, None)
    return Attn(sink, window)


def _own(cap: int | None) -> Attn:
    """The model's own attention in a layer: its sliding window, or every earlier key."""
    return Attn(0, cap)


def _bq(beta: float) -> int:
    """beta on the integer grid of kernels/patterns.py."""
    from .kernels.patterns import beta_q

    return int(beta_q({"beta": beta}))


def _w(alpha: int, bq: int, n: int) -> int:
    """The window rule W(n) of kernels/patterns.py (the one definition)."""
    from .kernels.patterns import window

    return int(window(int(alpha), int(bq), int(n)))


def effective(p: Pattern, cap: int | None, max_pos: int) -> Attn:
    """What head pattern ``p`` sees, in a layer whose own window is ``cap`` (None: global), as sink + fixed
    window over a model of ``max_pos`` positions; raises ``Unfit`` (the reason) when it is no such thing."""
    if p.kind == "full":
        return _own(cap)
    if p.kind != "streaming":
        raise Unfit(f"a {p.kind} head has no equivalent there")
    s, a, bq = int(p.sink), int(p.window.alpha), _bq(p.window.beta)
    w1, wn = _w(a, bq, 1), _w(a, bq, max_pos)
    if cap is not None and w1 >= cap:  # the layer's own window bounds it: what `full` sees there
        return _own(cap)
    hi = wn if cap is None else min(wn, cap)
    if hi != w1:
        raise Unfit(f"its window is elastic (W(n) = {a} + {p.window.beta:g}·n grows from {w1} to {hi} "
                     f"within {max_pos} positions)")
    if cap is not None and s > 0:
        raise Unfit(f"the layer's own sliding window ({cap}) hides its sink from position {cap} on")
    return _norm(s, w1, max_pos)


def _label(p: Pattern) -> str:
    if p.kind in ("full", "skip"):
        return p.kind
    if p.kind == "streaming":
        from .candidates import streaming

        return streaming(p.sink, p.window.alpha, p.window.beta).name
    args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.row().items() if k != "kind")
    return f"{p.kind}({args})"


# ---------------------------------------------------------------------------------------------------------
# transformers: which families read layer_types
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HfFamily:
    """How a transformers family states sliding layers. ``kind``: ``layer_types`` (per-layer types and one
    ``sliding_window``), ``global`` (one ``sliding_window`` for every layer) or ``none`` (no sliding window);
    ``switch``: it also needs ``use_sliding_window``; ``nest``: the patch goes under this sub-config;
    ``typed``: what else its modeling code ties to a layer's type (Gemma 3: the layer's RoPE; Cohere 2:
    whether the layer applies RoPE at all), None when the type picks only the window: where it is set, an
    export keeps every layer's own type (the window size may still change)."""

    model_type: str
    kind: str
    switch: bool = False
    nest: str | None = None
    typed: str | None = None  # what else the layer type picks (its RoPE...): then no layer may change type


def _fields(cls) -> set[str]:
    out = set(getattr(cls, "__dataclass_fields__", {}) or {})
    for c in getattr(cls, "__mro__", ()):
        out |= set(getattr(c, "__annotations__", {}) or {})
    return out


def _modeling_source(cfg_cls) -> str:
    import importlib.util

    name = cfg_cls.__module__.replace(".configuration_", ".modeling_")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return ""
    return Path(spec.origin).read_text(encoding="utf-8", errors="replace")


def hf_family(architecture: str) -> HfFamily:
    """Read transformers' own source (installed version) for how ``architecture`` states sliding layers: a
    config field ``layer_types`` that its modeling code reads per layer (``config.layer_types``, with
    ``"sliding_attention"``), else one ``sliding_window`` field its modeling code reads, else none."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
             if architecture in (v if isinstance(v, (list, tuple)) else (v,))]
    if not types:
        raise HeadplanError(f"hf-layer-types: architecture {architecture!r} is not a causal LM transformers knows")
    stem = architecture.split("For")[0].lower()
    types.sort(key=lambda t: (t.replace("_text", "") != stem, t))  # LlamaForCausalLM -> llama, not exaone
    cls = CONFIG_MAPPING[types[0]]
    nest = None
    if "layer_types" not in _fields(cls):
        text_cls = (getattr(cls, "sub_configs", None) or {}).get("text_config")
        if text_cls is not None and "sliding_window" in _fields(text_cls):
            cls, nest = text_cls, "text_config"
    fields, src = _fields(cls), _modeling_source(cls)
    switch = "use_sliding_window" in fields
    typed = None
    if re.search(r"rope_parameters\[\s*layer_type\s*\]", src):
        typed = "the layer's RoPE (rope_parameters per layer type)"
    elif re.search(r"if self\.sliding_window is not None:\s*\n[^\n]*rotary", src):
        typed = "whether the layer applies RoPE (only its sliding layers do)"
    if "layer_types" in fields and "config.layer_types" in src and "sliding_attention" in src:
        return HfFamily(types[0], "layer_types", switch, nest, typed)
    if "sliding_window" in fields and "sliding_window" in src:
        return HfFamily(types[0], "global", switch, nest)
    return HfFamily(types[0], "none", switch, nest)


# ---------------------------------------------------------------------------------------------------------
# the three formats: check + render
# ---------------------------------------------------------------------------------------------------------

def _refuse(fmt: str, li: int, h: int | None, what: str, why: str) -> NotExpressible:
    where = f"layer {li}" + (f" kv_head {h}" if h is not None else "")
    return NotExpressible(f"{fmt} cannot express this plan: {where} ({what}): {why}; "
                          f"--project exports the nearest plan it can")


def _heads(fmt: str, plan: Plan, li: int) -> list[Attn]:
    cap, mp = _cap(plan.model, li), plan.model.max_positions
    out = []
    for e in plan.layers[li]:
        try:
            out.append(effective(e.pattern, cap, mp))
        except Unfit as u:
            raise _refuse(fmt, li, e.kv_head, _label(e.pattern), str(u)) from None
    return out


def _uniform(fmt: str, plan: Plan, li: int, descs: list[Attn], why: str) -> Attn:
    for h, d in enumerate(descs):
        if d != descs[0]:
            raise _refuse(fmt, li, h, _label(plan.layers[li][h].pattern),
                          f"sees {d.label()} where kv_head 0 sees {descs[0].label()} ({why})")
    return descs[0]


def _hf_files(plan: Plan) -> dict[str, str]:
    fmt = "hf-layer-types"
    fam = hf_family(plan.model.architecture)
    types, window, first = [], None, None
    for li in range(plan.model.num_layers):
        descs = _heads(fmt, plan, li)
        for h, d in enumerate(descs):
            if d.window is not None and d.sink:
                raise _refuse(fmt, li, h, _label(plan.layers[li][h].pattern),
                              f"a sink of {d.sink} (transformers' sliding layers keep none)")
        d = _uniform(fmt, plan, li, descs, "config.json sets one attention type per layer")
        if fam.kind == "global" and li and d != first:
            raise _refuse(fmt, li, None, d.label(), f"{fam.model_type} reads one sliding_window for every layer "
                          f"(no layer_types in its transformers config) and layer 0 sees {first.label()}")
        own = "sliding_attention" if plan.model.window(li) else "full_attention"
        kind = "full_attention" if d.window is None else "sliding_attention"
        if fam.kind == "layer_types" and fam.typed and kind != own:
            raise _refuse(fmt, li, None, d.label(), f"{fam.model_type}'s layer type also picks {fam.typed}, so "
                          f"this layer stays {own}")
        if fam.kind == "none" and d.window is not None:
            raise _refuse(fmt, li, None, d.label(), f"{fam.model_type} has no sliding window in transformers")
        if d.window is not None:
            if window is not None and d.window != window[0]:
                raise _refuse(fmt, li, None, d.label(), f"window {d.window} differs from layer {window[1]}'s "
                              f"{window[0]} (config.json has one sliding_window)")
            window = window or (d.window, li)
        first = first or d
        types.append("full_attention" if d.window is None else "sliding_attention")
    w = window[0] if window else None
    if fam.kind == "layer_types":
        patch = {"layer_types": types, "sliding_window": w}
    else:
        patch = {"sliding_window": w} if fam.kind == "global" else {}
    if fam.switch:
        patch["use_sliding_window"] = w is not None
    if fam.nest:
        patch = {fam.nest: patch}
    return {"config.json": json.dumps(patch, indent=2) + "\n"}


def _trtllm_files(plan: Plan) -> dict[str, str]:
    fmt = "trtllm"
    windows, sink = [], None
    for li in range(plan.model.num_layers):
        d = _uniform(fmt, plan, li, _heads(fmt, plan, li), "one max_attention_window per layer")
        if d.window is None:
            windows.append(plan.model.max_positions)
            continue
        if sink is not None and d.sink != sink[0]:
            raise _refuse(fmt, li, None, d.label(), f"sink {d.sink} differs from layer {sink[1]}'s {sink[0]} "
                          "(sink_token_length is one value for every layer)")
        sink = sink or (d.sink, li)
        windows.append(d.sink + d.window)  # TensorRT-LLM counts the sink tokens inside the window
    data = {"max_attention_window": windows, "sink_token_length": sink[0] if sink else 0}
    return {"kv_cache_config.json": json.dumps(data, indent=2) + "\n"}


def _duo_files(plan: Plan) -> dict[str, str]:
    fmt = "duo-tsv"
    rows, shape = [], None
    for li in range(plan.model.num_layers):
        own = _own(_cap(plan.model, li))
        row = []
        for h, d in enumerate(_heads(fmt, plan, li)):
            if d == own:
                row.append("1")
                continue
            if shape is not None and d != shape[0]:
                raise _refuse(fmt, li, h, _label(plan.layers[li][h].pattern),
                              f"sees {d.label()} where the streaming heads before it see {shape[0].label()} "
                              "(config.json has one sink_size and one recent_size)")
            shape = shape or (d, li)
            row.append("0")
        rows.append("\t".join(row))
    cfg = {"sink_size": shape[0].sink if shape else 0, "recent_size": shape[0].window if shape else 0}
    return {DUO_TSV: "\n".join(rows) + "\n", "config.json": json.dumps(cfg, indent=2) + "\n"}


_RENDER = {"hf-layer-types": _hf_files, "trtllm": _trtllm_files, "duo-tsv": _duo_files}


def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise HeadplanError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    return fmt


def render(plan: Plan, fmt: str) -> dict[str, str]:
    """The files (name -> text) format ``fmt`` holds for ``plan``; raises :class:`NotExpressible` (one line
    naming the first layer / KV head that does not fit) when the format cannot express it."""
    return _RENDER[_fmt(fmt)](plan)


def refusal(plan: Plan, fmt: str) -> str | None:
    """None when ``fmt`` expresses ``plan`` exactly, else the one-line reason it does not."""
    try:
        render(plan, fmt)
    except NotExpressible as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------------------
# projection: the nearest plan a format can express
# ---------------------------------------------------------------------------------------------------------

def reference_length(plan: Plan) -> int:
    """The length the projection judges at: ``budget.max_length``, else the longest budget length."""
    return int(plan.budget.max_length or max(plan.budget.lengths))


def _nearest_head(p: Pattern, lwin: int, cap: int | None, max_pos: int, n: int) -> Attn | None:
    """Step 1 of the projection, one head alone (None for a skip head: it takes the format's window)."""
    from .candidates import kv_share

    try:
        return effective(p, cap, max_pos)
    except Unfit:
        pass
    if p.kind == "skip":
        return None
    if p.kind == "streaming":  # elastic -> W(n); a sink the layer's window hides -> dropped
        w = _w(p.window.alpha, _bq(p.window.beta), n)
        if cap is not None:
            return _own(cap) if w >= cap else Attn(0, w)
        return _norm(int(p.sink), w, max_pos)
    if kv_share(p, n, lwin) > 0.5:
        return _own(cap)
    if p.window is None:  # no window of its own (as skip): the format's window
        return None
    # select (the one kind left that keeps at most half): a window keeping as many tokens
    keep = _w(p.keep.alpha, _bq(p.keep.beta), n) if p.keep is not None else 0
    w, s = int(p.window.alpha) + keep, int(p.sink or 0)
    if cap is not None:
        return _own(cap) if w >= cap else Attn(0, w)
    return _norm(s, w, max_pos)


def _mode(items: list, key) -> object:
    """The most common item, ties to the largest ``key``, then to the first seen (deterministic)."""
    c = Counter(items)
    return max(c, key=lambda x: (c[x], key(x)))


def _fit(d: Attn, cap: int | None, max_pos: int) -> Attn:
    """``d`` as the layer's own window lets it be: never wider than the layer, no sink inside it."""
    if cap is None:
        return _norm(d.sink, d.window, max_pos)
    if d.window is None or d.window >= cap:
        return _own(cap)
    return Attn(0, d.window)


def project_plan(plan: Plan, fmt: str) -> Plan:
    """The nearest plan format ``fmt`` can express (the module docstring gives the rule); a plan already
    expressible comes back unchanged. The result is a validated :class:`~headplan.plan.Plan` for the same
    model (apply and evaluate it with headplan's runtime); its budget keeps the lengths, records the shares
    it achieves and no targets; its provenance says it was projected."""
    fmt = _fmt(fmt)
    if refusal(plan, fmt) is None:
        return plan
    m, n = plan.model, reference_length(plan)
    mp = m.max_positions
    caps = [_cap(m, li) for li in range(m.num_layers)]
    heads = [[_nearest_head(e.pattern, m.window(li), caps[li], mp, n) for e in layer]
             for li, layer in enumerate(plan.layers)]
    kv = lambda d: (d.kv(n), d.window is None)  # noqa: E731
    if fmt == "duo-tsv":
        streams = [d for li, row in enumerate(heads) for d in row if d is not None and d != _own(caps[li])]
        shape = _mode(streams, kv) if streams else None
        out = []
        for li, row in enumerate(heads):
            own, new = _own(caps[li]), []
            for d in row:
                if d is None or d != own:  # a streaming (or skip) head takes the one streaming shape, or is full
                    d = own if shape is None else _fit(shape, caps[li], mp)
                    if caps[li] is not None and shape is not None and shape.sink:
                        d = own
                new.append(d)
            out.append(new)
    else:
        every = [d for row in heads for d in row if d is not None]
        fallback = _mode(every, kv) if every else Attn(0, None)
        layer = []
        for li, row in enumerate(heads):
            got = [d for d in row if d is not None]
            layer.append(_fit(_mode(got, kv) if got else fallback, caps[li], mp))
        if fmt == "hf-layer-types":
            fam = hf_family(m.architecture)
            layer = [Attn(0, d.window) for d in layer]  # sinks dropped
            smallest = min((c for c in caps if c is not None), default=None)
            if fam.kind == "global":
                one = _mode(layer, kv)
                layer = [one] * len(layer)
            if fam.kind == "none":
                layer = [Attn(0, None)] * len(layer)
            if fam.kind == "layer_types" and fam.typed:  # a global layer stays global
                layer = [d if m.window(li) else Attn(0, None) for li, d in enumerate(layer)]
            wins = [d.window for d in layer if d.window is not None]
            if wins:
                w = _mode(wins, lambda x: x)
                w = min(w, smallest) if smallest is not None else w
                layer = [d if d.window is None else Attn(0, w) for d in layer]
        else:  # trtllm
            sinks = [d.sink for d in layer if d.window is not None]
            s = 0 if any(c is not None for c in caps) or not sinks else _mode(sinks, lambda x: x)
            layer = [d if d.window is None else _norm(s, d.window, mp) for d in layer]
        layer = [_fit(d, caps[li], mp) for li, d in enumerate(layer)]
        out = [[d] * len(row) for d, row in zip(layer, heads)]
    return _build(plan, fmt, out, n)


def _build(plan: Plan, fmt: str, descs: list[list[Attn]], n: int) -> Plan:
    from .candidates import full, plan_shares, streaming

    m, mp, layers, changed = plan.model, plan.model.max_positions, [], 0
    for li, (row, entries) in enumerate(zip(descs, plan.layers)):
        cap, new = _cap(m, li), []
        for d, e in zip(row, entries):
            try:
                same = effective(e.pattern, cap, mp) == d
            except Unfit:
                same = False
            if same:
                new.append(e)
                continue
            changed += 1
            c = full() if d == _own(cap) else streaming(d.sink, d.window)
            new.append(HeadEntry(e.kv_head, c.pattern, c.name))
        layers.append(tuple(new))
    pats = [[e.pattern for e in layer] for layer in layers]
    shares = [plan_shares(m, pats, k, plan.block_size) for k in plan.budget.lengths]
    budget = Budget(density=None, kv_budget=None, lengths=plan.budget.lengths,
                    achieved_density=tuple(s[0] for s in shares), achieved_kv=tuple(s[1] for s in shares),
                    expected_loss=0.0, max_length=plan.budget.max_length)
    prov = {"source": "projected",
            "projection": {"format": fmt, "reference_length": n, "changed_heads": changed,
                           "from": {k: plan.provenance[k] for k in ("source",) if k in plan.provenance}}}
    out = Plan(model=m, budget=budget, layers=tuple(layers), block_size=plan.block_size, provenance=prov)
    out = plan_from_dict(yaml.safe_load(out.to_yaml()), "projected plan")
    why = refusal(out, fmt)
    if why is not None:  # a bug in the projection, not bad input
        raise AssertionError(f"projection is not expressible: {why}")
    return out


def kv_shares(plan: Plan) -> dict[int, float]:
    """KV share of ``plan`` at each of its budget lengths (``candidates.plan_shares``: against the model's
    own cache, a sliding layer's dense being its window)."""
    from .candidates import plan_shares

    pats = [[e.pattern for e in layer] for layer in plan.layers]
    return {int(k): float(plan_shares(plan.model, pats, k, plan.block_size)[1]) for k in plan.budget.lengths}


def changed_heads(a: Plan, b: Plan) -> int:
    return sum(x.pattern != y.pattern for la, lb in zip(a.layers, b.layers) for x, y in zip(la, lb))


# ---------------------------------------------------------------------------------------------------------
# export: files written whole
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Exported:
    """What :func:`export_plan` wrote. ``plan``: the plan the files express (the projected one with
    ``project``); ``kv``: length -> (original KV share, exported plan's KV share)."""

    format: str
    out: Path
    files: list[Path]
    plan: Plan
    projected: bool
    changed_heads: int
    kv: dict[int, tuple[float, float]]


def export_plan(plan: Plan, fmt: str, out: str | os.PathLike, *, project: bool = False) -> Exported:
    """Write ``plan`` in format ``fmt`` into folder ``out`` (staged beside it and swapped in whole; files
    already there that the format does not write are kept). Without ``project`` a plan the format cannot
    express raises :class:`NotExpressible` before anything is written; with it, the nearest expressible
    plan (:func:`project_plan`) is exported and also written as ``out/projected-plan.yaml``."""
    fmt = _fmt(fmt)
    target = project_plan(plan, fmt) if project else plan
    files = render(target, fmt)  # raises NotExpressible before any folder is made
    if project:
        files[PROJECTED] = target.to_yaml()
    out = Path(out)
    with staged_dir(out) as stage:
        for name, text in files.items():
            atomic_write(stage / name, text)
    before, after = kv_shares(plan), kv_shares(target)
    return Exported(fmt, out, [out / k for k in files], target, project, changed_heads(plan, target),
                    {k: (before[k], after[k]) for k in before})


def do_export(plan_path: str | os.PathLike, fmt: str, out: str | os.PathLike, *, project: bool = False) -> Exported:
    """``headplan export PLAN --format F --out DIR [--project]``: load (and validate) the plan, export it."""
    return export_plan(load_plan(plan_path), fmt, out, project=project)


# ---------------------------------------------------------------------------------------------------------
# import: DuoAttention patterns
# ---------------------------------------------------------------------------------------------------------

def _duo_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / DUO_TSV, p / "config.json"
    return p, p.parent / "config.json"


def read_duo(path: str | os.PathLike) -> tuple[list[list[float]], int, int]:
    """(gate values per layer and KV head, clipped to [0, 1]; sink_size; recent_size) of a DuoAttention
    pattern: a folder holding ``full_attention_heads.tsv`` and ``config.json``, or the TSV file (its
    ``config.json`` beside it). Errors name the file and line."""
    tsv, cfg_path = _duo_paths(path)
    text = read_input(tsv, "DuoAttention pattern file", error=HeadplanError)
    rows = []
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        vals = []
        for col, v in enumerate(line.split("\t")):
            try:
                x = float(v)
            except ValueError:
                x = math.nan
            if not math.isfinite(x):
                raise HeadplanError(f"{tsv}: line {ln} column {col + 1}: not a number: {v[:20]!r}")
            vals.append(min(1.0, max(0.0, x)))
        rows.append(vals)
    if not rows:
        raise HeadplanError(f"{tsv}: no rows")
    raw = read_input(cfg_path, "DuoAttention config.json", error=HeadplanError)
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise HeadplanError(f"{cfg_path}: malformed JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(cfg, dict):
        raise HeadplanError(f"{cfg_path}: expected a JSON object with sink_size and recent_size")
    sizes = []
    for k in ("sink_size", "recent_size"):
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise HeadplanError(f"{cfg_path}: {k} must be an integer >= 0, got {v!r}")
        sizes.append(v)
    return rows, sizes[0], sizes[1]


def import_duo(path: str | os.PathLike, model: ModelIdentity, *, threshold: float = 0.5,
               keep_top: float | None = None, lengths=None) -> Plan:
    """A headplan plan from a DuoAttention pattern (:func:`read_duo`) for ``model``: full heads and
    ``streaming`` heads (``sink = sink_size``, fixed window ``recent_size``). A head is full when its gate
    value is ``>= threshold``; with ``keep_top`` (a fraction in [0, 1]) the ``round(keep_top x heads)`` heads
    with the largest values are full instead (ties to the earlier layer / KV head). ``lengths``: the budget
    lengths to record shares at (default: the model's max positions). Validated like every plan."""
    from .lengths import fit_lengths
    from .candidates import full, plan_shares, streaming

    tsv, _ = _duo_paths(path)
    rows, sink, recent = read_duo(path)
    if len(rows) != model.num_layers:
        raise HeadplanError(f"{tsv}: {len(rows)} rows, the model has {model.num_layers} layers (one row per layer)")
    for li, r in enumerate(rows):
        if len(r) != model.num_kv_heads:
            extra = " (DuoAttention gates KV heads)" if len(r) == model.num_query_heads else ""
            raise HeadplanError(f"{tsv}: row {li + 1} has {len(r)} values, the model has {model.num_kv_heads} "
                                f"KV heads{extra}")
    if keep_top is not None:
        if not 0.0 <= keep_top <= 1.0:
            raise HeadplanError(f"--keep-top must be a fraction in [0, 1], got {keep_top}")
        order = sorted(((li, h) for li, r in enumerate(rows) for h in range(len(r))),
                       key=lambda lh: (-rows[lh[0]][lh[1]], lh))
        top = set(order[:round(keep_top * len(order))])
        is_full = [[(li, h) in top for h in range(len(r))] for li, r in enumerate(rows)]
    else:
        if not math.isfinite(threshold):
            raise HeadplanError(f"--threshold must be a number, got {threshold}")
        is_full = [[v >= threshold for v in r] for r in rows]
    n_stream = sum(not f for r in is_full for f in r)
    if n_stream and recent < 1:
        raise HeadplanError(f"{tsv}: {n_stream} heads stream but recent_size is {recent} (at least 1)")
    layers = []
    for r in is_full:
        cs = [full() if f else streaming(sink, recent) for f in r]
        layers.append(tuple(HeadEntry(h, c.pattern, c.name) for h, c in enumerate(cs)))
    lens = tuple(fit_lengths(lengths, model.max_positions) if lengths is not None else (model.max_positions,))
    pats = [[e.pattern for e in layer] for layer in layers]
    shares = [plan_shares(model, pats, k) for k in lens]
    digest = hashlib.sha256(Path(tsv).read_bytes()).hexdigest()
    prov = {"source": "duo-attention",
            "duo": {"path": str(tsv), "sha256": digest, "sink_size": sink, "recent_size": recent,
                    **({"keep_top": keep_top} if keep_top is not None else {"threshold": threshold})}}
    plan = Plan(model=model, budget=Budget(None, None, lens, tuple(s[0] for s in shares), tuple(s[1] for s in shares),
                                           0.0), layers=tuple(layers), provenance=prov)
    return plan_from_dict(yaml.safe_load(plan.to_yaml()), "imported DuoAttention plan")


def identity_for(spec: str) -> ModelIdentity:
    """The identity of MODEL (every form the CLI takes); a Hugging Face directory is read from its config
    alone (the identity hashes only the config), anything else is loaded."""
    from .models import identity_of, load_model

    p = Path(spec)
    if not spec.startswith("random:") and p.is_dir() and (p / "config.json").is_file():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(str(p))
        except Exception as e:  # noqa: BLE001
            raise HeadplanError(f"cannot read the model config in {p}: {str(e).splitlines()[0]}") from None
        return identity_of(cfg)
    return load_model(spec).identity


def do_import_duo(path: str | os.PathLike, model: str | ModelIdentity, out: str | os.PathLike, *,
                  threshold: float = 0.5, keep_top: float | None = None, lengths=None) -> Plan:
    """``headplan export --from-duo FILE_OR_DIR --model MODEL --out PLAN.yaml``: import, write the plan."""
    ident = model if isinstance(model, ModelIdentity) else identity_for(model)
    plan = import_duo(path, ident, threshold=threshold, keep_top=keep_top, lengths=lengths)
    atomic_write(out, plan.to_yaml())
    return plan


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------

def export_command(plan: str | os.PathLike | None, fmt: str | None, out: str | os.PathLike, *,
                   project: bool = False, from_duo: str | os.PathLike | None = None, model: str | None = None,
                   threshold: float = 0.5, keep_top: float | None = None, lengths: str | None = None) -> list[str]:
    """What ``headplan export`` does, option checks included; returns the lines it prints. Export:
    ``PLAN --format F --out DIR [--project]``; import: ``--from-duo FILE_OR_DIR --model MODEL --out PLAN.yaml
    [--threshold T | --keep-top F] [--lengths L]``."""
    if from_duo is not None:
        if plan is not None or fmt is not None or project:
            raise HeadplanError("--from-duo imports a DuoAttention pattern: give it no PLAN, --format or --project")
        if model is None:
            raise HeadplanError("--from-duo needs --model MODEL (the model the pattern is for)")
        p = do_import_duo(from_duo, model, out, threshold=threshold, keep_top=keep_top, lengths=lengths)
        c = p.counts()
        s = next((e.pattern for layer in p.layers for e in layer if e.pattern.kind == "streaming"), None)
        shape = f" (sink {s.sink}, recent {s.window.alpha})" if s is not None else ""
        lines = [f"DuoAttention pattern: {c.get('full', 0)} full + {c.get('streaming', 0)} streaming heads{shape} "
                 f"-> {out}"]
        return lines + [f"KV share @ {k}: {v:.4f}" for k, v in kv_shares(p).items()]
    if plan is None or fmt is None:
        raise HeadplanError("export needs PLAN and --format (hf-layer-types, trtllm, duo-tsv), or --from-duo")
    if model is not None or keep_top is not None or lengths is not None:
        raise HeadplanError("--model, --keep-top and --lengths belong to --from-duo")
    r = do_export(plan, fmt, out, project=project)
    lines = [f"{r.format} -> " + ", ".join(str(f) for f in r.files)]
    if r.projected:
        lines.append(f"projected onto {r.format}: {r.changed_heads} of "
                     f"{sum(len(x) for x in r.plan.layers)} KV heads changed")
        lines += [f"KV share @ {k}: original {a:.4f}, projected {b:.4f}" for k, (a, b) in r.kv.items()]
    return lines


__all__ = ["FORMATS", "Attn", "Exported", "HfFamily", "NotExpressible", "Unfit", "changed_heads", "do_export",
           "do_import_duo", "effective", "export_command", "export_plan", "hf_family", "identity_for",
           "import_duo", "kv_shares", "project_plan", "read_duo", "reference_length", "refusal", "render"]

