"""Fused VSLASH scores (kernels/vslash_scores.py) against the torch computation of vslash_select.

On a machine without CUDA, conftest.py sets TRITON_INTERPRET=1 and the kernels run on the CPU
(fp16 and fp32; bf16 dot is wrong in the interpreter). Tolerance: the fused error against the
float64 torch scores is at most a small multiple of the fp32 torch error, plus a tiny floor.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from headplan.kernels import dynamic_index as DI  # noqa: E402
from headplan.kernels import vslash_scores as VS  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def inputs(B, Hkv, G, L, D, dtype, seed, spread=2.0):
    """Random q, k (never zero), q scaled so the softmax over scale * q.k is far from flat."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hkv * G, L, D, generator=g) * spread).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype).to(DEV)
    return q, k


def check_close(q, k, heads, scale, pad):
    col, diag = VS.vslash_scores(q, k, heads, scale, pad)
    ref = DI._vslash_scores_torch(q.double(), k.double(), heads, scale, pad)
    t32 = DI._vslash_scores_torch(q, k, heads, scale, pad)
    for got, r, t in zip((col, diag), ref, t32):
        assert got.dtype == torch.float32 and got.shape == r.shape
        err = (got.double() - r).abs().max().item()
        err32 = (t.double() - r).abs().max().item()
        assert err <= 8 * err32 + 1e-6 * r.abs().max().item() + 1e-9, (err, err32)
    return col, diag


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hkv,G,L,D,pad", [
    (2, 2, 2, 37, 64, [0, 5]),        # L < 64: m = L
    (1, 2, 4, 190, 128, None),
    (2, 1, 1, 257, 64, [3, 100]),     # odd length, several tiles of padding
    (2, 2, 4, 130, 128, [0, 70]),     # pad > L - m: all-hidden rows
    (1, 1, 2, 9, 64, None),           # tiny
    (1, 1, 8, 70, 64, [2]),           # G = 8
])
def test_scores_match_torch(dtype, B, Hkv, G, L, D, pad):
    q, k = inputs(B, Hkv, G, L, D, dtype, seed=L + G)
    padt = torch.tensor(pad, device=DEV) if pad is not None else None
    check_close(q, k, list(range(Hkv))[::-1], D ** -0.5, padt)


def test_head_dim_256():
    q, k = inputs(2, 2, 2, 45, 256, torch.float32, seed=1)
    check_close(q, k, [1], 256 ** -0.5, torch.tensor([0, 4], device=DEV))


def test_deterministic_and_independent_of_the_call():
    """Same inputs -> same bits; a head's scores do not depend on the other heads or batch rows."""
    q, k = inputs(2, 3, 2, 150, 64, torch.float16, seed=7)
    pad = torch.tensor([0, 11], device=DEV)
    a = VS.vslash_scores(q, k, [0, 2], 0.125, pad)
    b = VS.vslash_scores(q, k, [0, 2], 0.125, pad)
    c = VS.vslash_scores(q[1:], k[1:], [2], 0.125, pad[1:])
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert torch.equal(x[1:, 1:], z)


def _logical_scores(col_slot, diag, pad, lr):
    """The ranking scores vslash_select builds from (col_slot, diag), in float64."""
    B, Hv, L = col_slot.shape
    padv = pad.view(B, 1).long() if pad is not None else torch.zeros(B, 1, dtype=torch.long, device=DEV)
    src = (torch.arange(L, device=DEV).view(1, L) + padv).clamp(max=L - 1)
    col = torch.gather(col_slot, 2, src.view(B, 1, L).expand(B, Hv, L))
    real = torch.arange(L, device=DEV).view(1, 1, L) < lr.view(B, 1, 1)
    col = torch.where(real, col, torch.full_like(col, -math.inf))
    diag = torch.where(real, diag, torch.full_like(diag, -math.inf))
    col[..., 0] = math.inf
    diag[..., 0] = math.inf
    return col, diag


def _check_topk(mask, score, n, tol):
    """mask selects min(n, #real) entries, each within tol of the best unselected one."""
    real = score > -math.inf
    assert int(mask.sum()) == min(n, int(real.sum()))
    assert not bool((mask & ~real).any())
    if bool((real & ~mask).any()) and bool(mask.any()):
        assert score[mask].min() >= score[real & ~mask].max() - tol


def test_vslash_select_fused_equals_torch(monkeypatch):
    B, Hkv, G, L, D = 2, 3, 2, 190, 64
    q, k = inputs(B, Hkv, G, L, D, torch.float32, seed=3)
    pad = torch.tensor([0, 23], device=DEV)
    lr = L - pad.long()
    heads, verts, slashes = [0, 1, 2], [7, 30, 1], [5, 2, 250]
    assert VS.supported(q, k)
    fused = DI.vslash_select(q, k, heads, verts, slashes, 0.125, pad, lr)
    monkeypatch.setenv("HEADPLAN_VSLASH_FUSED", "0")
    assert not VS.supported(q, k)
    plain = DI.vslash_select(q, k, heads, verts, slashes, 0.125, pad, lr)
    col, diag = _logical_scores(*DI._vslash_scores_torch(q.double(), k.double(), heads, 0.125, pad), pad, lr)
    tol = 1e-5
    for b in range(B):
        for h in range(len(heads)):
            for sel in (fused, plain):
                _check_topk(sel[0][b, h], col[b, h], verts[h], tol)
                _check_topk(sel[1][b, h], diag[b, h], slashes[h], tol)
            for i, (score, n) in enumerate(((col, verts[h]), (diag, slashes[h]))):
                srt = score[b, h].sort(descending=True).values
                if n < L and srt[n] > -math.inf and srt[n - 1] - srt[n] > tol:  # well separated: same picks
                    assert torch.equal(fused[i][b, h], plain[i][b, h])
    assert torch.equal(fused[2], plain[2])
