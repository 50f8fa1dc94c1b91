"""Save a patched model (weights, tokenizer, plan.yaml) into a directory and load it back applied."""

from __future__ import annotations

from pathlib import Path

from ..errors import HeadplanError
from ..files import sibling_dir
from ..plan import Plan, _umask, load_plan, save_plan
from .apply import apply, dense


def check_patched_out(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an ``--out`` that save_patched() must not touch: a path that exists and is not a directory,
    or a non-empty directory that is not an earlier ``apply --out`` (plan.yaml headplan can read beside
    a config.json) unless ``force``."""
    from ..files import check_out as _check_out

    out = _check_out(Path(out_dir), (), "patched model", directory=True)
    if out.is_dir() and any(out.iterdir()) and not force and not _is_patched_dir(out):
        raise HeadplanError(f"--out {out}: directory is not empty and not a headplan output; pass --force to "
                            "write into it (nothing else there is removed)")
    return out


def _is_patched_dir(d: Path) -> bool:
    if not (d / "config.json").is_file():
        return False
    try:
        load_plan(d / "plan.yaml")
    except HeadplanError:
        return False
    return True


def save_patched(model, plan: Plan, out_dir: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Save weights, tokenizer and plan.yaml into a directory that load_patched() restores.

    Written into a fresh temporary directory beside ``out_dir``, then moved into place: a new directory
    is renamed into place whole; into an existing one (empty, an earlier headplan output, or any with
    ``force``) each file is moved over its namesake, and nothing else there is ever removed."""
    import os
    import shutil

    out = check_patched_out(out_dir, force)
    dest = out.resolve()
    tmp = sibling_dir(dest, out)
    try:
        with dense(model):
            model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        save_plan(plan, tmp / "plan.yaml")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if not dest.exists():
            tmp.rename(dest)
        else:
            for f in sorted(tmp.iterdir()):
                there = dest / f.name
                if there.is_dir() and not there.is_symlink():
                    raise HeadplanError(f"--out {out}: {f.name} is a directory there; cannot write the file")
                os.replace(f, there)
    except OSError as e:
        raise HeadplanError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_patched(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a directory written by save_patched() and apply its plan; returns LoadedModel."""
    from ..models import load_model

    p = Path(path)
    if not (p / "plan.yaml").is_file():
        raise HeadplanError(f"{p}: no plan.yaml (not a directory written by `headplan apply --out`)")
    lm = load_model(str(p), dtype=dtype, device=device)
    apply(lm.model, load_plan(p / "plan.yaml"))
    return lm
