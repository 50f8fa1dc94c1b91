"""The Hopper (sm90, TMA) path of the sparse prefill (kernels/prefill_hopper.py) against the PyTorch oracle.

Runs only on a GPU of compute capability 9.0 (H100 / H200); skipped elsewhere, the CPU interpreter
included (the path is never selected there: test_never_selected_without_sm90 checks that on any machine).
Same tolerance as tests/test_kernel_prefill.py: at most twice the error of a reference computed in the
inputs' precision, plus a small absolute term. Few distinct compiled variants (each costs seconds).
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from headplan.kernels import patterns as P  # noqa: E402
from headplan.kernels import prefill_hopper as H  # noqa: E402
from cases import STREAM, STRIDED, bsp, full, skip, stream, strided, vslash  # noqa: E402

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)

ELASTIC = stream(64, 300, 0.05)
STATIC = [full(), ELASTIC, STRIDED, skip(), STREAM, strided(0, 100, stride=4, offset=3), full(), stream(4, 64)]


def test_never_selected_without_sm90():
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        assert not H.enabled("cpu")
    if torch.cuda.is_available() and not SM90 and os.environ.get("HEADPLAN_PREFILL_PATH", "auto") == "auto":
        assert not H.enabled("cuda")
    assert not H.supported_kinds(torch.float32, [P.FULL])
    assert not H.supported_kinds(torch.bfloat16, [P.FULL, P.VSLASH])


needs_sm90 = pytest.mark.skipif(not SM90, reason="the Hopper path needs a compute-capability 9.0 GPU")
if SM90:
    import test_kernel_prefill as TK  # the portable kernel's checker: same oracle and tolerance
    from headplan.kernels import prefill as K


def path_of(rows, G, L, D, dtype=torch.bfloat16, block=64, layer_window=0):
    q, k, _ = TK.rand_inputs(1, G * len(rows), len(rows), L, D, dtype)
    return K.build_plan(q, k, P.make_table(rows, layer_window=layer_window), 0.1, None, block)["path"]


@needs_sm90
@pytest.mark.parametrize("D,G,dtype", [(64, 1, torch.float16), (128, 4, torch.bfloat16), (256, 8, torch.bfloat16),
                                       (128, 8, torch.float16)])
def test_static_kinds(D, G, dtype):
    """Every static kind in one layer, odd length, left padding, GQA 1/4/8, head dims 64/128/256."""
    rows = STATIC[:4] if D == 256 else STATIC
    assert path_of(rows, G, 300, D, dtype) == "hopper"
    TK.check(rows, B=2, G=G, L=1037, D=D, dtype=dtype, pad=[0, 333])


@needs_sm90
def test_layer_window_and_transposed():
    """A sliding layer's own window bounds every head; (B, L, H, D) inputs viewed as (B, H, L, D)."""
    TK.check(STATIC, B=2, G=4, L=1500, D=128, dtype=torch.bfloat16, pad=[0, 201], layer_window=511, transposed=True)


@needs_sm90
def test_blocksparse_on_hopper():
    """Block selections aligned with the tiles stay on the Hopper path (exact tile lists, no gather)."""
    rows = [bsp(3), full(), STREAM, bsp(1)]
    assert path_of(rows, 4, 300, 128) == "hopper"
    TK.check(rows, B=2, G=4, L=1100, D=128, dtype=torch.bfloat16, pad=[0, 77])


@needs_sm90
def test_routed_to_portable():
    """VSLASH heads and pattern blocks that straddle tiles go to the portable kernel (still correct)."""
    rows = [vslash(100, 40), STREAM]
    assert path_of(rows, 2, 300, 128) == "portable"
    assert path_of([bsp(2), STREAM], 2, 300, 128, block=48) == "portable"
    assert path_of(STATIC, 2, 300, 128, dtype=torch.float32) == "portable"


@needs_sm90
def test_unaligned_view_and_group_chunks(monkeypatch):
    """A view at an odd offset (no TMA descriptor) is copied; query-head chunks never straddle KV groups."""
    monkeypatch.setenv("HEADPLAN_PREFILL_HCFG", "4,32,128,8,2")
    assert H.config(128, 3, False, 64)[0] == 1 and H.config(128, 8, False, 64)[0] == 4
    TK.check(STATIC[:4], B=1, G=4, L=700, D=128, dtype=torch.bfloat16, pad=[0])
    q, k, v = TK.rand_inputs(1, 8, 2, 517, 129, torch.bfloat16, seed=5)
    q, k, v = q[..., 1:], k[..., 1:], v[..., 1:]  # base off by 2 bytes, row stride 129 elements
    assert H.tma_ready(q) is not q
    table = P.make_table([ELASTIC, STRIDED])
    out = K.sparse_prefill(q, k, v, table, 1 / math.sqrt(128))
    ref = K.sparse_prefill(q.contiguous(), k.contiguous(), v.contiguous(), table, 1 / math.sqrt(128))
    assert torch.equal(out, ref)
