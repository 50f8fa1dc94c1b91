"""Lengths as every flag and spec takes them: one 'k' rule (k = 1024), and the lengths that fit a model."""

from __future__ import annotations

from .errors import HeadplanError
from .progress import Reporter

DEFAULT_LENGTHS = (2048, 4096)


def parse_length(v, what: str = "length") -> int:
    """One length: an integer, or N with a 'k' suffix meaning N x 1024 ('2k' -> 2048, '32K' -> 32768).
    The one parser of lengths for every flag (--lengths, --latency-budget, --memory-budget...)."""
    t = str(v).strip().lower()
    try:
        n = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise HeadplanError(f"not a {what}: {v!r} (use e.g. 1024,2048 or 2k,4k; k = 1024)") from None
    if n <= 0:
        raise HeadplanError(f"{what}s must be positive, got {n}")
    return n


def parse_lengths(s: str | list | tuple) -> list[int]:
    """'1024,2k' (or a list) -> sorted distinct lengths, each read by parse_length."""
    if isinstance(s, (list, tuple)):
        vals = list(s)
    else:
        vals = [x for x in str(s).replace(" ", "").split(",") if x]
    out = [parse_length(v) for v in vals]
    if not out:
        raise HeadplanError("no lengths given")
    return sorted(set(out))


def fit_lengths(lengths, max_positions: int, flag: str = "--lengths", reporter: Reporter | None = None,
                default=DEFAULT_LENGTHS) -> list[int]:
    """The lengths to run at on a model of ``max_positions`` positions. Given lengths (a string or a list)
    must fit: one that does not is refused with what to pass instead. ``None`` means ``default``: the
    default lengths that do not fit are dropped (when none fits: half the positions and all of them),
    and the reporter says so in one line."""
    mp = int(max_positions)
    if lengths is not None:
        lens = parse_lengths(lengths)
        bad = [n for n in lens if n > mp]
        if bad:
            ok = [n for n in lens if n <= mp] or [mp // 2, mp]
            raise HeadplanError(f"length {bad[0]} exceeds the model's {mp} positions: pass {flag} "
                                f"{','.join(map(str, ok))} (every length at most {mp})")
        return lens
    lens = [n for n in parse_lengths(default) if n <= mp] or sorted({max(64, mp // 2), mp})
    if lens != parse_lengths(default):
        (reporter or Reporter()).log(f"default {flag} {','.join(map(str, parse_lengths(default)))} does not fit "
                                     f"the model's {mp} positions: using {','.join(map(str, lens))}")
    return lens


def optional_length(flag: str, value) -> int | None:
    """One length flag that may be left out (``--max-length 8k``): None stays None."""
    return None if value is None or value == "" else parse_length(value, f"{flag} length")


def optional_lengths(value) -> tuple[int, ...] | None:
    """A lengths flag that may be left out: None (or empty) stays None."""
    return tuple(parse_lengths(value)) if value else None
