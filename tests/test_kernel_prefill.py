"""Triton sparse prefill (kernels/prefill.py) against the PyTorch oracle (kernels/reference.py).

On a machine without CUDA, conftest.py sets TRITON_INTERPRET=1 and these run on the CPU (fp16 and
fp32; bf16 dot is wrong in the interpreter). With CUDA, the bf16 tests at the end run too.

Tolerance: the kernel's error against the fp32 reference must be at most twice the error of the
reference computed in the inputs' precision (scores and P·V in that precision, softmax in fp32,
like the kernel) plus a small absolute term.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from headplan.kernels import patterns as P  # noqa: E402
from headplan.kernels import reference as R  # noqa: E402
from cases import ONE_OF_EACH, STREAM, STRIDED, bsp, full, skip, stream, strided, vslash  # noqa: E402

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if not CUDA and not INTERP:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from headplan.kernels import dynamic_index as DI  # noqa: E402
from headplan.kernels import prefill as K  # noqa: E402
from headplan.kernels import prefill_tiles as T  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the second precision of each case: fp32 under the interpreter (whose bf16 dot is wrong), bf16 on the GPU
# (what models run; fp32 variants only cost compile time there)
WIDE = torch.bfloat16 if CUDA else torch.float32


def lowp_ref(q, k, v, table, scale, pad, block):
    """Reference attention with scores and P·V in q's dtype (softmax in fp32)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    pos = R.logical_positions(pad, B, L, q.device)
    dyn = None
    if bool(P.is_dynamic(table).any()):
        dyn = R.build_dynamic_index(q.float(), k.float(), table.cpu() if q.device.type == "cpu" else table,
                                    scale, pad, block)
    vis = R.visible(pos, pos, table.to(q.device), block, dyn).repeat_interleave(G, dim=1)
    kk = k.repeat_interleave(G, dim=1)
    vv = v.repeat_interleave(G, dim=1)
    s = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~vis, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    den = p.sum(-1, keepdim=True)
    o = torch.matmul(p.to(q.dtype), vv).float() / torch.where(den > 0, den, torch.ones_like(den))
    return o


def rand_inputs(B, Hq, Hkv, L, D, dtype, transposed=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if transposed:  # what transformers passes: (B, L, H, D) viewed as (B, H, L, D)
        q = torch.randn(B, L, Hq, D, generator=g).to(DEV, dtype).transpose(1, 2)
        k = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dtype).transpose(1, 2)
        v = torch.randn(B, L, Hkv, D, generator=g).to(DEV, dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, L, D, generator=g).to(DEV, dtype)
        k = torch.randn(B, Hkv, L, D, generator=g).to(DEV, dtype)
        v = torch.randn(B, Hkv, L, D, generator=g).to(DEV, dtype)
    return q, k, v


