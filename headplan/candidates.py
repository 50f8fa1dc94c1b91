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


def select(sink: int, alpha: int, keep_beta: float, keep_alpha: int = 0) -> Candidate:
    name = f"sink{sink}+win{alpha}+keep" + "+".join(x for x in (f"{keep_alpha}" if keep_alpha else "",
                                                                f"{keep_beta:g}N" if keep_beta else "") if x)
    return Candidate(name, Pattern("select", sink=sink, window=Window(alpha, 0.0), keep=Window(keep_alpha, keep_beta)))


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
        *[select(64, 64, b) for b in (0.0625, 0.125, 0.25)],
    ],
    "small": lambda: [
        full(),
        *[streaming(4, w) for w in (8, 16, 32, 64)],
        streaming(4, 8, 0.125),
        blocksparse(1),
        vslash(8, 16),
        select(4, 8, 0.125),
    ],
}


def candidate_set(name: str) -> list[Candidate]:
    if name not in CANDIDATE_SETS:
        raise HeadplanError(f"unknown candidate set {name!r} (known: {', '.join(CANDIDATE_SETS)})")
    return CANDIDATE_SETS[name]()


@functools.lru_cache(maxsize=4096)
def _density(row_items: tuple, n: int, block: int, lwin: int) -> float:
    from .kernels.patterns import visible_count

    return visible_count(dict(row_items), n, block, lwin) / (n * (n + 1) / 2)


def density(p: Pattern, n: int, block: int = 64, lwin: int = 0) -> float:
    """Share of the causal (query, key) pairs at length n the pattern visits in a layer whose own
    sliding window is ``lwin`` (0 = global layer)."""
    return _density(tuple(sorted(p.row().items())), n, block, int(lwin or 0))


def kv_share(p: Pattern, n: int, lwin: int = 0) -> float:
    """Share of n tokens the head keeps in its cache, in a layer whose own window is ``lwin``."""
    rule = p.kv_rule()
    if rule == "all":
        keep = n
    elif rule == "none":
        return 0.0
    else:
        keep = min(n, rule.size(n))
    return (min(keep, lwin) if lwin else keep) / n


def budget_tables(candidates, lengths, block: int, model) -> tuple:
    """Per-layer budget coefficients against the model's **own** dense attention.

    Returns (density, kv), numpy arrays (layers, candidates, lengths): the mean over a plan's heads of
    ``density[layer, choice]`` is its attention density relative to the model's own dense attention
    (causal, with each sliding layer's window), and likewise for the KV share relative to the model's
    own cache. A model with no sliding layer gets the plain per-candidate shares in every layer."""
    import numpy as np

    pats = [c.pattern if isinstance(c, Candidate) else c for c in candidates]
    L = model.num_layers
    if not model.layer_windows:
        d = np.array([[density(p, n, block) for n in lengths] for p in pats], dtype=np.float64)
        k = np.array([[kv_share(p, n) for n in lengths] for p in pats], dtype=np.float64)
        return np.broadcast_to(d, (L,) + d.shape).copy(), np.broadcast_to(k, (L,) + k.shape).copy()
    full = Pattern("full")
    wins = [model.window(li) for li in range(L)]
    d = np.array([[[density(p, n, block, w) for n in lengths] for p in pats] for w in wins], dtype=np.float64)
    k = np.array([[[kv_share(p, n, w) for n in lengths] for p in pats] for w in wins], dtype=np.float64)
    dd = np.array([[density(full, n, block, w) for n in lengths] for w in wins]).mean(axis=0)  # (lengths,)
    kd = np.array([[kv_share(full, n, w) for n in lengths] for w in wins]).mean(axis=0)
    return d / dd[None, None, :], k / kd[None, None, :]


def plan_shares(model, layers, n: int, block: int = 64) -> tuple[float, float]:
    """(density, KV share) at length n of per-layer pattern lists (``layers[l]`` = the patterns of
    layer l's KV heads), against the model's own dense attention and cache: a sliding layer's dense is
    its window, so a plan never claims to save what the model never kept."""
    full = Pattern("full")
    num_d = num_k = den_d = den_k = 0.0
    for li, pats in enumerate(layers):
        w = model.window(li)
        for p in pats:
            num_d += density(p, n, block, w)
            num_k += kv_share(p, n, w)
            den_d += density(full, n, block, w)
            den_k += kv_share(full, n, w)
    return num_d / den_d, num_k / den_k


def same_as_full(p: Pattern, lwin: int) -> bool:
    """In a sliding layer, a pattern whose fixed window already spans the layer's window sees exactly
    what ``full`` sees there (the candidate collapses into full)."""
    if not lwin or p.kind not in ("streaming", "strided"):
        return p.kind == "full"
    return p.window is not None and p.window.alpha >= lwin
