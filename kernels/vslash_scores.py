"""Fused VSLASH scores: the column and diagonal sums of the last-query softmax that
:func:`kernels.dynamic_index.vslash_select` ranks, without materialising the (G, m, L) scores.

For each (batch, listed KV head), with m = min(LAST_Q, L) last query rows and the hidden mask of
``dynamic_index._vslash_scores_torch`` (logical column < 0, column > row, logical row < 0):
  col_slot[j] = sum over the G query heads and the m rows of p[g, i, j]   (slot columns)
  diag[d]     = sum of the same p over visible entries with i - j = d      (slot offsets)

Two passes over key tiles of BN columns, scores recomputed in each (fp32 accumulation):
  1. ``_stats_kernel``: per (b, head, query head, chunk of TPC tiles) the row max and sum of exp2;
     ``_lse_kernel`` combines the chunks into a per-row log2-sum-exp (tiny).
  2. ``_probs_kernel``: per (b, head, key tile) the probabilities summed over G, (m, BN); column sums
     are stored directly; the tile's m + BN - 1 diagonal sums are formed by writing the tile to a
     private scratch slot and reading it back skewed, and go to W / BN planes (each entry written
     by one tile) that torch adds.
Fixed reduction orders and no atomics: the result is bitwise deterministic, and a head's scores do
not depend on which other heads or batch rows are in the call. The scratch is B * Hv * L * 64 fp32
(64 MB for 8 heads at 32K), far below the (G, m, L) scores of the torch path.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import patterns as P
from ._triton import device_ints, interpret

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BN keys per tile, TPC tiles per pass-1 program, num_warps, num_stages) per head_dim on the GPU, the
# best of a small sweep on an H200 (32K, 8 KV heads, G=4, bf16; pass 1 + pass 2 kernel time: D=64
# 130 us, D=128 171 us, D=256 323 us); interpreter: small
_GPU_CFG = {64: (64, 8, 4, 3), 128: (128, 8, 4, 3), 256: (64, 8, 8, 2)}
_INTERP_CFG = (32, 4, 4, 1)
LOG2E = 1.0 / math.log(2.0)


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`vslash_scores` serves q (B, Hq, L, D), k (B, Hkv, L, D): CUDA or the interpreter
    (which has no correct bf16 dot), one supported dtype and head_dim, ``HEADPLAN_VSLASH_FUSED`` not "0"."""
    if os.environ.get("HEADPLAN_VSLASH_FUSED", "1") == "0":
        return False
    if not (q.is_cuda or interpret()):
        return False
    if interpret() and q.dtype == torch.bfloat16:
        return False
    return q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and q.shape[-1] in SUPPORTED_HEAD_DIMS


