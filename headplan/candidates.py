"""Candidate patterns: defined once, shared by profile, search, runtime and eval.

A candidate is a named Pattern. ``density(c, n)`` is the share of causal (query, key) pairs the
pattern visits at length n; ``kv_share(c, n)`` the share of the KV cache it keeps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import HeadplanError
from .plan import Pattern, Window


@dataclass(frozen=True)
class Candidate:
    name: str
    pattern: Pattern

    def to_dict(self) -> dict:
        return {"name": self.name, **self.pattern.row()}

    @staticmethod
    def from_dict(d: dict) -> "Candidate":
        d = dict(d)
        name = d.pop("name")
        return Candidate(name, Pattern.from_row(d))


def full() -> Candidate:
    return Candidate("full", Pattern("full"))


def streaming(sink: int, alpha: int, beta: float = 0.0) -> Candidate:
    name = f"sink{sink}+win{alpha}" + (f"+{beta:g}N" if beta else "")
    return Candidate(name, Pattern("streaming", sink=sink, window=Window(alpha, beta)))


def strided(sink: int, alpha: int, stride: int, offset: int) -> Candidate:
    return Candidate(f"sink{sink}+win{alpha}+stride{stride}o{offset}",
                     Pattern("strided", sink=sink, window=Window(alpha, 0.0), stride=stride, offset=offset))


def blocksparse(topk: int) -> Candidate:
    return Candidate(f"blocks{topk}", Pattern("blocksparse", topk=topk))


def vslash(vertical: int, slash: int) -> Candidate:
    return Candidate(f"vslash{vertical}/{slash}", Pattern("vslash", vertical=vertical, slash=slash))


def skip() -> Candidate:
    return Candidate("skip", Pattern("skip"))


CANDIDATE_SETS = {
    # full; sink + window at several sizes (fixed and elastic alpha + beta·N); dynamic top-k
    # blocks; vertical-slash
    "default": lambda: [
        full(),
        *[streaming(64, w) for w in (32, 64, 128, 256, 512, 1024, 2048)],
        *[streaming(64, 64, b) for b in (0.0625, 0.125, 0.25)],
        *[blocksparse(k) for k in (2, 4, 8)],
        *[vslash(v, s) for v, s in ((64, 64), (128, 256), (256, 512))],
    ],
    "small": lambda: [
        full(),
        *[streaming(4, w) for w in (8, 16, 32, 64)],
        streaming(4, 8, 0.125),
        blocksparse(1),
        vslash(8, 16),
    ],
}


def candidate_set(name: str) -> list[Candidate]:
    if name not in CANDIDATE_SETS:
        raise HeadplanError(f"unknown candidate set {name!r} (known: {', '.join(CANDIDATE_SETS)})")
    return CANDIDATE_SETS[name]()


@functools.lru_cache(maxsize=4096)
def _density(row_items: tuple, n: int, block: int) -> float:
    from .kernels.patterns import visible_count

    return visible_count(dict(row_items), n, block) / (n * (n + 1) / 2)


def density(p: Pattern, n: int, block: int = 64) -> float:
    return _density(tuple(sorted(p.row().items())), n, block)


def kv_share(p: Pattern, n: int) -> float:
    rule = p.kv_rule()
    if rule == "all":
        return 1.0
    if rule == "none":
        return 0.0
    return min(n, rule.size(n)) / n
