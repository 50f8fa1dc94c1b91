"""The profile file: the Profile record, deterministic safetensors bytes, save/load with every field
checked, the digest that seals header and tensors, and what a profile says about its heads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..candidates import Candidate
from ..errors import HeadplanError, PlanError, ProfileError
from ..plan import ModelIdentity, atomic_write
from .signals import DERIVED, TRAINED
from .stats import SIGNALS

FORMAT = "headplan-profile"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Profile:
    model: ModelIdentity
    model_spec: str
    method: str
    lengths: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    block_size: int
    data: dict
    samples: int
    loss: torch.Tensor  # (layers, kv_heads, candidates, lengths) float32
    density: torch.Tensor  # (candidates, lengths) float64
    kv: torch.Tensor  # (candidates, lengths) float64
    versions: dict
    sha256: str = ""  # of the file it was loaded from
    signals: dict = field(default_factory=dict)  # {signal: {"weight": w, "scale": s}}; {} in old profiles
    parts: dict = field(default_factory=dict)  # {signal: (layers, kv_heads, candidates, lengths) float32}

    def header(self) -> dict:
        h = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
            "model": self.model.to_dict(), "model_spec": self.model_spec, "lengths": list(self.lengths),
            "candidates": [c.to_dict() for c in self.candidates], "block_size": self.block_size,
            "data": self.data, "samples": self.samples, "versions": self.versions,
        }
        if self.signals:
            h["signals"] = self.signals
        return h


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes that depend only on the contents: the JSON header is re-written with sorted keys
    (the library's own header order varies from process to process); the tensor data is unchanged."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    head = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data[8 + n:]


def save_profile(prof: Profile, path: str | Path) -> str:
    tensors = {"loss": prof.loss.float().contiguous(), "density": prof.density.double().contiguous(),
               "kv": prof.kv.double().contiguous()}
    for name, t in prof.parts.items():
        tensors[f"loss.{name}"] = t.float().contiguous()
    header = prof.header()
    meta = {"headplan": json.dumps(header, sort_keys=True), "digest": _digest(header, tensors)}
    data = _safetensors_bytes(tensors, meta)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_profile(path: str | Path) -> Profile:
    """Load and verify a profile (safetensors; never pickle). Reads recall-only profiles too.

    Every header field and tensor is checked (types, ranges, shapes, finite values); errors name the
    field, never the file's contents."""
    from safetensors.torch import load

    from ..plan import read_input

    p = Path(path)
    raw = read_input(p, "profile", ProfileError, text=False)
    try:
        tensors = load(raw)
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
    except Exception:  # noqa: BLE001 - safetensors raises several error types
        raise ProfileError(f"{p}: not a safetensors profile") from None
    if not isinstance(meta, dict) or "headplan" not in meta or "digest" not in meta:
        raise ProfileError(f"{p}: safetensors file has no headplan profile header")
    try:
        header = json.loads(meta["headplan"])
    except (TypeError, json.JSONDecodeError):
        raise ProfileError(f"{p}: profile header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ProfileError(f"{p}: profile header is not a mapping")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ProfileError(f"{p}: unsupported profile format (format, format_version)")
    for k in ("loss", "density", "kv"):
        if k not in tensors:
            raise ProfileError(f"{p}: profile lacks tensor {k!r}")
    if _digest(header, tensors) != meta["digest"]:
        raise ProfileError(f"{p}: profile header or tensors were modified (digest mismatch)")
    try:
        prof = _checked_profile(header, tensors, hashlib.sha256(raw).hexdigest())
    except PlanError as e:
        raise ProfileError(f"{p}: {e}") from None
    return prof


def _checked_profile(header: dict, tensors: dict[str, torch.Tensor], sha256: str) -> Profile:
    """A Profile from a verified header and tensors, every field checked (PlanError naming the field)."""
    from ..plan import MAX_BLOCK, _float, _int, _keys, _list, _need, _short, model_identity, pattern_of_row

    known = ("format", "format_version", "method", "model", "model_spec", "lengths", "candidates", "block_size",
             "data", "samples", "versions", "signals")
    _keys(header, known, "header")
    model = model_identity(_need(header, "model", "header"), "header.model")
    lengths = tuple(_int(x, f"header.lengths[{i}]", 1)
                    for i, x in enumerate(_list(_need(header, "lengths", "header"), "header.lengths")))
    if not lengths or list(lengths) != sorted(set(lengths)):
        raise PlanError("header.lengths: expected increasing distinct lengths")
    cands = []
    for i, c in enumerate(_list(_need(header, "candidates", "header"), "header.candidates")):
        name = _need(c, "name", f"header.candidates[{i}]")
        if not isinstance(name, str) or not name:
            raise PlanError(f"header.candidates[{i}].name: expected a name, got {_short(name)}")
        if any(x.name == name for x in cands):
            raise PlanError(f"header.candidates[{i}].name: {_short(name)} appears twice")
        cands.append(Candidate(name, pattern_of_row(c, f"header.candidates[{i}]")))
    if not cands:
        raise PlanError("header.candidates: empty")
    block = _int(_need(header, "block_size", "header"), "header.block_size", 16, MAX_BLOCK)
    samples = _int(_need(header, "samples", "header"), "header.samples", 1)
    for k in ("method", "model_spec"):
        if not isinstance(_need(header, k, "header"), str):
            raise PlanError(f"header.{k}: expected a string, got {_short(header[k])}")
    for k in ("data", "versions"):
        if not isinstance(_need(header, k, "header"), dict):
            raise PlanError(f"header.{k}: expected a mapping, got {type(header[k]).__name__}")
    signals = header.get("signals", {})
    if not isinstance(signals, dict):
        raise PlanError(f"header.signals: expected a mapping, got {type(signals).__name__}")
    for s, v in signals.items():
        if s not in SIGNALS + TRAINED:
            raise PlanError(f"header.signals.{s}: unknown signal (known: {', '.join(SIGNALS + TRAINED)})")
        _keys(v, ("weight", "scale"), f"header.signals.{s}")
        for k in ("weight", "scale"):
            if _float(_need(v, k, f"header.signals.{s}"), f"header.signals.{s}.{k}") <= 0:
                raise PlanError(f"header.signals.{s}.{k}: must be positive")
    L, H, C, N = model.num_layers, model.num_kv_heads, len(cands), len(lengths)
    parts = {}
    for k, t in tensors.items():
        if k in ("loss", "density", "kv"):
            continue
        name = k[len("loss."):] if k.startswith("loss.") else None
        if name not in SIGNALS + TRAINED and name not in DERIVED:
            raise PlanError(f"tensor {_short(k)}: not a profile tensor")
        parts[name] = t
    for k, t, shape, dtype in ([("loss", tensors["loss"], (L, H, C, N), torch.float32),
                                ("density", tensors["density"], (C, N), torch.float64),
                                ("kv", tensors["kv"], (C, N), torch.float64)]
                               + [(f"loss.{n}", t, (L, H, C, N), torch.float32) for n, t in parts.items()]):
        if tuple(t.shape) != shape:
            raise PlanError(f"tensor {k}: has shape {tuple(t.shape)}, the header implies {shape}")
        if t.dtype != dtype:
            raise PlanError(f"tensor {k}: expected {dtype}, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise PlanError(f"tensor {k}: holds NaN or infinite values")
        if k in ("density", "kv") and not bool(((t >= 0) & (t <= 1)).all()):
            raise PlanError(f"tensor {k}: values must be in [0, 1]")
        if k == "loss" and bool((t < 0).any()):
            raise PlanError("tensor loss: values must be >= 0")
    return Profile(model=model, model_spec=header["model_spec"], method=header["method"], lengths=lengths,
                   candidates=tuple(cands), block_size=block, data=header["data"], samples=samples,
                   loss=tensors["loss"], density=tensors["density"], kv=tensors["kv"], versions=header["versions"],
                   sha256=sha256, signals=signals, parts=parts)


def versions() -> dict:
    import transformers

    return {"headplan": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------------
# what a profile says: the short-window candidate and the most retrieval-like heads
# ------------------------------------------------------------------------------------------------

def short_window(prof: Profile) -> int:
    """Index of the short-window candidate: the fixed streaming window with the least KV."""
    best = None
    for ci, c in enumerate(prof.candidates):
        p = c.pattern
        if p.kind == "streaming" and p.window.beta == 0.0:
            k = (p.window.alpha, p.sink)
            if best is None or k < best[0]:
                best = (k, ci)
    if best is None:
        raise HeadplanError("the profile has no fixed sink + window candidate to plot")
    return best[1]


def retrieval_heads(prof: Profile, top: int = 10) -> list[dict]:
    """Heads that lose most under the short window (averaged over lengths): retrieval-like heads."""
    ci = short_window(prof)
    x = prof.loss[:, :, ci, :].double().mean(-1)  # (layers, kv)
    order = torch.argsort(x.flatten(), descending=True, stable=True)[:top]
    H = prof.model.num_kv_heads
    out = []
    for rank, f in enumerate(order.tolist()):
        layer, h = divmod(f, H)
        row = {"rank": rank + 1, "layer": layer, "kv_head": h, "candidate": prof.candidates[ci].name,
               "loss": float(x[layer, h])}
        for s, t in prof.parts.items():
            row[s] = float(t[layer, h, ci].double().mean())
        out.append(row)
    return out


class ProfileResult(tuple):
    """``(profile, path)`` as returned by do_profile, plus ``.heads`` (the most retrieval-like heads:
    largest loss under the short-window candidate) and ``.plot`` (the PNG written, or None)."""

    def __new__(cls, prof, path, heads, plot):
        self = super().__new__(cls, (prof, path))
        self.heads = heads
        self.plot = plot
        return self
