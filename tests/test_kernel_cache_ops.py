"""The decode-step cache write kernel against its PyTorch oracle (interpreter on CPU, GPU with CUDA)."""
import os

import pytest
import torch

from headplan.kernels.reference import commit_decode_ref

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
from headplan.kernels.cache_ops import commit_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16 if torch.cuda.is_available() else torch.float32])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("D", [64, 80])
def test_commit_matches_reference(dtype, with_valid, D):
    g = torch.Generator().manual_seed(D)
    B, H = 3, 5
    # heads: full (cap 40), streaming sink 4 ring 8 (cap 12), skip (cap 0), full-like ring 0, streaming sink 0 ring 5
    cap = torch.tensor([40, 12, 0, 30, 5])
    ring = torch.tensor([0, 8, 0, 0, 5])
    sink = torch.tensor([0, 4, 0, 0, 0])
    off = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), cap[:-1]]), 0)
    S = int(cap.sum()) + 1
    k = torch.randn(B, H, D, generator=g).to(dtype)
    v = torch.randn(B, H, D, generator=g).to(dtype)
    n = torch.tensor([3, 17, 29])
    valid = torch.tensor([True, False, True]) if with_valid else None
    bufs = [torch.randn(B, S, D, generator=g).to(dtype), torch.randn(B, S, D, generator=g).to(dtype),
            torch.randint(-1, 50, (B, S), generator=g).to(torch.int32)]
    ref = [t.clone() for t in bufs]
    got = [t.clone().to(DEV) for t in bufs]
    args = [x.to(DEV) for x in (off, cap, ring, sink)]
    vl_ref = commit_decode_ref(k, v, *ref, n, valid, off, cap, ring, sink)
    vl = commit_decode(k.to(DEV), v.to(DEV), *got, n.to(DEV), None if valid is None else valid.to(DEV), *args)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b)
    assert torch.equal(vl.cpu(), vl_ref)
    assert not torch.equal(ref[0], bufs[0])  # something was written
