"""Profiling signals: ``--method`` parsed into weights, and the stored loss combined from the signals.

Combining signals (``--method gradient,recall`` or with weights ``gradient=0.7,recall=0.3``;
default weights are equal): each signal's profile (clamped at 0) is divided by its mean over all
(layer, KV head, candidate, length) entries, then the weighted sum is stored as ``loss``. The header
records, under ``signals``, each signal's weight and scale; each signal's raw profile is stored too,
as tensor ``loss.<signal>``. A single signal is stored in its own units (weight 1, scale 1), clamped
at 0 (a negative first-order estimate, i.e. dropping would help, counts as 0).
"""

from __future__ import annotations

import math

import torch

from ..errors import HeadplanError
from .stats import SIGNALS

# the gradient signal split by the calibration samples' task, stored beside it (``loss.<name>``):
# ``gradient.lm`` over plain-text samples only (a next-token-loss proxy: what perplexity needs),
# ``gradient.answer`` over the answered samples only (passkey, needle, key->value: what retrieval needs)
DERIVED = {"gradient.lm": ("gradient", True), "gradient.answer": ("gradient", False)}
# signals learned after the statistics pass (``gates.py``): gate optimisation over every head at once
TRAINED = ("gates",)


def parse_method(method: str | dict, known: tuple[str, ...] = SIGNALS + TRAINED) -> dict[str, float]:
    """'gradient' | 'gradient,recall' | 'gradient=0.7,recall=0.3' -> {signal: weight} (ordered).

    known: the accepted names (the profiling signals; ``--signals``/``--keep`` also accept the
    stored task splits of the gradient signal, ``DERIVED``)."""
    if isinstance(method, dict):
        items = [(str(k), v) for k, v in method.items()]
    else:
        items = []
        for part in str(method).replace(" ", "").split(","):
            if not part:
                continue
            name, _, w = part.replace(":", "=").partition("=")
            items.append((name, w if w else None))
    if not items:
        raise HeadplanError("--method is empty (known: " + ", ".join(known) + ")")
    out: dict[str, float] = {}
    for name, w in items:
        if name not in known:
            raise HeadplanError(f"unknown profiling method {name!r} (known: {', '.join(known)})")
        if name in out:
            raise HeadplanError(f"--method names {name!r} twice")
        try:
            out[name] = float(w) if w is not None else 1.0 / len(items)
        except (TypeError, ValueError):
            raise HeadplanError(f"--method: weight of {name!r} is not a number: {w!r}") from None
        if not (out[name] > 0 and math.isfinite(out[name])):
            raise HeadplanError(f"--method: weight of {name!r} must be positive, got {w}")
    return out


def method_name(weights: dict[str, float]) -> str:
    return "+".join(weights)


def combine(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict]:
    """The stored loss from each signal's profile: a weighted sum after dividing each by its mean."""
    if len(weights) == 1:
        (name,) = weights
        return parts[name].clamp(min=0.0), {name: {"weight": 1.0, "scale": 1.0}}
    loss = torch.zeros_like(next(iter(parts.values())))
    hdr = {}
    for name, w in weights.items():
        x = parts[name].clamp(min=0.0)
        scale = float(x.mean())
        scale = scale if scale > 0 else 1.0
        loss += w * x / scale
        hdr[name] = {"weight": w, "scale": scale}
    return loss, hdr


def signal_weights(text, flag: str) -> tuple[tuple[str, float], ...]:
    """'gradient=0.3,recall=0.7' (or a dict) -> ((name, weight), ...); errors name ``flag``."""
    if not text:
        return ()
    try:
        return tuple(parse_method(text, SIGNALS + TRAINED + tuple(DERIVED)).items())
    except HeadplanError as e:
        raise HeadplanError(f"{flag}: {e}".replace("--method", flag).replace("profiling method", "signal")) from None


def keep_pairs(keep) -> tuple[tuple[str, float], ...]:
    """``--keep``: SIGNAL=SLACK pairs ('recall=1.2') or a dict -> ((name, slack), ...)."""
    if isinstance(keep, str) and any("=" not in part for part in keep.split(",") if part.strip()):
        raise HeadplanError(f"--keep: give SIGNAL=SLACK pairs, e.g. recall=1.2 (got {keep!r})")
    return signal_weights(keep, "--keep")
