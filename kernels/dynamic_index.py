"""Dynamic indices of the sparse prefill (BLOCKSPARSE block selections, VSLASH columns and
diagonals), vectorised over batch and heads, with the same definitions as
``patterns.build_block_index`` / ``patterns.build_vslash_index``."""

from __future__ import annotations

import math

import torch
import triton

from . import patterns as P
from . import vslash_scores as _fused
from ._triton import device_ints


def _logical(x, pad, L):
    """x (B, H, L, D) slot layout -> logical layout (zeros after the real tokens)."""
    if pad is None:
        return x
    B = x.shape[0]
    idx = torch.arange(L, device=x.device).view(1, L) + pad.view(B, 1).long()
    ok = idx < L
    idx = idx.clamp(max=L - 1)
    y = torch.gather(x, 2, idx.view(B, 1, L, 1).expand(B, x.shape[1], L, x.shape[3]))
    return y * ok.view(B, 1, L, 1).to(y.dtype)


def block_select(q, k, heads, topks, pad, lr, block):
    """Selected blocks sel (B, len(heads), NB, NB) bool, as build_block_index defines them.

    q (B, Hq, L, D), k (B, Hkv, L, D); heads: list of KV heads; topks: their topk values.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    NB = triton.cdiv(L, block)
    hs = device_ints(heads, dev)
    Hb = len(heads)
    if heads == list(range(Hkv)):  # no copy of q/k when every head is dynamic
        qg, kg = q.reshape(B, Hkv, G, L, D), k
    else:
        qg, kg = q.reshape(B, Hkv, G, L, D)[:, hs], k[:, hs]
    if pad is not None:
        qg = _logical(qg.reshape(B, Hb * G, L, D), pad, L).view(B, Hb, G, L, D)
        kg = _logical(kg, pad, L)
    padn = NB * block - L
    if padn:
        qg = torch.nn.functional.pad(qg, (0, 0, 0, padn))
        kg = torch.nn.functional.pad(kg, (0, 0, 0, padn))
    kb = torch.arange(NB, device=dev)
    counts = (lr.view(B, 1) - kb.view(1, NB) * block).clamp(min=1, max=block).to(torch.float32)  # (B, NB)
    qbar = qg.reshape(B, Hb, G, NB, block, D).sum(dim=(2, 4), dtype=torch.float32) / (counts.view(B, 1, NB, 1) * G)
    kbar = kg.reshape(B, Hb, NB, block, D).sum(dim=3, dtype=torch.float32) / counts.view(B, 1, NB, 1)
    score = qbar @ kbar.transpose(-1, -2)  # (B, Hb, NB, NB)
    qb = kb.view(NB, 1)
    cand = (kb.view(1, NB) >= 1) & (kb.view(1, NB) < qb)
    score = torch.where(cand, score, torch.full_like(score, -math.inf))
    sel = torch.zeros(B, Hb, NB, NB + 1, dtype=torch.bool, device=dev)
    kmax = max(topks) if topks else 0
    if kmax > 0 and NB > 2:
        kk = min(kmax, NB)
        val, idx = torch.topk(score, kk, dim=-1)
        rank = torch.arange(kk, device=dev).view(1, 1, 1, kk)
        tk = device_ints(topks, dev).view(1, Hb, 1, 1)
        ok = torch.isfinite(val) & (rank < tk)
        sel.scatter_(3, torch.where(ok, idx, torch.full_like(idx, NB)), True)
    sel = sel[..., :NB]
    sel[..., 0] = True
    eye = torch.eye(NB, dtype=torch.bool, device=dev)
    sel = sel | eye
    return sel


def _vslash_scores_torch(q, k, heads, scale, pad):
    """(col_slot, diag) (B, len(heads), L) of vslash_select, in torch: for the last m = min(LAST_Q, L)
    query rows, softmax probabilities over slot columns (hidden: logical column < 0, column > row,
    logical row < 0) summed over the G query heads and the rows per slot column, and per slot offset
    i - j. Computed in fp32 (fp64 for fp64 inputs); the fallback of :mod:`kernels.vslash_scores`."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    dt = torch.promote_types(q.dtype, torch.float32)
    hs = device_ints(heads, dev)
    Hv = len(heads)
    m = min(P.LAST_Q, L)
    ql = q.reshape(B, Hkv, G, L, D)[:, hs, :, L - m:].to(dt)  # (B, Hv, G, m, D)
    kf = k[:, hs].to(dt)  # (B, Hv, L, D)
    padv = pad.view(B, 1).long() if pad is not None else torch.zeros(B, 1, dtype=torch.long, device=dev)
    i = torch.arange(L - m, L, device=dev).view(1, m) - padv  # (B, m) logical rows
    j = torch.arange(L, device=dev).view(1, L) - padv  # (B, L) logical columns
    s = torch.einsum("bhgmd,bhld->bhgml", ql, kf)  # (B, Hv, G, m, L): one batched matmul, G and m folded
    hidden = (j.view(B, 1, L) < 0) | (j.view(B, 1, L) > i.view(B, m, 1)) | (i.view(B, m, 1) < 0)  # (B, m, L)
    s.mul_(scale).masked_fill_(hidden.view(B, 1, 1, m, L), -math.inf)
    p = torch.softmax(s, dim=-1)
    del s
    p = p.masked_fill_(hidden.view(B, 1, 1, m, L), 0.0).sum(2)  # (B, Hv, m, L); all-hidden rows (NaN) -> 0
    col_slot = p.sum(2)  # (B, Hv, L) by slot
    d = (i.view(B, m, 1) - j.view(B, 1, L)).clamp(min=0, max=L - 1)  # slot_i - slot_j
    diag = torch.zeros(B, Hv, L, dtype=dt, device=dev)
    diag.scatter_add_(2, d.view(B, 1, m * L).expand(B, Hv, m * L), p.reshape(B, Hv, m * L))
    return col_slot, diag


