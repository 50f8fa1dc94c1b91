"""Triton decode kernel (kernels/decode.py) against the PyTorch oracle reference.decode_ref.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernel runs on the CPU
(fp16/fp32; bf16 tl.dot is wrong in the interpreter). With CUDA the same tests run on the GPU, plus
bf16 and larger caches.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cases import full, skip, stream, strided, vslash
from headplan.kernels import patterns as P
from headplan.kernels.reference import decode_ref

triton = pytest.importorskip("triton")
from headplan.kernels.decode import sparse_decode  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
WIDE = torch.bfloat16 if CUDA else torch.float32  # fp32 in the interpreter, bf16 on GPUs


# ---------------------------------------------------------------------------------------------
# building packed caches
# ---------------------------------------------------------------------------------------------

def build_case(heads: list[dict], qpos: list[int], G: int, D: int, dtype, seed: int, holes: float = 0.05,
               gap: int = 3, layer_window: int = 0):
    """Packed cache for the given heads; every region is filled the way the runtime would fill it.

    heads: dicts with the pattern (kind, sink, alpha, beta, stride, offset) and ``cap`` (slots). A
    streaming head's region is ``sink`` slots then a ring of ``cap - sink`` slots written
    round-robin, so it holds wrapped (out of order) and stale (outside the current window)
    positions. Other heads store position i in slot i (plus random holes and one future position).
    Regions are separated by ``gap`` slots of NaN K/V that no one may read.
    """
    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(qpos), len(heads)
    caps = [0 if h["kind"] == "skip" else int(h["cap"]) for h in heads]
    offs, o = [], gap
    for c in caps:
        offs.append(o)
        o += c + gap
    S = o
    slot = torch.full((B, S), -1, dtype=torch.int32)
    for hi, (h, c, off) in enumerate(zip(heads, caps, offs)):
        for b, qp in enumerate(qpos):
            if c == 0:
                continue
            reg = torch.full((c,), -1, dtype=torch.int32)
            if h["kind"] == "streaming":
                sink = int(h.get("sink", 0))
                ring = c - sink
                for p in range(qp + 1):
                    if p < sink:
                        reg[p] = p
                    elif ring > 0:
                        reg[sink + (p - sink) % ring] = p
            else:
                n = min(c, qp + 1)
                reg[:n] = torch.arange(n, dtype=torch.int32)
                drop = torch.rand(c, generator=g) < holes
                reg[drop] = -1
                if qp + 1 < c:
                    reg[qp + 1] = qp + 1  # a future position: invisible by causality
            slot[b, off:off + c] = reg
    # slots outside every region: plausible positions, NaN data (must never be read)
    owned = torch.zeros(S, dtype=torch.bool)
    for c, off in zip(caps, offs):
        owned[off:off + c] = True
    slot[:, ~owned] = 0
    k = torch.randn(B, S, D, generator=g)
    v = torch.randn(B, S, D, generator=g)
    k[:, ~owned] = float("nan")
    v[:, ~owned] = float("nan")
    q = torch.randn(B, G * Hkv, D, generator=g)
    table = P.make_table([{kk: vv for kk, vv in h.items() if kk != "cap"} for h in heads], layer_window=layer_window)
    return dict(q=q.to(DEV, dtype), k=k.to(DEV, dtype), v=v.to(DEV, dtype), slot=slot.to(DEV),
                offs=offs, caps=caps, qpos=torch.tensor(qpos, dtype=torch.int64, device=DEV),
                table=table.to(DEV), scale=1.0 / math.sqrt(D), owned=owned)


def run_ref(c, dtype=None):
    """decode_ref on the case (optionally upcast); NaN outside the regions is never read by it."""
    q, k, v = c["q"], c["k"], c["v"]
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return decode_ref(q, k, v, c["slot"], c["offs"], c["caps"], c["qpos"], c["table"], c["scale"])


def run_kernel(c, **kw):
    out = torch.full_like(c["q"], float("nan"))  # poison: every element must be written
    res = sparse_decode(c["q"], c["k"], c["v"], c["slot"], kw.pop("offs", c["offs"]), kw.pop("caps", c["caps"]),
                        c["qpos"], c["table"], c["scale"], out=out, **kw)
    assert res.data_ptr() == out.data_ptr()
    return out


def check(out, c, ref32=None, ref_same=None):
    dtype = c["q"].dtype
    assert out.dtype == dtype and out.shape == c["q"].shape
    assert torch.isfinite(out).all(), "unwritten or NaN outputs"
    ref32 = run_ref(c, torch.float32) if ref32 is None else ref32
    ref_same = run_ref(c) if ref_same is None else ref_same
    err = (out.float() - ref32).abs().max().item()
    err_ref = (ref_same.float() - ref32).abs().max().item()
    assert err <= 2 * err_ref + ATOL[dtype], f"kernel err {err:.3e} vs same-precision ref err {err_ref:.3e}"
    if os.environ.get("DECODE_TEST_VERBOSE"):
        print(f"[{dtype}] kernel err {err:.3e}  same-precision ref err {err_ref:.3e}")
    return err


def mixed_heads(n_full=160, sink=4, ring=40):
    """One head of every kind of the tests' registry (the streaming one with an elastic window smaller
    than its ring, so stale entries exist), plus a pure ring with no sink."""
    from cases import ONE_OF_EACH

    heads = []
    for kind, row in ONE_OF_EACH.items():
        if kind == "streaming":
            heads.append(stream(sink, 20, 0.05, cap=sink + ring))
        else:
            heads.append(dict(row, cap=0 if kind == "skip" else n_full))
    return heads + [stream(0, 9, 0.0, cap=16)]


# ---------------------------------------------------------------------------------------------
# the oracle itself
# ---------------------------------------------------------------------------------------------

def test_reference_visibility_bruteforce():
    """decode_ref's masking matches a per-slot reading of the pattern definitions."""
    heads = mixed_heads(n_full=70, ring=20)
    qpos = [69, 41, 2]
    c = build_case(heads, qpos, G=2, D=16, dtype=torch.float32, seed=1)
    q, k, v, slot = c["q"].cpu().double(), c["k"].cpu().double(), c["v"].cpu().double(), c["slot"].cpu()
    expect = torch.zeros_like(q)
    for h, (row, off, cap) in enumerate(zip(heads, c["offs"], c["caps"])):
        for b, qp in enumerate(qpos):
            idx = []
            for s in range(off, off + cap):
                p = int(slot[b, s])
                if p < 0 or p > qp:
                    continue
                kind = row["kind"]
                w = int(row.get("alpha", 0)) + (round(row.get("beta", 0.0) * P.BETA_SCALE) * (qp + 1)) // P.BETA_SCALE
                local = p < int(row.get("sink", 0)) or qp - p < w
                if kind == "skip":
                    continue
                if kind == "streaming" and not local:
                    continue
                if kind == "strided" and not (local or (p // P.DEFAULT_BLOCK) % row["stride"] == row["offset"]):
                    continue
                idx.append(s)
            if not idx:
                continue
            for gq in range(h * 2, h * 2 + 2):
                sc = (k[b, idx] @ q[b, gq]) * c["scale"]
                expect[b, gq] = torch.softmax(sc, 0) @ v[b, idx]
    ref = run_ref(c).cpu().double()
    assert (ref - expect).abs().max() < 1e-5
    # the streaming region really is out of order and holds stale positions
    sl = slot[0, c["offs"][1]:c["offs"][1] + c["caps"][1]]
    assert not bool((sl[1:] >= sl[:-1]).all())


# ---------------------------------------------------------------------------------------------
# kernel vs oracle
# ---------------------------------------------------------------------------------------------

CASES = [  # (G, D, dtype, num_splits)
    (1, 64, WIDE, None),
    (2, 64, torch.float16, 4),
    (3, 64, torch.float16, None),
    (4, 64, WIDE, 3),
    (8, 64, torch.float16, 1),
    (4, 128, torch.float16, 5),
    (2, 128, WIDE, None),
]


@pytest.mark.parametrize("G,D,dtype,num_splits", CASES)
def test_decode_mixed_kinds(G, D, dtype, num_splits):
    heads = mixed_heads()
    gen = torch.Generator().manual_seed(G * 1000 + D)
    order = torch.randperm(len(heads), generator=gen).tolist()
    heads = [heads[i] for i in order]
    qpos = [159, 97, 5]  # different positions per row; row 2 is shorter than the sink+window
    c = build_case(heads, qpos, G, D, dtype, seed=G * 7 + D)
    out = run_kernel(c, num_splits=num_splits, config=dict(order="hb" if G % 2 else "bh"))
    check(out, c)
    skip = [h for h, r in enumerate(heads) if r["kind"] == "skip"]
    for h in skip:
        assert bool((out[:, h * G:(h + 1) * G] == 0).all())


@pytest.mark.parametrize("lwin", [1, 30, 100])
def test_decode_layer_window_bounds_every_head(lwin):
    """In a sliding layer, slots older than the layer's window are invisible to every head (full heads
    here still hold every position, so the kernel itself must apply the window)."""
    c = build_case(mixed_heads(), [159, 97, 5], 2, 64, torch.float16, seed=5, layer_window=lwin)
    check(run_kernel(c, num_splits=3), c)
    qp = 159
    c1 = build_case([full(cap=160)], [qp], 1, 64, torch.float32, seed=6, holes=0.0, layer_window=lwin)
    ref = run_ref(c1).cpu().double()
    idx = [s for s in range(c1["offs"][0], c1["offs"][0] + 160) if 0 <= int(c1["slot"][0, s]) <= qp
           and qp - int(c1["slot"][0, s]) < lwin]
    k, v, q = c1["k"].cpu().double(), c1["v"].cpu().double(), c1["q"].cpu().double()
    expect = torch.softmax((k[0, idx] @ q[0, 0]) * c1["scale"], 0) @ v[0, idx]
    assert (ref[0, 0] - expect).abs().max() < 1e-6


def test_decode_head_dim_256():
    heads = [full(cap=70), stream(3, 10, 0.1, cap=25)]
    c = build_case(heads, [69, 30], G=4, D=256, dtype=torch.float16, seed=3)
    check(run_kernel(c, num_splits=2), c)


def test_decode_device_args_hint_and_splits_agree():
    """head_off/head_cap as device int32 tensors (+max_cap hint) give the same bits as python lists;
    different split counts agree to rounding."""
    heads = mixed_heads(n_full=130)
    c = build_case(heads, [129, 64], G=2, D=64, dtype=torch.float16, seed=11)
    a = run_kernel(c, num_splits=3)
    offs_t = torch.tensor(c["offs"], dtype=torch.int32, device=DEV)
    caps_t = torch.tensor(c["caps"], dtype=torch.int32, device=DEV)
    b = run_kernel(c, offs=offs_t, caps=caps_t, max_cap=max(c["caps"]), num_splits=3)
    assert torch.equal(a, b)
    d = run_kernel(c, offs=offs_t, caps=caps_t)  # device tensors, no hint: still no host sync needed
    check(d, c)
    e = run_kernel(c, num_splits=1)
    check(e, c)
    for order in ("bh", "hb"):  # grid orders: same pieces, same bits
        assert torch.equal(a, run_kernel(c, num_splits=3, config=dict(order=order)))


def test_decode_valid_len_skips_tail():
    """Slots past valid_len are not read: they hold NaN data (the oracle sees finite copies)."""
    heads = [full(cap=120), stream(2, 30, 0.0, cap=34), vslash(2, 2, cap=120)]
    qpos = [80, 33]
    c = build_case(heads, qpos, G=4, D=64, dtype=torch.float16, seed=5, holes=0.0)
    vlen = torch.tensor([[81, 34, 81], [34, 34, 34]], dtype=torch.int32, device=DEV)
    ref32, ref_same = run_ref(c, torch.float32), run_ref(c)
    k, v = c["k"].clone(), c["v"].clone()
    for b in range(2):
        for h in (0, 2):
            lo = c["offs"][h] + int(vlen[b, h])
            c["slot"][b, lo:c["offs"][h] + c["caps"][h]] = -1
            k[b, lo:c["offs"][h] + c["caps"][h]] = float("nan")
            v[b, lo:c["offs"][h] + c["caps"][h]] = float("nan")
    c2 = dict(c, k=k, v=v)
    out = run_kernel(c2, valid_len=vlen, num_splits=2)
    check(out, c2, ref32=ref32, ref_same=ref_same)


def test_decode_padding_row_and_all_skip():
    heads = [skip(cap=0), full(cap=40)]
    c = build_case(heads, [39, -1], G=2, D=64, dtype=torch.float32, seed=2)
    out = run_kernel(c)
    check(out, c)
    assert bool((out[1] == 0).all()) and bool((out[:, :2] == 0).all())
    heads = [skip(cap=0)] * 2
    c = build_case(heads, [10], G=3, D=64, dtype=torch.float16, seed=2)
    assert bool((run_kernel(c) == 0).all())


def test_decode_errors(monkeypatch):
    heads = [full(cap=8)]
    c = build_case(heads, [7], G=2, D=64, dtype=torch.float16, seed=0)
    args = lambda cc: (cc["q"], cc["k"], cc["v"], cc["slot"], cc["offs"], cc["caps"], cc["qpos"],  # noqa: E731
                       cc["table"], cc["scale"])
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode(*args(dict(c, q=c["q"].to(torch.float64), k=c["k"].double(), v=c["v"].double())))
    c96 = build_case(heads, [7], G=2, D=96, dtype=torch.float16, seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_decode(*args(c96))
    c2 = build_case(heads * 2, [7], G=2, D=64, dtype=torch.float16, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode(*args(dict(c2, q=c2["q"][:, :3])))
    cpu = {kk: (vv.cpu() if isinstance(vv, torch.Tensor) else vv) for kk, vv in c.items()}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        sparse_decode(*args(cpu))


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 and realistic sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="bf16 and large caches need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,D", [(4, 128), (8, 64), (3, 256)])
def test_decode_cuda_large(dtype, G, D):
    n = 3000
    heads = [full(cap=n), stream(64, 300, 0.1, cap=64 + 700), strided(16, 64, stride=4, offset=2, beta=0.0, cap=n),
             skip(cap=0), stream(128, 1000, 0.0, cap=128 + 1000)]
    c = build_case(heads, [2999, 1700, 400, 10], G, D, dtype, seed=G + D)
    for ns in (None, 1, 7):
        check(run_kernel(c, num_splits=ns), c)
    vlen = torch.tensor([[3000, 764, 3000, 0, 1128], [1701, 764, 1701, 0, 1128], [401, 764, 401, 0, 1128],
                         [11, 764, 11, 0, 1128]], dtype=torch.int32, device=DEV)
    check(run_kernel(c, valid_len=vlen), c)
