"""Resume state: each finished sample's statistics on disk, so a killed run continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import HeadplanError
from ..plan import atomic_write
from .format import _safetensors_bytes

STATE_VERSION = 1


class _StateDir:
    """Per-sample statistics on disk: DIR/run.json (the run's key) and DIR/n<len>-s<idx>.safetensors."""

    def __init__(self, path: str | Path, key: str, desc: dict, rank: int):
        self.dir = Path(path)
        self.key = key
        if self.dir.exists() and not self.dir.is_dir():
            raise HeadplanError(f"--resume must be a directory: {self.dir}")
        run = self.dir / "run.json"
        if run.is_file():
            try:
                old = json.loads(run.read_text()).get("key")
            except (OSError, json.JSONDecodeError, AttributeError):
                raise HeadplanError(f"--resume {self.dir}: run.json is unreadable; use an empty directory") from None
            if old != key:
                raise HeadplanError(f"--resume {self.dir} holds another run's statistics (different model, data, "
                                    "method, candidates or lengths); use an empty directory")
        elif rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run, json.dumps({"key": key, "state_version": STATE_VERSION, **desc}, indent=1,
                                         sort_keys=True))

    def _file(self, n: int, i: int) -> Path:
        return self.dir / f"n{n}-s{i}.safetensors"

    def load(self, n: int, i: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        from safetensors import safe_open
        from safetensors.torch import load

        f = self._file(n, i)
        if not f.is_file():
            return None
        try:
            raw = f.read_bytes()
            t = load(raw)
            with safe_open(str(f), framework="pt") as g:
                meta = g.metadata() or {}
        except Exception:  # noqa: BLE001 - a torn or foreign file: recompute the sample
            return None
        if meta.get("key") != self.key:
            return None
        try:
            smeta = json.loads(meta.get("sample", "{}"))
        except json.JSONDecodeError:
            return None
        return t, smeta

    def save(self, n: int, i: int, stats: dict[str, torch.Tensor], meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = _safetensors_bytes({k: v.contiguous() for k, v in stats.items()},
                                  metadata={"key": self.key, "sample": json.dumps(meta, sort_keys=True, default=str)})
        atomic_write(self._file(n, i), data)
