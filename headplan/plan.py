"""The plan: which pattern and KV budget each KV head of each layer gets.

Frozen dataclasses, YAML load/save, validation that names the offending field. This module imports
no torch, so a plan can be read and checked anywhere (CI, notebooks, other tools).

Window semantics: a streaming head's query at position i (0-based) sees the first ``sink`` tokens
and the last ``W(i + 1)`` tokens, ``W(n) = alpha + floor(beta * n)``; beta is stored on a 1/4096
grid so every implementation computes the same integer window.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PlanError
from .kernels.kinds import BETA_SCALE, DYNAMIC_KINDS, KIND_NAMES, SHARES, window
from .files import _umask, atomic_write, read_input  # noqa: F401  (re-exported: plan.atomic_write...)

SCHEMA_VERSION = 1
INT32_MAX = 2**31 - 1  # the runtime head table is int32: every pattern integer must fit
MAX_BLOCK = 4096
KINDS, DYNAMIC_KINDS = KIND_NAMES, DYNAMIC_KINDS  # one list, kernels.kinds
BETA_GRID = BETA_SCALE  # beta's grid (kernels.kinds)
GRANULARITIES = ("kv_head", "layer")  # layer: every KV head of a layer has the same pattern


@dataclass(frozen=True)
class Window:
    alpha: int
    beta: float = 0.0

    def size(self, n: int) -> int:
        return window(self.alpha, int(round(self.beta * BETA_GRID)), n)


@dataclass(frozen=True)
class Pattern:
    """One head's pattern. Only the fields of its kind are set (others None)."""

    kind: str
    sink: int | None = None
    window: Window | None = None
    stride: int | None = None
    offset: int | None = None
    topk: int | None = None
    vertical: int | None = None
    slash: int | None = None
    keep: Window | None = None  # select: tokens kept by score, K(n) = alpha + floor(beta·n)
    share: str | None = None  # select: "layer" (AdaKV) or "heads" (DuoAttention on the fly); None: its own K(n)

    def row(self) -> dict:  # noqa: D401
        """Parameters as a flat dict (the form kernels.patterns.make_table takes)."""
        r: dict[str, Any] = {"kind": self.kind}
        if self.sink is not None:
            r["sink"] = self.sink
        if self.window is not None:
            r["alpha"] = self.window.alpha
            r["beta"] = self.window.beta
        for k in ("stride", "offset", "topk", "vertical", "slash"):
            v = getattr(self, k)
            if v is not None:
                r[k] = v
        if self.keep is not None:
            r["keep_alpha"] = self.keep.alpha
            r["keep_beta"] = self.keep.beta
        if self.share is not None:
            r["share"] = self.share
        return r

    def kv_rule(self) -> str | Window:
        """KV the head keeps: 'all', 'none', or a Window (tokens = alpha + beta·N, sink included)."""
        if self.kind == "skip":
            return "none"
        if self.kind == "streaming":
            assert self.window is not None and self.sink is not None
            return Window(self.sink + self.window.alpha, self.window.beta)
        if self.kind == "select":
            assert self.window is not None and self.sink is not None and self.keep is not None
            return Window(self.sink + self.window.alpha + self.keep.alpha, self.keep.beta)
        return "all"

    def to_yaml(self) -> dict:
        d: dict[str, Any] = {"pattern": self.kind}
        if self.sink is not None:
            d["sink"] = self.sink
        if self.window is not None:
            d["window"] = {"alpha": self.window.alpha, "beta": self.window.beta}
        for k in ("stride", "offset", "topk", "vertical", "slash"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.keep is not None:
            d["keep"] = {"alpha": self.keep.alpha, "beta": self.keep.beta}
        if self.share is not None:
            d["share"] = self.share
        kv = self.kv_rule()
        d["kv"] = kv if isinstance(kv, str) else {"alpha": kv.alpha, "beta": kv.beta}
        return d

    @staticmethod
    def from_row(r: dict) -> "Pattern":
        r = {k: v for k, v in r.items() if k != "name"}
        kind = r["kind"]
        w = Window(int(r["alpha"]), float(r.get("beta", 0.0))) if "alpha" in r else None
        keep = Window(int(r["keep_alpha"]), float(r.get("keep_beta", 0.0))) if "keep_alpha" in r else None
        return Pattern(kind=kind, sink=r.get("sink"), window=w, stride=r.get("stride"), offset=r.get("offset"),
                       topk=r.get("topk"), vertical=r.get("vertical"), slash=r.get("slash"), keep=keep,
                       share=r.get("share"))


# which fields each kind requires
_REQUIRED = {
    "full": (),
    "streaming": ("sink", "window"),
    "strided": ("sink", "window", "stride", "offset"),
    "blocksparse": ("topk",),
    "vslash": ("vertical", "slash"),
    "skip": (),
    "select": ("sink", "window", "keep"),
}
_OPTIONAL = {"select": {"share"}}  # fields a kind may omit


@dataclass(frozen=True)
class HeadEntry:
    kv_head: int
    pattern: Pattern
    candidate: str = ""


@dataclass(frozen=True)
class ModelIdentity:
    """What a plan is for. ``layer_windows``: each layer's own sliding window (0 = a global layer);
    empty when no layer has one. A plan composes with it: no head of a sliding layer sees further
    back than the layer's window, and budgets are counted against the model's own attention."""

    architecture: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    fingerprint: str
    layer_windows: tuple[int, ...] = ()

    def window(self, layer: int) -> int:
        """The layer's own sliding window, 0 for a global layer."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("architecture", "num_layers", "num_query_heads", "num_kv_heads",
                                           "head_dim", "max_positions", "fingerprint")}
        if self.layer_windows:  # models without sliding layers keep the original layout, byte for byte
            d["layer_windows"] = list(self.layer_windows)
        return d

    @staticmethod
    def from_dict(m: Any, where: str = "model") -> "ModelIdentity":
        """Parse and validate (PlanError naming the field)."""
        return model_identity(m, where)


@dataclass(frozen=True)
class Budget:
    density: float | None
    kv_budget: float | None
    lengths: tuple[int, ...]
    achieved_density: tuple[float, ...]
    achieved_kv: tuple[float, ...]
    expected_loss: float
    max_length: int | None = None  # the budgets bind at every length up to this (search.settings.bound_lengths)


@dataclass(frozen=True)
class Plan:
    model: ModelIdentity
    budget: Budget
    layers: tuple[tuple[HeadEntry, ...], ...]
    block_size: int = 64
    granularity: str = "kv_head"
    provenance: dict = field(default_factory=dict, compare=False, hash=False)
    schema_version: int = SCHEMA_VERSION

    def pattern(self, layer: int, kv_head: int) -> Pattern:
        return self.layers[layer][kv_head].pattern

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for layer in self.layers:
            for e in layer:
                c[e.pattern.kind] = c.get(e.pattern.kind, 0) + 1
        return dict(sorted(c.items()))

    # -- YAML -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "granularity": self.granularity,
            "block_size": self.block_size,
            "budget": {
                "density": self.budget.density,
                "kv_budget": self.budget.kv_budget,
                "lengths": list(self.budget.lengths),
                "achieved_density": [round(x, 6) for x in self.budget.achieved_density],
                "achieved_kv": [round(x, 6) for x in self.budget.achieved_kv],
                "expected_loss": round(self.budget.expected_loss, 8),
                **({"max_length": self.budget.max_length} if self.budget.max_length is not None else {}),
            },
            "provenance": self.provenance,
            "layers": [
                {"layer": li, "heads": [dict(kv_head=e.kv_head, candidate=e.candidate, **e.pattern.to_yaml())
                                        for e in heads]}
                for li, heads in enumerate(self.layers)
            ],
        }

    def to_yaml(self) -> str:
        return yaml.dump(_flowify(self.to_dict()), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         width=120)


class _FlowMap(dict):
    pass


class _FlowList(list):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _flowify(x):
    """Block style for structure; flow style for small leaf maps ({alpha, beta}) and scalar lists."""
    scalar = (int, float, str, bool, type(None))
    if isinstance(x, dict):
        if x and len(x) <= 3 and all(isinstance(v, scalar) for v in x.values()) and \
                set(x) <= {"alpha", "beta", "sha256", "source", "path", "task", "share"}:
            return _FlowMap(x)
        return {k: _flowify(v) for k, v in x.items()}
    if isinstance(x, list):
        if all(isinstance(v, scalar) for v in x):
            return _FlowList(x)
        return [_flowify(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------
# loading and validation
# ------------------------------------------------------------------------------------------------

def _need(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected a mapping, got {type(d).__name__}")
    if key not in d:
        raise PlanError(f"{where}.{key}: missing field")
    return d[key]


def _int(v: Any, where: str, lo: int | None = None, hi: int | None = INT32_MAX) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{where}: expected an integer, got {_short(v)}")
    if lo is not None and v < lo:
        raise PlanError(f"{where}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise PlanError(f"{where}: must be <= {hi}, got {_short(v)}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise PlanError(f"{where}: expected a string, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    """A value for an error message: never more than a few dozen characters."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _keys(d: Any, allowed, where: str) -> None:
    """Reject keys of mapping ``d`` outside ``allowed`` (naming the first one)."""
    if isinstance(d, dict):
        for k in d:
            if k not in allowed:
                raise PlanError(f"{where}.{k}: unknown field (known: {', '.join(allowed)})")


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise PlanError(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _float(v: Any, where: str, lo: float | None = None, hi: float | None = None, none_ok: bool = False):
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise PlanError(f"{where}: expected a number, got {_short(v)}")
    v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise PlanError(f"{where}: must be in [{lo}, {hi}], got {v}")
    return v


def _window(w: Any, where: str, lo: int) -> Window:
    """``{alpha, beta}`` (a window or a keep rule): alpha >= lo, beta in [0, 1] on the 1/BETA_GRID grid."""
    _keys(w, ("alpha", "beta"), where)
    alpha = _int(_need(w, "alpha", where), f"{where}.alpha", lo)
    beta = _float(w.get("beta", 0.0), f"{where}.beta", 0.0, 1.0)
    if abs(beta * BETA_GRID - round(beta * BETA_GRID)) > 1e-6:
        raise PlanError(f"{where}.beta: must be a multiple of 1/{BETA_GRID}, got {beta}")
    return Window(alpha, beta)


def _pattern(d: dict, where: str) -> Pattern:
    kind = _need(d, "pattern", where)
    if kind not in KINDS:
        raise PlanError(f"{where}.pattern: unknown pattern {kind!r} (known: {', '.join(KINDS)})")
    allowed = set(_REQUIRED[kind]) | {"pattern", "kv", "kv_head", "candidate"} | _OPTIONAL.get(kind, set())
    for k in d:
        if k not in allowed:
            raise PlanError(f"{where}.{k}: not a parameter of pattern {kind!r}")
    for k in _REQUIRED[kind]:
        _need(d, k, where)
    window = _window(d["window"], f"{where}.window", 1) if "window" in d else None
    keep = _window(d["keep"], f"{where}.keep", 0) if "keep" in d else None
    if kind == "select" and window.beta:
        raise PlanError(f"{where}.window.beta: a select head's recent window is fixed (beta 0); its keep grows")
    if keep is not None and keep.alpha == 0 and keep.beta == 0:
        raise PlanError(f"{where}.keep: keeps no token (alpha and beta both 0); use streaming")
    share = d.get("share")
    if share is not None and share not in SHARES[1:]:
        raise PlanError(f"{where}.share: must be one of {', '.join(SHARES[1:])} (omit it for the head's own "
                        f"budget), got {share!r}")
    p = Pattern(
        kind=kind,
        sink=_int(d["sink"], f"{where}.sink", 0) if "sink" in d else None,
        window=window,
        stride=_int(d["stride"], f"{where}.stride", 1) if "stride" in d else None,
        offset=_int(d["offset"], f"{where}.offset", 0) if "offset" in d else None,
        topk=_int(d["topk"], f"{where}.topk", 0) if "topk" in d else None,
        vertical=_int(d["vertical"], f"{where}.vertical", 1) if "vertical" in d else None,
        slash=_int(d["slash"], f"{where}.slash", 1) if "slash" in d else None,
        keep=keep,
        share=share,
    )
    if p.stride is not None and p.offset is not None and p.offset >= p.stride:
        raise PlanError(f"{where}.offset: must be < stride ({p.stride}), got {p.offset}")
    if "kv" in d:
        want = p.to_yaml()["kv"]
        if d["kv"] != want:
            raise PlanError(f"{where}.kv: {d['kv']!r} does not match the pattern (expected {want!r})")
    return p


def model_identity(m: Any, w: str) -> ModelIdentity:
    """``model:`` of a plan (or a profile's header), validated; errors name ``w``."""
    if not isinstance(m, dict):
        raise PlanError(f"{w}: expected a mapping")
    _keys(m, tuple(f.name for f in dataclasses.fields(ModelIdentity)), w)
    lw = m.get("layer_windows", []) or []
    if not isinstance(lw, list):
        raise PlanError(f"{w}.layer_windows: expected a list of integers (0 = a global layer)")
    model = ModelIdentity(
        architecture=_str(_need(m, "architecture", w), f"{w}.architecture"),
        num_layers=_int(_need(m, "num_layers", w), f"{w}.num_layers", 1),
        num_query_heads=_int(_need(m, "num_query_heads", w), f"{w}.num_query_heads", 1),
        num_kv_heads=_int(_need(m, "num_kv_heads", w), f"{w}.num_kv_heads", 1),
        head_dim=_int(_need(m, "head_dim", w), f"{w}.head_dim", 1),
        max_positions=_int(_need(m, "max_positions", w), f"{w}.max_positions", 1),
        fingerprint=_str(_need(m, "fingerprint", w), f"{w}.fingerprint"),
        layer_windows=tuple(_int(x, f"{w}.layer_windows[{i}]", 0, INT32_MAX) for i, x in enumerate(lw)),
    )
    if model.layer_windows and len(model.layer_windows) != model.num_layers:
        raise PlanError(f"{w}.layer_windows: has {len(model.layer_windows)} entries, num_layers is {model.num_layers}")
    if model.num_query_heads % model.num_kv_heads:
        raise PlanError(f"{w}.num_query_heads: {model.num_query_heads} is not a multiple of num_kv_heads "
                        f"{model.num_kv_heads}")
    return model


def pattern_of_row(r: Any, where: str) -> Pattern:
    """A candidate's flat row (``Pattern.row()`` form, as profiles store them), validated like a plan's head."""
    if not isinstance(r, dict) or "kind" not in r:
        raise PlanError(f"{where}: expected a mapping with a kind")
    d = {("pattern" if k == "kind" else k): v for k, v in r.items()
         if k not in ("alpha", "beta", "name", "keep_alpha", "keep_beta")}
    if "alpha" in r or "beta" in r:
        d["window"] = {k: r[k] for k in ("alpha", "beta") if k in r}
    if "keep_alpha" in r or "keep_beta" in r:
        d["keep"] = {k[5:]: r[k] for k in ("keep_alpha", "keep_beta") if k in r}
    return _pattern(d, where)


def plan_from_dict(d: Any, source: str = "plan") -> Plan:
    if not isinstance(d, dict):
        raise PlanError(f"{source}: expected a YAML mapping at top level")
    _keys(d, _TOP_KEYS, source)
    sv = _int(_need(d, "schema_version", source), f"{source}.schema_version")
    if sv != SCHEMA_VERSION:
        raise PlanError(f"{source}.schema_version: unsupported version {sv} (this headplan reads {SCHEMA_VERSION})")
    model = model_identity(_need(d, "model", source), f"{source}.model")
    gran = _need(d, "granularity", source)
    if gran not in GRANULARITIES:
        raise PlanError(f"{source}.granularity: must be one of {', '.join(GRANULARITIES)}, got {_short(gran)}")
    block = _int(d.get("block_size", 64), f"{source}.block_size", 16, MAX_BLOCK)
    if block & (block - 1):
        raise PlanError(f"{source}.block_size: must be a power of two, got {block}")
    b = _need(d, "budget", source)
    wb = f"{source}.budget"
    _keys(b, tuple(f.name for f in dataclasses.fields(Budget)), wb)
    lengths = _need(b, "lengths", wb)
    if not isinstance(lengths, list) or not lengths:
        raise PlanError(f"{wb}.lengths: expected a non-empty list of integers")
    budget = Budget(
        density=_float(b.get("density"), f"{wb}.density", 0.0, 1.0, none_ok=True),
        kv_budget=_float(b.get("kv_budget"), f"{wb}.kv_budget", 0.0, 1.0, none_ok=True),
        lengths=tuple(_int(x, f"{wb}.lengths[{i}]", 1) for i, x in enumerate(lengths)),
        achieved_density=tuple(_float(x, f"{wb}.achieved_density[{i}]", 0.0, 1.0)
                               for i, x in enumerate(_list(b.get("achieved_density", []), f"{wb}.achieved_density"))),
        achieved_kv=tuple(_float(x, f"{wb}.achieved_kv[{i}]", 0.0, 1.0)
                          for i, x in enumerate(_list(b.get("achieved_kv", []), f"{wb}.achieved_kv"))),
        expected_loss=_float(b.get("expected_loss", 0.0), f"{wb}.expected_loss"),
        max_length=_int(b["max_length"], f"{wb}.max_length", 1) if b.get("max_length") is not None else None,
    )
    prov = d.get("provenance", {}) or {}
    if not isinstance(prov, dict):
        raise PlanError(f"{source}.provenance: expected a mapping")
    _provenance(prov, f"{source}.provenance")
    layers_raw = _need(d, "layers", source)
    if not isinstance(layers_raw, list):
        raise PlanError(f"{source}.layers: expected a list")
    if len(layers_raw) != model.num_layers:
        raise PlanError(f"{source}.layers: has {len(layers_raw)} layers, model.num_layers says {model.num_layers}")
    layers = []
    for li, layer in enumerate(layers_raw):
        wl = f"{source}.layers[{li}]"
        _keys(layer, ("layer", "heads"), wl)
        if _int(_need(layer, "layer", wl), f"{wl}.layer") != li:
            raise PlanError(f"{wl}.layer: expected {li}, got {layer['layer']}")
        heads = _need(layer, "heads", wl)
        if not isinstance(heads, list) or len(heads) != model.num_kv_heads:
            raise PlanError(f"{wl}.heads: expected a list of {model.num_kv_heads} KV heads")
        entries = []
        for hi, h in enumerate(heads):
            wh = f"{wl}.heads[{hi}]"
            if _int(_need(h, "kv_head", wh), f"{wh}.kv_head") != hi:
                raise PlanError(f"{wh}.kv_head: expected {hi}, got {h['kv_head']}")
            entries.append(HeadEntry(hi, _pattern(h, wh), str(h.get("candidate", ""))))
        layers.append(tuple(entries))
        if gran == "layer":
            _same_in_layer(entries, li, wl)
    return Plan(model=model, budget=budget, layers=tuple(layers), block_size=block, granularity=gran,
                provenance=prov, schema_version=sv)


def _same_in_layer(entries: list[HeadEntry], li: int, where: str) -> None:
    """``granularity: layer``: every KV head of layer ``li`` has the pattern of its KV head 0."""
    first = entries[0]
    for e in entries[1:]:
        if e.pattern != first.pattern:
            raise PlanError(f"{where}: layer {li} has different patterns in one layer (kv_head {e.kv_head}: "
                            f"{e.candidate or e.pattern.kind}, kv_head 0: {first.candidate or first.pattern.kind}) "
                            f"but granularity is 'layer' (use 'kv_head')")


_TOP_KEYS = ("schema_version", "model", "granularity", "block_size", "budget", "provenance", "layers")


def _provenance(prov: dict, where: str) -> None:
    """The provenance fields headplan itself reads back (profile reference, search settings) have the
    types it writes; the rest is a free-form record."""
    ref = prov.get("profile")
    if ref is not None:
        if not isinstance(ref, dict):
            raise PlanError(f"{where}.profile: expected a mapping, got {type(ref).__name__}")
        for k in ("path", "sha256"):
            if k in ref and not isinstance(ref[k], str):
                raise PlanError(f"{where}.profile.{k}: expected a string, got {_short(ref[k])}")
    s = prov.get("search")
    if s is None:
        return
    if not isinstance(s, dict):
        raise PlanError(f"{where}.search: expected a mapping, got {type(s).__name__}")
    ws = f"{where}.search"
    for k in ("density", "kv_budget"):
        _float(s.get(k), f"{ws}.{k}", 0.0, 1.0, none_ok=True)
    for k in ("lengths", "validate_lengths"):
        if s.get(k) is not None:
            for i, x in enumerate(_list(s[k], f"{ws}.{k}")):
                _int(x, f"{ws}.{k}[{i}]", 1)
    for k in ("max_patterns_per_layer", "full_heads"):
        if s.get(k) is not None:
            _int(s[k], f"{ws}.{k}", 0)
    if s.get("granularity") is not None and s["granularity"] not in GRANULARITIES:
        raise PlanError(f"{ws}.granularity: must be one of {', '.join(GRANULARITIES)}, got {_short(s['granularity'])}")
    if s.get("exclude_kinds") is not None:
        for i, x in enumerate(_list(s["exclude_kinds"], f"{ws}.exclude_kinds")):
            if x not in KINDS:
                raise PlanError(f"{ws}.exclude_kinds[{i}]: unknown pattern kind {_short(x)}")
    for k in ("signals", "keep"):
        if s.get(k) is not None:
            if not isinstance(s[k], dict):
                raise PlanError(f"{ws}.{k}: expected a mapping, got {type(s[k]).__name__}")
            for name, v in s[k].items():
                _float(v, f"{ws}.{k}.{name}", 0.0)
    for k, fields in (("latency_budget", {"ms": _float, "length": _int}),
                      ("memory_budget", {"gb": _float, "batch": _int, "length": _int})):
        v = s.get(k)
        if v is None:
            continue
        for f, check in fields.items():
            check(_need(v, f, f"{ws}.{k}"), f"{ws}.{k}.{f}", 0)
    ct = s.get("cost_table")
    if ct is not None:
        if not isinstance(ct, dict):
            raise PlanError(f"{ws}.cost_table: expected a mapping, got {type(ct).__name__}")
        if "path" in ct and not isinstance(ct["path"], str):
            raise PlanError(f"{ws}.cost_table.path: expected a string, got {_short(ct['path'])}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases (a few KB of aliases can expand to gigabytes when the data is
    written back) and without duplicate mapping keys (the later one would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise PlanError(f"{self._source}: YAML aliases are not allowed (line {ev.start_mark.line + 1})")
        ev = self.peek_event()
        if getattr(ev, "anchor", None) is not None:
            raise PlanError(f"{self._source}: YAML anchors are not allowed (line {ev.start_mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=True)
            try:
                dup = key in seen
            except TypeError:
                dup = False
            if dup:
                raise PlanError(f"{self._source}: duplicate key {_short(key)} (line {k.start_mark.line + 1})")
            try:
                seen.add(key)
            except TypeError:
                pass
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str, error=PlanError) -> Any:
    """Parse YAML written by or for headplan (plans, data specs, cost tables): safe types only, no
    anchors or aliases, no duplicate keys. Errors are one line naming ``source`` and the line, never
    the file's contents."""
    loader = _StrictLoader(text)
    loader._source = source
    try:
        return loader.get_single_data()
    except PlanError as e:
        raise error(str(e)) from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise error(f"{source}: malformed YAML{where}: {getattr(e, 'problem', None) or 'cannot parse'}") from None
    finally:
        loader.dispose()


def load_plan(path: str | os.PathLike) -> Plan:
    p = Path(path)
    text = read_input(p, "plan file")
    return plan_from_dict(load_yaml(text, str(p)), source=p.name)


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    atomic_write(path, plan.to_yaml())


def plan_from_rows(model: ModelIdentity, rows: list[list[dict]], block_size: int = 64,
                   provenance: dict | None = None) -> Plan:
    """A hand-written plan: ``rows[layer][kv_head]`` is a dict such as
    ``{"kind": "streaming", "sink": 64, "alpha": 256, "beta": 0.0}``. Validated like a loaded plan."""
    layers = tuple(tuple(HeadEntry(h, Pattern.from_row(r), r.get("name", r["kind"])) for h, r in enumerate(layer))
                   for layer in rows)
    plan = Plan(model=model, budget=Budget(None, None, (model.max_positions,), (), (), 0.0), layers=layers,
                block_size=block_size, provenance=provenance or {"source": "hand-written"})
    return plan_from_dict(yaml.safe_load(plan.to_yaml()), "plan")


def pattern_kinds(value, flag: str = "--exclude-kinds") -> tuple[str, ...]:
    """'streaming,skip' (or a list) -> the pattern kinds, each checked against plan.KINDS."""
    kinds = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else (value or ())) if x.strip())
    for k in kinds:
        if k not in KINDS:
            raise PlanError(f"{flag}: unknown pattern kind {k!r} (known: {', '.join(KINDS)})")
    return kinds
