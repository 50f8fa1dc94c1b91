"""Search settings: the budgets and knobs of one search, their dict round trip (a plan's provenance),
and the parsers of the two compound budget flags."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HeadplanError


@dataclass(frozen=True)
class SearchSettings:
    density: float | None = None
    kv_budget: float | None = None
    lengths: tuple[int, ...] | None = None  # default: all profiled lengths
    latency_budget: tuple[float, int] | None = None  # (ms, length)
    memory_budget: tuple[float, int, int] | None = None  # (GB, batch, length)
    max_patterns_per_layer: int | None = None
    exclude_kinds: tuple[str, ...] = ()
    validate_lengths: tuple[int, ...] = ()
    signals: tuple[tuple[str, float], ...] = ()  # re-weight the profile's stored signals; () = as profiled
    keep: tuple[tuple[str, float], ...] = ()  # (signal, slack): that signal's loss <= slack x its own optimum
    full_heads: int | None = None  # exactly this many KV heads full (DuoAttention-style retrieval heads)
    full_set: tuple[int, ...] | None = None  # exactly these KV heads (layer * KV heads + head) full, no others
    max_length: int | None = None  # density and KV budget also bind at every length up to this (bound_lengths)
    granularity: str = "kv_head"  # "layer": one pattern for every KV head of a layer (solved over layers)
    format_windows: str | None = None  # only candidates this export format (headplan.export) can express

    def to_dict(self) -> dict:
        d = {"density": self.density, "kv_budget": self.kv_budget,
             "lengths": list(self.lengths) if self.lengths else None}
        if self.latency_budget is not None:
            d["latency_budget"] = {"ms": self.latency_budget[0], "length": self.latency_budget[1]}
        if self.memory_budget is not None:
            d["memory_budget"] = {"gb": self.memory_budget[0], "batch": self.memory_budget[1],
                                  "length": self.memory_budget[2]}
        if self.max_patterns_per_layer is not None:
            d["max_patterns_per_layer"] = self.max_patterns_per_layer
        if self.exclude_kinds:
            d["exclude_kinds"] = list(self.exclude_kinds)
        if self.validate_lengths:
            d["validate_lengths"] = list(self.validate_lengths)
        if self.signals:
            d["signals"] = {k: w for k, w in self.signals}
        if self.keep:
            d["keep"] = {k: w for k, w in self.keep}
        if self.full_heads is not None:
            d["full_heads"] = self.full_heads
        if self.full_set is not None:
            d["full_set"] = list(self.full_set)
        if self.max_length is not None:
            d["max_length"] = self.max_length
        if self.granularity != "kv_head":  # per-head searches keep their recorded settings byte for byte
            d["granularity"] = self.granularity
        if self.format_windows is not None:
            d["format_windows"] = self.format_windows
        return d

    @staticmethod
    def from_dict(s: dict) -> "SearchSettings":
        lat = s.get("latency_budget")
        mem = s.get("memory_budget")
        return SearchSettings(
            density=s.get("density"), kv_budget=s.get("kv_budget"),
            lengths=tuple(s["lengths"]) if s.get("lengths") else None,
            latency_budget=(float(lat["ms"]), int(lat["length"])) if lat else None,
            memory_budget=(float(mem["gb"]), int(mem["batch"]), int(mem["length"])) if mem else None,
            max_patterns_per_layer=s.get("max_patterns_per_layer"),
            exclude_kinds=tuple(s.get("exclude_kinds") or ()),
            validate_lengths=tuple(s.get("validate_lengths") or ()),
            signals=tuple((str(k), float(w)) for k, w in (s.get("signals") or {}).items()),
            keep=tuple((str(k), float(w)) for k, w in (s.get("keep") or {}).items()),
            full_heads=int(s["full_heads"]) if s.get("full_heads") is not None else None,
            full_set=tuple(int(h) for h in s["full_set"]) if s.get("full_set") is not None else None,
            max_length=int(s["max_length"]) if s.get("max_length") is not None else None,
            granularity=str(s.get("granularity") or "kv_head"),
            format_windows=str(s["format_windows"]) if s.get("format_windows") is not None else None)


def check_granularity(granularity: str | None, format_windows: str | None = None) -> tuple[str, str | None]:
    """``--granularity`` (kv_head | layer; None = kv_head) and ``--format-windows`` (an export format or None),
    checked before any work: the per-layer formats (hf-layer-types, trtllm) state one pattern per layer, so they
    need ``--granularity layer``. Returns the pair as SearchSettings takes it."""
    from ..export import FORMATS
    from ..plan import GRANULARITIES

    g = "kv_head" if granularity is None else str(granularity).strip()
    if g not in GRANULARITIES:
        raise HeadplanError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    f = None if format_windows is None or str(format_windows).strip().lower() in ("", "none") else \
        str(format_windows).strip()
    if f is not None and f not in FORMATS:
        raise HeadplanError(f"--format-windows must be one of {', '.join(FORMATS)}, got {format_windows!r}")
    if f in PER_LAYER_FORMATS and g != "layer":
        raise HeadplanError(f"--format-windows {f} states one pattern per layer: use it with --granularity layer")
    return g, f


PER_LAYER_FORMATS = ("hf-layer-types", "trtllm")  # export formats with one attention rule per layer


def bound_lengths(lengths, max_length: int | None) -> tuple[int, ...]:
    """The lengths at which density and KV budgets bind: the searched ``lengths``, and beyond the longest of
    them every power of two below ``max_length`` and ``max_length`` itself. Every candidate's share is a
    piecewise-linear function of the length (windows grow as a + b·n up to a cap), so holding at this grid
    holds between its points up to the rounding of a window's ceiling; ``headplan eval`` reports the KV kept
    at every eval length for every method."""
    ls = sorted({int(n) for n in lengths})
    if max_length is None or not ls or max_length <= ls[-1]:
        return tuple(ls)
    n = 1 << ls[-1].bit_length()
    while n < max_length:
        ls.append(n)
        n <<= 1
    ls.append(int(max_length))
    return tuple(ls)


def parse_latency(s: str | None) -> tuple[float, int] | None:
    """'12.5@32768' or '12.5@32k' -> (12.5, 32768)."""
    from ..lengths import parse_length

    if s is None:
        return None
    try:
        ms, n = s.lower().split("@")
        return float(ms), parse_length(n)
    except (ValueError, HeadplanError):
        raise HeadplanError(f"--latency-budget takes MS@LENGTH (e.g. 40@32k), got {s!r}") from None


def parse_memory(s: str | None) -> tuple[float, int, int] | None:
    """'20@8x32k' -> (20.0 GB, batch 8, length 32768)."""
    from ..lengths import parse_length

    if s is None:
        return None
    try:
        gb, rest = s.lower().split("@")
        b, n = rest.split("x")
        return float(gb), int(b), parse_length(n)
    except (ValueError, HeadplanError):
        raise HeadplanError(f"--memory-budget takes GB@BATCHxLENGTH (e.g. 20@8x32k), got {s!r}") from None


def check_budget(name: str, bound: float | None, lengths, lowest) -> None:
    """A density or KV budget (``name``: density | kv_budget) must lie in (0, 1] and be reachable at every
    length: ``lowest(j)`` is the least value the candidates can give at ``lengths[j]``."""
    if bound is None:
        return
    if not 0.0 < bound <= 1.0:
        raise HeadplanError(f"--{name.replace('_', '-')} must be in (0, 1], got {bound}")
    for j, n in enumerate(lengths):
        lo = lowest(j)
        if lo > bound + 1e-12:
            raise HeadplanError(f"{name} {bound:g} is infeasible at length {n}: the cheapest candidates give "
                                f"{lo:.4f} (feasible range [{lo:.4f}, 1])")


def whole_number(flag: str, v) -> int:
    """A flag that takes a whole number >= 0 (``--pareto``, ``--tune``)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise HeadplanError(f"{flag} takes a whole number >= 0, got {v!r}")
    return v


def feasible_or_raise(cands, lengths: list[int], density: float | None, kv_budget: float | None,
                      model=None) -> None:
    """Fail before any work if no assignment of these candidates can meet the budget (against the
    model's own attention when its identity is given: sliding layers count their window as dense)."""
    from ..candidates import budget_tables
    from ..plan import ModelIdentity

    ident = model or ModelIdentity("", 1, 1, 1, 1, 1, "")
    tables = dict(zip(("density", "kv_budget"), budget_tables(cands, lengths, 64, ident)))  # (L, C, lengths)
    for name, bound in (("density", density), ("kv_budget", kv_budget)):
        check_budget(name, bound, lengths, lambda j, t=tables[name]: float(t[:, :, j].min(axis=1).mean()))