@triton.jit
def _scores(q, k, i, j, pad, row_ok, qk2, PREC: tl.constexpr):
    """Scores of one (rows, key tile) block in the exp2 domain, hidden entries -inf; and the mask
    (a row with logical position < 0 has every column hidden: pad <= j <= i fails)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk2
    vis = row_ok[:, None] & (j >= pad)[None, :] & (j[None, :] <= i[:, None])
    return tl.where(vis, s, float("-inf")), vis


@triton.jit
def _program_rows(HS, PAD, bh, L, M, HV, MP: tl.constexpr, HAS_PAD: tl.constexpr):
    """Batch row, KV head, left pad, and the MP padded last-query rows (slot positions, valid mask) of
    program (b, listed head) ``bh``."""
    b = (bh // HV).to(tl.int64)
    h = tl.load(HS + bh % HV).to(tl.int64)
    pad = tl.load(PAD + b).to(tl.int32) if HAS_PAD else 0
    r = tl.arange(0, MP)
    return b, h, pad, r, L - M + r, r < M


@triton.jit
def _stats_kernel(Q, K, HS, PAD, PM, PL, sqb, sqh, sql, skb, skh, skl, L, M, HV, NT, NC, TPC, qk2,
                  G: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_PAD: tl.constexpr,
                  PREC: tl.constexpr):
    bhg = tl.program_id(0)
    c = tl.program_id(1)
    g = bhg % G
    bh = bhg // G
    b, h, pad, r, i, row_ok = _program_rows(HS, PAD, bh, L, M, HV, MP, HAS_PAD)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (h * G + g) * sqh + i.to(tl.int64)[:, None] * sql + dd[None, :],
                mask=row_ok[:, None], other=0.0)
    kb = K + b * skb + h * skh
    m_i = tl.full([MP], float("-inf"), tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    for t in range(c * TPC, tl.minimum(c * TPC + TPC, NT)):
        j = t * BN + tl.arange(0, BN)
        k = tl.load(kb + j.to(tl.int64)[:, None] * skl + dd[None, :], mask=(j < L)[:, None], other=0.0)
        s, _ = _scores(q, k, i, j, pad, row_ok, qk2, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    out = (bhg * MP + r) * NC + c
    tl.store(PM + out, m_i)
    tl.store(PL + out, l_i)


@triton.jit
def _lse_kernel(PM, PL, LSE, NC, MP: tl.constexpr, CB: tl.constexpr):
    """Per row, the log2-sum-exp of the NC chunk partials (0 for a row with nothing visible)."""
    bhg = tl.program_id(0)
    r = tl.arange(0, MP)
    rows = (bhg * MP + r).to(tl.int64)[:, None] * NC
    # elementwise over the loop, reduced after it (a reduction inside the loop trips triton 3.6's
    # thread-locality pass)
    mx2 = tl.full([MP, CB], float("-inf"), tl.float32)
    for c0 in range(0, NC, CB):
        c = c0 + tl.arange(0, CB)[None, :]
        mx2 = tl.maximum(mx2, tl.load(PM + rows + c, mask=c < NC, other=float("-inf")))
    mx = tl.max(mx2, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    acc2 = tl.zeros([MP, CB], tl.float32)
    for c0 in range(0, NC, CB):
        c = c0 + tl.arange(0, CB)[None, :]
        pm = tl.load(PM + rows + c, mask=c < NC, other=float("-inf"))
        acc2 += tl.load(PL + rows + c, mask=c < NC, other=0.0) * tl.exp2(pm - mx[:, None])
    acc = tl.sum(acc2, 1)
    tl.store(LSE + bhg * MP + r, tl.where(acc > 0, mx + tl.log2(tl.where(acc > 0, acc, 1.0)), 0.0))


@triton.jit
def _probs_kernel(Q, K, HS, PAD, LSE, COL, SCR, DP, sqb, sqh, sql, skb, skh, skl, L, M, HV, NBH, NT, qk2,
                  G: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
                  HAS_PAD: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b, h, pad, r, i, row_ok = _program_rows(HS, PAD, bh, L, M, HV, MP, HAS_PAD)
    dd = tl.arange(0, D)
    j = t * BN + tl.arange(0, BN)
    k = tl.load(K + b * skb + h * skh + j.to(tl.int64)[:, None] * skl + dd[None, :],
                mask=(j < L)[:, None], other=0.0)
    qb = Q + b * sqb + (h * G) * sqh + i.to(tl.int64)[:, None] * sql + dd[None, :]
    acc = tl.zeros([MP, BN], tl.float32)
    for g in range(G):
        q = tl.load(qb + g * sqh, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + (bh * G + g) * MP + r)
        s, vis = _scores(q, k, i, j, pad, row_ok, qk2, PREC)
        acc += tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
    tl.store(COL + bh * L + j, tl.sum(acc, 0), mask=j < L)
    # diagonal sums of the tile: entry (r, c) has slot offset d = L-1-x, x = t*BN + e, e = (M-1-r) + c
    cc = tl.arange(0, BN)
    slot = SCR + (bh * NT + t).to(tl.int64) * (MP * BN)
    tl.store(slot + r[:, None] * BN + cc[None, :], acc)
    tl.debug_barrier()  # the whole tile is in the slot before any thread reads it back skewed
    e = tl.arange(0, W)
    sc = e[None, :] - (M - 1 - r)[:, None]
    y = tl.load(slot + r[:, None] * BN + sc, mask=row_ok[:, None] & (sc >= 0) & (sc < BN), other=0.0)
    # chunk e // BN of every tile goes to its own plane of DP, so each (plane, d) is written once
    x = t * BN + e
    plane = DP + (e // BN).to(tl.int64) * NBH * L + bh * L
    tl.store(plane + (L - 1 - x), tl.sum(y, 0), mask=x < L)
    if t == 0:  # plane c has no tile for x < c * BN: zeros there
        pc = tl.arange(0, W // BN)[:, None]
        xz = tl.arange(0, W)[None, :]
        tl.store(DP + pc.to(tl.int64) * NBH * L + bh * L + (L - 1 - xz), tl.zeros([W // BN, W], tl.float32),
                 mask=(xz < pc * BN) & (xz < L))


def vslash_scores(q, k, heads, scale, pad):
    """(col_slot, diag), each (B, len(heads), L) fp32, for q (B, Hq, L, D), k (B, Hkv, L, D),
    KV heads ``heads`` and left padding ``pad`` ((B,) ints or None); see the module docstring."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    Hv = len(heads)
    m = min(P.LAST_Q, L)
    BN, TPC, nw, ns = _INTERP_CFG if interpret() else _GPU_CFG[D]
    MP = max(16, triton.next_power_of_2(m))
    W = triton.next_power_of_2(MP + BN - 1)
    NT = triton.cdiv(L, BN)
    NC = triton.cdiv(NT, TPC)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    hs = device_ints(heads, dev)
    has_pad = pad is not None
    padt = pad.to(dev) if has_pad else hs  # not read without padding
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk2 = float(scale) * LOG2E
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))

    pm = torch.empty(B * Hv * G, MP, NC, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    _stats_kernel[(B * Hv * G, NC)](q, k, hs, padt, pm, pl, *strides, L, m, Hv, NT, NC, TPC, qk2,
                                    G=G, MP=MP, BN=BN, D=D, HAS_PAD=has_pad, PREC=prec, num_warps=nw,
                                    num_stages=ns)
    lse = torch.empty(B * Hv * G, MP, dtype=torch.float32, device=dev)
    _lse_kernel[(B * Hv * G,)](pm, pl, lse, NC, MP=MP, CB=min(32, triton.next_power_of_2(NC)), num_warps=4)

    col = torch.empty(B, Hv, L, dtype=torch.float32, device=dev)
    scr = torch.empty(B * Hv * NT * MP * BN, dtype=torch.float32, device=dev)
    dp = torch.empty(W // BN, B, Hv, L, dtype=torch.float32, device=dev)
    _probs_kernel[(B * Hv, NT)](q, k, hs, padt, lse, col, scr, dp, *strides, L, m, Hv, B * Hv, NT, qk2,
                                G=G, MP=MP, BN=BN, W=W, D=D, HAS_PAD=has_pad, PREC=prec,
                                num_warps=nw, num_stages=ns)
    diag = dp.sum(0)
    return col, diag