def poisoned_run(q, k, v, table, scale, pad, block):
    """Run the kernel with the output buffer pre-filled with NaN (every element must be written)."""
    _check_orig = torch.empty

    def nan_empty(*a, **kw):
        t = _check_orig(*a, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    K.torch.empty = nan_empty
    try:
        return K.sparse_prefill(q, k, v, table, scale, pad=pad, block=block)
    finally:
        K.torch.empty = _check_orig


def check(rows, B=1, G=2, L=100, D=64, dtype=torch.float16, pad=None, block=64, transposed=False, seed=0,
          layer_window=0):
    Hkv = len(rows)
    q, k, v = rand_inputs(B, G * Hkv, Hkv, L, D, dtype, transposed, seed)
    table = P.make_table(rows, layer_window=layer_window)
    scale = 1.0 / math.sqrt(D)
    padt = torch.tensor(pad, dtype=torch.int64) if pad is not None else None
    out = poisoned_run(q, k, v, table, scale, padt.to(DEV) if padt is not None else None, block)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "unwritten or NaN output"
    ref = R.prefill_ref(q.float(), k.float(), v.float(), table.to(DEV), scale,
                        padt.to(DEV) if padt is not None else None, block)
    if padt is not None:
        for b in range(B):
            assert (out[b, :, :int(padt[b])] == 0).all(), "padded rows must be zero"
    err = (out.float() - ref).abs().max().item()
    lp = lowp_ref(q, k, v, table, scale, padt.to(DEV) if padt is not None else None, block)
    base = (lp - ref).abs().max().item()
    assert err <= 2 * base + ATOL[dtype], f"err {err:.3g} vs same-precision reference {base:.3g}"
    return err


@pytest.mark.parametrize("dtype", [torch.float16, WIDE])
@pytest.mark.parametrize("row", list(ONE_OF_EACH.values()), ids=list(ONE_OF_EACH))
def test_each_kind(row, dtype):
    check([row, row], G=2, L=129, dtype=dtype, block=32)


@pytest.mark.parametrize("G,L", [(1, 1), (2, 37), (3, 100), (4, 200), (8, 129)])
def test_mixed_gqa_lengths(G, L):
    check(list(ONE_OF_EACH.values()), G=G, L=L, block=32)


@pytest.mark.parametrize("lwin", [1, 37, 64])
def test_layer_window_bounds_every_kind(lwin):
    """A sliding layer's own window (shorter than the sequence) bounds every head, dynamic ones too."""
    check(list(ONE_OF_EACH.values()), B=2, G=2, L=150, pad=[0, 19], block=32, layer_window=lwin)


def test_mqa_padding_batch():
    check([stream(1, 5, 0.5)], B=3, G=4, L=150, pad=[0, 17, 149], block=32)


def test_padding_dynamic_and_static():
    rows = [full(), bsp(2), vslash(20, 4), STREAM]
    check(rows, B=2, G=2, L=200, pad=[5, 71], block=32)


def test_head_dim_128_transposed_fp32():
    check([full(), STREAM], G=2, L=100, D=128, dtype=WIDE, transposed=True, pad=None)


def test_head_dim_256():
    check([STRIDED, full()], G=1, L=70, D=256, block=16)


def test_block_not_aligned_with_tiles():
    # pattern block 48 does not divide the tiles: the kernel gathers the block selection per element
    check([bsp(2), strided(0, 3, stride=2, offset=0)], G=2, L=250, block=48, pad=[0], dtype=WIDE)


def test_degenerate_windows():
    rows = [stream(0, 0, 0.0),  # sees nothing -> zeros
            stream(300, 0),  # sink covers everything
            stream(0, 1, 1.5),  # window grows faster than n
            strided(0, 0, stride=1, offset=0)]  # shard = everything
    check(rows, B=2, G=1, L=90, pad=[0, 33], block=16)


# ---------------------------------------------------------------------------------------------
# host-side pieces: dynamic indices identical to the reference, tile lists tight and safe
# ---------------------------------------------------------------------------------------------

def test_dynamic_indices_match_reference():
    B, Hkv, G, L, D, block = 2, 3, 2, 190, 64, 32
    q, k, _ = rand_inputs(B, Hkv * G, Hkv, L, D, torch.float32, seed=3)
    pad = torch.tensor([0, 23], device=DEV)
    lr = L - pad.long()
    topks = [1, 3, 0]
    sel = DI.block_select(q, k, [0, 1, 2], topks, pad, lr, block)
    verts, slashes = [7, 30, 1], [5, 2, 250]
    cm, om, cols = DI.vslash_select(q, k, [0, 1, 2], verts, slashes, 0.125, pad, lr)
    for b in range(B):
        p = int(pad[b])
        for h in range(Hkv):
            qq, kk = q[b, h * G:(h + 1) * G, p:], k[b, h, p:]
            idx = P.build_block_index(qq, kk, topks[h], block).long()
            nb = idx.shape[0]
            ref = torch.zeros(nb, nb + 1, dtype=torch.bool, device=DEV)
            ref.scatter_(1, torch.where(idx < 0, torch.full_like(idx, nb), idx), True)
            assert torch.equal(sel[b, h, :nb, :nb], ref[:, :nb])
            c, o = P.build_vslash_index(qq, kk, verts[h], slashes[h], 0.125)
            rc = torch.zeros(L + 1, dtype=torch.bool, device=DEV)
            rc[torch.where(c < 0, torch.full_like(c, L), c).long()] = True
            ro = torch.zeros(L + 1, dtype=torch.bool, device=DEV)
            ro[torch.where(o < 0, torch.full_like(o, L), o).long()] = True
            assert torch.equal(cm[b, h], rc[:L]) and torch.equal(om[b, h], ro[:L])


@pytest.mark.parametrize("QT,BN", [(16, 32), (64, 64), (32, 16)])
@pytest.mark.parametrize("lwin", [0, 45])
def test_static_tile_flags_exact(QT, BN, lwin):
    """Tile lists visit exactly the tiles with a visible pair, and skip the mask only where all are."""
    L, block = 300, 16
    rows = [full(), stream(5, 20, 0.3), stream(0, 2, 1.7), skip(), strided(3, 10, stride=4, offset=2, beta=0.1),
            stream(100, 0)]
    table = P.make_table(rows, layer_window=lwin)
    pad = torch.tensor([0, 45])
    lr = L - pad
    any_, all_ = T._static_flags(table.long(), L, QT, BN, lr, block, "cpu")
    pos = R.logical_positions(pad, 2, L, "cpu")
    lpos = torch.arange(L).expand(2, L)  # logical layout: row r is position r
    for b in range(2):
        lp = torch.where(lpos[b] < lr[b], lpos[b], torch.full_like(lpos[b], -1))
        vis = P.static_visible(lp.view(L, 1), lp.view(1, L), table, block)  # (H, L, L)
        NM, NN = -(-L // QT), -(-L // BN)
        vp = torch.zeros(len(rows), NM * QT, NN * BN, dtype=torch.bool)
        vp[:, :L, :L] = vis
        t = vp.view(len(rows), NM, QT, NN, BN)
        tile_any = t.any(dim=(2, 4))
        rowok = torch.zeros(NM * QT, dtype=torch.bool)
        rowok[:int(lr[b])] = True
        colok = torch.zeros(NN * BN, dtype=torch.bool)
        colok[:int(lr[b])] = True
        allv = (t | ~rowok.view(1, NM, QT, 1, 1)).all(dim=(2, 4)) & colok.view(NN, BN).all(1).view(1, 1, NN)
        allv &= rowok.view(NM, QT).any(1).view(1, NM, 1)
        assert torch.equal(any_[b], tile_any), "tile lists must be exact"
        for h, r in enumerate(rows):
            if r["kind"] == "strided" and BN > block:  # tiles across shard blocks: unmasked only where safe
                assert not (all_[b, h] & ~allv[h]).any()
            else:  # a strided head's tile inside one shard block skips the mask exactly when it is all visible
                assert torch.equal(all_[b, h], allv[h])


def test_errors():
    q = torch.randn(1, 2, 8, 48)
    with pytest.raises(ValueError, match="head_dim"):
        K.sparse_prefill(q, q, q, P.make_table([full()] * 2), 0.1)
    q = torch.randn(1, 2, 8, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtypes"):
        K.sparse_prefill(q, q, q, P.make_table([full()] * 2), 0.1)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="CUDA"):
        K.sparse_prefill(q, q, q, P.make_table([full()] * 2), 0.1)


# ---------------------------------------------------------------------------------------------
# GPU (bf16, real tile configs)
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="bf16 needs the GPU (the interpreter's bf16 dot is wrong)")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cuda_bf16(D):
    rows = [full(), stream(64, 300, 0.05), STRIDED, skip(), bsp(3), vslash(100, 40), full(), stream(4, 64)]
    check(rows, B=2, G=4, L=1500, D=D, dtype=torch.bfloat16, pad=[0, 333])
    check(rows[:4], B=1, G=3, L=777, D=D, dtype=torch.float16)
    check(rows, B=2, G=4, L=1500, D=D, dtype=torch.bfloat16, pad=[0, 333], layer_window=511)  # a sliding layer


@pytest.mark.skipif(not CUDA, reason="needs the GPU")
def test_cuda_static_plan_cached():
    rows = [full(), STREAM]
    check(rows, B=1, G=8, L=4097, D=128, dtype=torch.bfloat16)
    check(rows, B=1, G=8, L=4097, D=128, dtype=torch.bfloat16, seed=1)
