"""What samples are made from: the haystack text (default: the Python stdlib's ``pydoc_data/topics.py``,
present on every Python; ``--text FILE`` adds the user's own) and the task mixture YAML files
(by name from ``calibration_data/``, or a path)."""

from __future__ import annotations

import hashlib
import importlib.resources
import math
from pathlib import Path

from ..errors import HeadplanError
from ..plan import load_yaml, read_input


def pydoc_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_texts(paths: list[str] | None) -> tuple[str, list[dict]]:
    """The haystack text and a description of where it came from (for provenance)."""
    if not paths:
        text = pydoc_text()
        return text, [{"source": "pydoc_data/topics.py", "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}]
    parts, desc = [], []
    for p in paths:
        path = Path(p)
        t = read_input(path, "text file", HeadplanError)
        if not t.strip():
            raise HeadplanError(f"text file is empty: {p}")
        parts.append(t)
        desc.append({"source": path.name, "sha256": hashlib.sha256(t.encode()).hexdigest()[:16]})
    return "\n\n".join(parts), desc


def load_task_file(name_or_path: str | None, default: str) -> dict:
    """A task YAML from calibration_data/ (by name) or from a path."""
    name = name_or_path or default
    p = Path(name)
    if p.exists() or p.is_symlink():
        text = read_input(p, "data spec", HeadplanError)
    else:
        fname = name if name.endswith(".yaml") else name + ".yaml"
        try:
            text = importlib.resources.files("headplan.calibration_data").joinpath(fname).read_text()
        except (FileNotFoundError, ModuleNotFoundError):
            raise HeadplanError(f"data spec not found: {name} (a YAML path or a name in calibration_data/)") from None
    d = load_yaml(text, name, HeadplanError)
    if not isinstance(d, dict):
        raise HeadplanError(f"{name}: expected a mapping")
    _check_spec(d, name)
    return d


def _check_spec(d: dict, name: str) -> None:
    """The fields a mixture shares with every spec: a list of task mappings with positive finite shares,
    integer seed and samples_per_length (the tasks' own options are checked when samples are made)."""
    from ..plan import _short

    for k, lo in (("seed", None), ("samples_per_length", 1)):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo)):
            raise HeadplanError(f"{name}: {k}: expected an integer{f' >= {lo}' if lo else ''}, got {_short(v)}")
    if "tasks" not in d:
        return
    tasks = d["tasks"]
    if not isinstance(tasks, list):
        raise HeadplanError(f"{name}: tasks: expected a list of task mappings, got {type(tasks).__name__}")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise HeadplanError(f"{name}: tasks[{i}]: expected a mapping, got {type(t).__name__}")
        s = t.get("share", 1.0)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise HeadplanError(f"{name}: tasks[{i}].share: must be a positive number, got {_short(s)}")
