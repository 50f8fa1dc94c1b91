"""Pattern bookkeeping: the analytic pair counts equal brute-force masks."""
import pytest
import torch

from cases import bsp, full, skip, stream, strided, vslash
from headplan.kernels import patterns as P


@pytest.mark.parametrize("row", [
    stream(5, 17, 0.25),
    stream(0, 1),
    stream(64, 300),
    strided(7, 20, stride=3, offset=1),
    strided(70, 5, stride=2, offset=0, beta=0.125),
    full(),
    skip(),
])
@pytest.mark.parametrize("n", [1, 50, 333])
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("lwin", [0, 1, 29, 128])  # the layer's own sliding window (0 = global layer)
def test_visible_count_equals_brute_force(row, n, block, lwin):
    vis = P.static_visible(torch.arange(n)[:, None], torch.arange(n)[None, :], P.make_table([row], layer_window=lwin),
                           block)[0]
    assert int(vis.sum()) == P.visible_count(row, n, block, lwin)
    if lwin:  # never wider than the layer: a subset of its window
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        assert not bool((vis & ((i - j) >= lwin)).any())


@pytest.mark.parametrize("lwin", [0, 7, 100])
def test_blocksparse_and_vslash_counts_stay_inside_the_layer(lwin):
    for row in (bsp(2), vslash(8, 4)):
        n = 300
        assert P.visible_count(row, n, 16, lwin) <= P.visible_count(full(), n, 16, lwin)
        if lwin == 0:
            assert P.visible_count(row, n, 16) == P.visible_count(row, n, 16, 0)


@pytest.mark.parametrize("lwin", [0, 30, 120])
def test_kv_count_is_what_the_last_query_needs(lwin):
    row = stream(4, 10, 0.25)
    n = 200
    vis = P.static_visible(torch.tensor([[n - 1]]), torch.arange(n)[None, :], P.make_table([row], layer_window=lwin))[0]
    # the cache keeps what the last query sees, except sink tokens a sliding layer has already left behind
    assert int(vis.sum()) <= P.kv_count(row, n, lwin)
    if not lwin:
        assert int(vis.sum()) == P.kv_count(row, n)
    else:
        assert P.kv_count(row, n, lwin) <= lwin
        assert P.kv_count(full(), n, lwin) == min(n, lwin)


def test_one_vocabulary_kernels_and_plan_agree():
    """Pattern kinds and the window grid are defined once (plan.py, no torch); the kernels' constants
    (patterns.py and the Triton helpers) must equal them."""
    from headplan import plan
    from headplan.kernels import _triton as TT

    assert P.KIND_NAMES == plan.KINDS
    assert P.BETA_SCALE == plan.BETA_GRID
    for name in ("C_KIND", "C_SINK", "C_ALPHA", "C_BETA", "C_STRIDE", "C_OFFSET", "C_LWIN", "BETA_SCALE"):
        assert getattr(TT, name).value == getattr(P, name), name
    for kind in plan.KINDS:
        assert getattr(TT, f"K_{kind.upper()}").value == P.KIND_NAMES.index(kind)
    from cases import ONE_OF_EACH  # the tests' registry covers every kind

    assert tuple(ONE_OF_EACH) == plan.KINDS


def test_the_window_rule_agrees_in_plan_and_kernels():
    """W(n) has one definition per language: plan.Window.size (no torch) and patterns.window (torch / ints,
    which the Triton helper mirrors and the kernel tests check) give the same integer for every n."""
    import random

    from headplan.plan import Window

    rng = random.Random(0)
    for _ in range(300):
        alpha, beta, n = rng.randint(0, 5000), rng.randint(0, 4096) / 4096, rng.randint(1, 200000)
        row = {"alpha": alpha, "beta": beta}
        assert Window(alpha, beta).size(n) == P.window(alpha, P.beta_q(row), n)


def test_the_triton_window_rule_equals_the_one_rule():
    """kernels._triton.window (the Triton copy of W(n)) against kernels.kinds.window, on random alpha, beta, n."""
    from headplan.kernels.kinds import window

    g = torch.Generator().manual_seed(3)
    L = 64
    a, b = torch.randint(0, 5000, (L,), generator=g), torch.randint(0, 4097, (L,), generator=g)
    n = torch.randint(1, 200000, (L,), generator=g)
    out = torch.empty(L, dtype=torch.int64)
    _window_kernel()[(1,)](a, b, n, out, L=L)
    assert torch.equal(out, window(a, b, n))
    assert not torch.equal(out, a + b * n // 4000)  # a wrong grid would not pass


import triton  # noqa: E402  (the Triton copy's test kernel; conftest set the interpreter up before)
import triton.language as tl  # noqa: E402

from headplan.kernels import _triton as _TT  # noqa: E402


@triton.jit
def _window_kernel_jit(A, B, N, OUT, L: tl.constexpr):
    i = tl.arange(0, L)
    tl.store(OUT + i, _TT.window(tl.load(A + i), tl.load(B + i), tl.load(N + i)))


def _window_kernel():
    return _window_kernel_jit
