"""Files: the atomic writer (temporary file + rename, the umask honoured), the staged output directory
(written beside, swapped in whole) and the input reader that refuses what is not a regular UTF-8 file.
No torch."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import HeadplanError, PlanError


def read_input(path: str | os.PathLike, what: str, error=PlanError, text: bool = True) -> str | bytes:
    """The contents of an input file, refusing what is not a regular file (a FIFO, /dev/zero, a
    directory) before opening it; text must be UTF-8 without NUL bytes. Errors name ``what`` and the
    path, never the contents."""
    import stat

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} is not a regular file: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if not text:
        return raw
    if b"\0" in raw:
        raise error(f"{what} {p}: not text (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {p}: not UTF-8 text (invalid byte at offset {e.start})") from None


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename, so no half-written file is left."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    except OSError as e:
        raise HeadplanError(f"cannot write {p}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: honour the umask instead
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise HeadplanError(f"cannot write {p}: {e.strerror or e}") from None
        raise


def sibling_dir(dest: Path, given, tag: str = ".") -> Path:
    """A fresh hidden directory ``.NAME<tag>XXXX`` beside ``dest`` (its parent made if missing), where an output
    is written before it is moved into place; ``given`` names the output in the one-line error."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}{tag}", dir=dest.parent))
    except OSError as e:
        raise HeadplanError(f"cannot write {given}: {e.strerror or e}") from None


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike):
    """Write an output directory whole: yields a hidden sibling ``.NAME.stage-XXXX`` holding hard links (or
    copies) of what ``out`` holds; on success it replaces ``out`` (for a link to a directory: its target),
    on an exception it is removed and ``out`` is left as it was."""
    given = Path(out)
    out = given.resolve()
    try:
        inside = Path.cwd().resolve().is_relative_to(out)
    except OSError:
        inside = False
    if inside:
        raise HeadplanError(f"--out {given}: holds the working directory, which replacing it would remove; "
                            "run from elsewhere")
    stage = sibling_dir(out, given, ".stage-")
    try:
        try:
            if out.is_dir():  # copytree also copies the folder's own mode
                shutil.copytree(out, stage, symlinks=True, dirs_exist_ok=True, copy_function=_link_or_copy)
            else:
                os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700: honour the umask instead
        except (OSError, shutil.Error) as e:
            raise HeadplanError(f"cannot stage {given}: {getattr(e, 'strerror', None) or e}") from None
        yield stage
        _swap_in(stage, out, given)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (atomic_write in the stage renames over it: the original is untouched), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_in(stage: Path, out: Path, given: Path) -> None:
    """Rename ``stage`` to ``out``; an existing ``out`` is first renamed aside (back if the second rename
    fails), then removed."""
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old)  # over the empty folder just made
        try:
            os.rename(stage, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
    except OSError as e:
        if old is not None and old.is_dir() and not any(old.iterdir()):
            old.rmdir()
        raise HeadplanError(f"cannot replace {given}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path, suffixes: tuple[str, ...], what: str, directory: bool = False) -> Path:
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


def final_path(path: str | Path, stage: Path | None, out: str | Path) -> Path:
    """Where ``path`` will be once ``stage`` (a staged_dir of ``out``) is swapped in."""
    p, st = Path(path), stage and Path(stage).resolve()
    if st is not None and p.resolve().is_relative_to(st):
        return Path(out) / p.resolve().relative_to(st)
    return p


def record_path(path: str | Path, out: str | Path) -> str:
    """A path as an output records it: relative to ``out`` when it lies inside (links resolved; so a
    moved or copied folder still finds it), else absolute."""
    p, o = Path(path).resolve(), Path(out).resolve()
    return p.relative_to(o).as_posix() if p.is_relative_to(o) else str(p)