def vslash_select(q, k, heads, verts, slashes, scale, pad, lr):
    """Vertical and slash selections for the listed KV heads, as build_vslash_index defines them.

    Returns (cmask, omask) (B, Hv, L) bool over logical columns / offsets, and the sorted column
    list cols (B, Hv, max(verts)) int64 padded with L. The scores come from the fused Triton
    kernels (:mod:`kernels.vslash_scores`) where they serve, else from ``_vslash_scores_torch``.
    """
    B, L = q.shape[0], q.shape[2]
    dev = q.device
    Hv = len(heads)
    padv = pad.view(B, 1).long() if pad is not None else torch.zeros(B, 1, dtype=torch.long, device=dev)
    if _fused.supported(q, k):
        col_slot, diag = _fused.vslash_scores(q, k, heads, scale, pad)
    else:
        col_slot, diag = _vslash_scores_torch(q, k, heads, scale, pad)
    # slot -> logical for the columns
    src = (torch.arange(L, device=dev).view(1, L) + padv).clamp(max=L - 1)
    col = torch.gather(col_slot, 2, src.view(B, 1, L).expand(B, Hv, L))
    pos = torch.arange(L, device=dev).view(1, 1, L)
    real = pos < lr.view(B, 1, 1)
    col = torch.where(real, col, torch.full_like(col, -math.inf))
    diag = torch.where(real, diag, torch.full_like(diag, -math.inf))
    col[..., 0] = math.inf
    diag[..., 0] = math.inf

    def pick(score, ns):
        nmax = max(ns)
        kk = min(nmax, L)
        out = torch.full((B, Hv, max(nmax, 1)), L, dtype=torch.int64, device=dev)
        mask = torch.zeros(B, Hv, L + 1, dtype=torch.bool, device=dev)
        if kk > 0:
            val, idx = torch.topk(score, kk, dim=-1)
            rank = torch.arange(kk, device=dev).view(1, 1, kk)
            ok = (val > -math.inf) & (rank < device_ints(ns, dev).view(1, Hv, 1))
            idx = torch.where(ok, idx, torch.full_like(idx, L))
            out[..., :kk] = idx.sort(dim=-1).values
            mask.scatter_(2, idx, True)
        return mask[..., :L], out

    cmask, cols = pick(col, verts)
    omask, _ = pick(diag, slashes)
    return cmask, omask, cols
