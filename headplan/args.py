"""Every string -> value parser of the command line and the API, and the checks every verb makes before
any work: lengths (one 'k' rule: k = 1024), signal weights, baseline names, pattern kinds, whole-number
flags, output paths."""

from __future__ import annotations

import os
from pathlib import Path

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


def _check_out(out: Path, suffixes: tuple[str, ...], what: str, directory: bool = False) -> Path:
    """Refuse an output path before any work: wrong suffix, a directory where a file goes (or a file
    where a directory goes), or a place that cannot be written (a parent that is a regular file, a
    read-only directory)."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise HeadplanError(f"{what} output must end with {' or '.join(suffixes)}: {out}")
    if directory:
        if out.exists() and not out.is_dir():
            raise HeadplanError(f"--out {out}: exists and is not a directory ({what} output is a directory)")
    elif out.exists() and out.is_dir():
        raise HeadplanError(f"{what} output is a directory: {out}")
    a = out if directory and out.is_dir() else out.parent
    while not a.exists() and a != a.parent:
        if a.is_symlink():
            raise HeadplanError(f"--out {out}: {a} is a dangling link")
        a = a.parent
    if not a.is_dir():
        raise HeadplanError(f"--out {out}: {a} is not a directory")
    if not os.access(a, os.W_OK | os.X_OK):
        raise HeadplanError(f"--out {out}: {a} is not writable")
    return out


def _signal_weights(text, flag: str) -> tuple[tuple[str, float], ...]:
    """'gradient=0.3,recall=0.7' (or a dict) -> ((name, weight), ...); errors name ``flag``."""
    from .profile import DERIVED, SIGNALS, TRAINED, parse_method

    if not text:
        return ()
    try:
        return tuple(parse_method(text, SIGNALS + TRAINED + tuple(DERIVED)).items())
    except HeadplanError as e:
        raise HeadplanError(f"{flag}: {e}".replace("--method", flag).replace("profiling method", "signal")) from None


def _baseline_names(value) -> list[str]:
    """True -> the window baselines (streaming, duo, moa, random); 'a,b' or a list -> those names (checked,
    the selection ones snapkv, pyramidkv, adakv and duo-otf among them); None/False -> none."""
    from .search.baselines import BASELINES, DEFAULT_BASELINES

    if value is True:
        return list(DEFAULT_BASELINES)
    if not value:
        return []
    names = [x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip()]
    for x in names:
        if x not in BASELINES:
            raise HeadplanError(f"unknown baseline {x!r} (known: {', '.join(BASELINES)})")
    return names


def whole_number(flag: str, v) -> int:
    """A flag that takes a whole number >= 0 (``--pareto``, ``--tune``)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise HeadplanError(f"{flag} takes a whole number >= 0, got {v!r}")
    return v


def keep_pairs(keep) -> tuple[tuple[str, float], ...]:
    """``--keep``: SIGNAL=SLACK pairs ('recall=1.2') or a dict -> ((name, slack), ...)."""
    if isinstance(keep, str) and any("=" not in part for part in keep.split(",") if part.strip()):
        raise HeadplanError(f"--keep: give SIGNAL=SLACK pairs, e.g. recall=1.2 (got {keep!r})")
    return _signal_weights(keep, "--keep")


def pattern_kinds(value, flag: str = "--exclude-kinds") -> tuple[str, ...]:
    """'streaming,skip' (or a list) -> the pattern kinds, each checked against plan.KINDS."""
    from .plan import KINDS

    kinds = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else (value or ())) if x.strip())
    for k in kinds:
        if k not in KINDS:
            raise HeadplanError(f"{flag}: unknown pattern kind {k!r} (known: {', '.join(KINDS)})")
    return kinds


def optional_length(flag: str, value) -> int | None:
    """One length flag that may be left out (``--max-length 8k``): None stays None."""
    return None if value is None or value == "" else parse_length(value, f"{flag} length")


def optional_lengths(value) -> tuple[int, ...] | None:
    """A lengths flag that may be left out: None (or empty) stays None."""
    return tuple(parse_lengths(value)) if value else None


def named_plans(plan_path) -> tuple[list[str | None], list[Path]]:
    """``eval --plan`` values: PATH, or NAME=PATH naming the method (e.g. a baseline plan built earlier).
    Returns (names, None where unnamed; paths)."""
    given = [str(p) for p in (plan_path if isinstance(plan_path, (list, tuple)) else [plan_path])]
    if not given:
        raise HeadplanError("give a plan: --plan PLAN")
    names, paths = [], []
    for g in given:
        name, sep, rest = g.partition("=")
        if sep and name and not any(c in name for c in "/\\") and not Path(g).is_file():
            if not all(c.isalnum() or c in "_-.@" for c in name):
                raise HeadplanError(f"--plan {g}: a method name may use letters, digits, _ - . @ only")
            names.append(name)
            paths.append(Path(rest))
        else:
            names.append(None)
            paths.append(Path(g))
    return names, paths


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
