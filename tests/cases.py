"""One registry of head rows that the kernel, reference and runtime tests all parametrise over.

A new pattern kind is added to ``kernels/patterns.py`` (and ``plan.KINDS``), then here: every test
that walks ``ONE_OF_EACH`` or ``MIXED`` then covers it in the reference, both kernels, the per-head
cache and the runtime.

Tests write their own head rows with the builders below (one per kind; each call returns a fresh
dict, so a test may change its row freely). A parameter left at ``None`` is left out of the row, as
a plan row that does not name it (``stream(4, 32)`` is ``{"kind": "streaming", "sink": 4, "alpha": 32}``);
keyword ``extra`` entries (a decode test's ``cap``, a select row's ``share``) go after the pattern's own.
"""


def _row(kind: str, extra: dict, **fields) -> dict:
    return {"kind": kind, **{k: v for k, v in fields.items() if v is not None}, **extra}


def full(**extra) -> dict:
    return _row("full", extra)


def skip(**extra) -> dict:
    return _row("skip", extra)


def stream(sink: int, alpha: int, beta: float | None = None, **extra) -> dict:
    """A streaming head: ``sink`` tokens + a window of ``alpha + beta * n`` (elastic when beta > 0)."""
    return _row("streaming", extra, sink=sink, alpha=alpha, beta=beta)


def strided(sink: int, alpha: int, stride: int, offset: int, beta: float | None = None, **extra) -> dict:
    """A strided head: sink + window + every ``stride``-th block from ``offset``."""
    return _row("strided", extra, sink=sink, alpha=alpha, beta=beta, stride=stride, offset=offset)


def bsp(topk: int, **extra) -> dict:
    """A block-sparse head keeping its ``topk`` best blocks."""
    return _row("blocksparse", extra, topk=topk)


def vslash(vertical: int, slash: int, **extra) -> dict:
    return _row("vslash", extra, vertical=vertical, slash=slash)


def sel(sink: int, alpha: int, keep_alpha: int, keep_beta: float | None = None, **extra) -> dict:
    """A select head: sink + ring of ``alpha`` + ``keep_alpha + keep_beta * n`` top-scored tokens."""
    return _row("select", extra, sink=sink, alpha=alpha, keep_alpha=keep_alpha, keep_beta=keep_beta)


FULL = full()
SKIP = skip()
STREAM = stream(4, 16, 0.125)  # elastic window
STRIDED = strided(2, 8, stride=3, offset=1, beta=0.05)
BSP = bsp(1)
VSL = vslash(9, 6)
SEL = sel(4, 8, keep_alpha=2, keep_beta=0.125)

# one row of every kind, in plan.KINDS order (a test asserts the order)
ONE_OF_EACH = {"full": FULL, "streaming": STREAM, "strided": STRIDED, "blocksparse": BSP, "vslash": VSL,
               "skip": SKIP, "select": SEL}

# the runtime's mixed plans (small windows so tiny test sequences evict)
MIXED = [
    stream(4, 8, 0.125),
    full(),
    strided(2, 4, stride=3, offset=1),
    stream(3, 5),
    skip(),
]
