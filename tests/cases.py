"""One registry of head rows that the kernel, reference and runtime tests all parametrise over.

A new pattern kind is added to ``kernels/patterns.py`` (and ``plan.KINDS``), then here: every test
that walks ``ONE_OF_EACH`` or ``MIXED`` then covers it in the reference, both kernels, the per-head
cache and the runtime.
"""

FULL = {"kind": "full"}
SKIP = {"kind": "skip"}
STREAM = {"kind": "streaming", "sink": 4, "alpha": 16, "beta": 0.125}  # elastic window
STRIDED = {"kind": "strided", "sink": 2, "alpha": 8, "beta": 0.05, "stride": 3, "offset": 1}
BSP = {"kind": "blocksparse", "topk": 1}
VSL = {"kind": "vslash", "vertical": 9, "slash": 6}
SEL = {"kind": "select", "sink": 4, "alpha": 8, "keep_alpha": 2, "keep_beta": 0.125}

# one row of every kind, in plan.KINDS order (a test asserts the order)
ONE_OF_EACH = {"full": FULL, "streaming": STREAM, "strided": STRIDED, "blocksparse": BSP, "vslash": VSL,
               "skip": SKIP, "select": SEL}

# the runtime's mixed plans (small windows so tiny test sequences evict)
MIXED = [
    {"kind": "streaming", "sink": 4, "alpha": 8, "beta": 0.125},
    {"kind": "full"},
    {"kind": "strided", "sink": 2, "alpha": 4, "stride": 3, "offset": 1},
    {"kind": "streaming", "sink": 3, "alpha": 5},
    {"kind": "skip"},
]
