"""Files: the atomic writer (temporary file + rename, the umask honoured) and the input reader that
refuses what is not a regular UTF-8 file. No torch."""

from __future__ import annotations

import os
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
