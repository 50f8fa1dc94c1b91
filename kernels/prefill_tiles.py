"""Host-side tile lists of the sparse prefill: which (query tile, KV tile) pairs each KV head visits,
and which of them need the token-exact mask. Torch ops on the device, no host synchronisation.

``any`` is exact (a tile is visited iff some pair in it is visible); ``all`` is safe (the mask is
skipped only where every pair is visible). Both honour each head's pattern and its layer's own
sliding window (column C_LWIN)."""

from __future__ import annotations

import os

import torch
import triton

from . import patterns as P

_INF_POS = 1 << 40  # "sink" of heads whose static part is plain causal


def _geometry(L, QT, BN, lr, device):
    """Broadcastable tile coordinates: rows (B,1,NM,1), cols (1,1,1,NN)."""
    NM = triton.cdiv(L, QT)
    NN = triton.cdiv(L, BN)
    q0 = (torch.arange(NM, device=device, dtype=torch.int64) * QT).view(1, 1, NM, 1)
    lr4 = lr.view(-1, 1, 1, 1)
    q1 = torch.minimum(q0 + QT - 1, lr4 - 1)
    k0 = (torch.arange(NN, device=device, dtype=torch.int64) * BN).view(1, 1, 1, NN)
    k1 = k0 + BN - 1
    return NM, NN, q0, q1, k0, k1, lr4


def _static_flags(tab64, L, QT, BN, lr, block, device):
    """(any, all) tile visibility (B, H, NM, NN) of the static part of every head's pattern.

    Dynamic heads count as causal-full here (intersected with their selection later); SKIP heads
    see nothing. Uses that the window's lower edge ``e(q) = q - W(q+1)`` is monotone in q.
    """
    NM, NN, q0, q1, k0, k1, lr4 = _geometry(L, QT, BN, lr, device)
    col = lambda c: tab64[:, c].view(1, -1, 1, 1)  # noqa: E731
    kind = col(P.C_KIND)
    local = (kind == P.STREAMING) | (kind == P.STRIDED)
    sink = torch.where(local, col(P.C_SINK), torch.full_like(kind, _INF_POS))
    alpha, beta = col(P.C_ALPHA), col(P.C_BETA)
    lw = col(P.C_LWIN)  # the layer's own sliding window bounds every head (0 = none)
    lwb = torch.where(lw > 0, lw, torch.full_like(lw, _INF_POS))

    def e(q):  # lower edge of what row q sees through the window (monotone in q)
        return q - torch.minimum(P.window(alpha, beta, q + 1), lwb)

    qa = torch.maximum(q0, k0)
    exists = qa <= q1
    # any: some row q >= k0 sees a column of the tile: a sink column inside the layer's window (the
    # nearest pair is row qa with the last sink column), or min(k1, q) > e(q)
    kink = torch.minimum(torch.maximum(k1, qa), q1)
    best = None
    for qq in (qa, q1, kink):
        f = torch.minimum(k1, qq) - e(qq)
        best = f if best is None else torch.maximum(best, f)
    sink_any = (k0 < sink) & (qa - torch.minimum(k1, sink - 1) < lwb)
    any_ = exists & (sink_any | (best > 0))
    all_ = (k1 <= q0) & (k1 < lr4) & ((k1 < sink) | (torch.maximum(e(q0), e(q1)) < torch.maximum(k0, sink)))
    all_ = all_ & (q1 - k0 < lwb)
    strided = kind == P.STRIDED
    stride = col(P.C_STRIDE).clamp(min=1)
    off = col(P.C_OFFSET)
    b0 = torch.div(k0, block, rounding_mode="floor")
    bstar = b0 + torch.remainder(off - b0, stride)
    kstart = torch.maximum(bstar * block, k0)
    khi = torch.minimum(k1, q1)
    b1 = torch.div(khi, block, rounding_mode="floor")
    klast = torch.minimum(khi, (b1 - torch.remainder(b1 - off, stride)) * block + block - 1)  # last shard key
    shard_any = strided & (off >= 0) & (off < stride) & (kstart <= khi) & (q0 <= q1) & (q0 - klast < lwb)
    any_ = any_ | shard_any
    if block % BN == 0:
        # a tile inside one shard block, entirely below every row's diagonal and inside the layer's window, is
        # seen whole by every row: no mask (before, only tiles the streaming part covers skipped it)
        shard_all = strided & (torch.remainder(b0, stride) == off) & (k1 <= q0) & (k1 < lr4) & (q1 - k0 < lwb)
        all_ = all_ | shard_all
    skip = kind == P.SKIP
    any_ = any_ & ~skip
    all_ = all_ & ~skip & exists
    return any_, all_


def _rect_flags(sel, L, QT, BN, lr, block):
    """(any, all) over each tile's rectangle of pattern blocks; sel (B, H, NB, NB) bool."""
    if block % QT == 0 and block % BN == 0 and os.environ.get("HEADPLAN_RECT_GENERAL") != "1":
        # every tile lies inside one pattern block: its rectangle is one entry of sel (no prefix sums)
        NM, NN = triton.cdiv(L, QT), triton.cdiv(L, BN)
        r = sel.repeat_interleave(block // QT, dim=2)[:, :, :NM] if block != QT else sel[:, :, :NM]
        r = r.repeat_interleave(block // BN, dim=3)[..., :NN] if block != BN else r[..., :NN]
        return r, r
    device = sel.device
    NM, NN, q0, q1, k0, k1, lr4 = _geometry(L, QT, BN, lr, device)
    NB = sel.shape[-1]
    ps = torch.zeros(sel.shape[0], sel.shape[1], NB + 1, NB + 1, dtype=torch.int32, device=device)
    ps[:, :, 1:, 1:] = sel.to(torch.int32).cumsum(2).cumsum(3)
    qb0 = torch.div(q0, block, rounding_mode="floor").clamp(max=NB - 1).expand(sel.shape[0], 1, NM, 1)
    qb1 = torch.div(torch.maximum(q1, q0), block, rounding_mode="floor").clamp(max=NB - 1).expand(sel.shape[0], 1, NM, 1)
    kb0 = torch.div(k0, block, rounding_mode="floor").clamp(max=NB - 1)
    kb1 = torch.div(torch.minimum(k1, torch.full_like(k1, L - 1)), block, rounding_mode="floor").clamp(max=NB - 1)
    H = sel.shape[1]
    flat = ps.view(sel.shape[0], H, -1)

    def at(r, c):
        idx = (r * (NB + 1) + c).expand(sel.shape[0], H, NM, NN).reshape(sel.shape[0], H, -1)
        return torch.gather(flat, 2, idx).view(sel.shape[0], H, NM, NN)

    cnt = at(qb1 + 1, kb1 + 1) - at(qb0, kb1 + 1) - at(qb1 + 1, kb0) + at(qb0, kb0)
    area = (qb1 - qb0 + 1) * (kb1 - kb0 + 1)
    return cnt > 0, cnt == area


def _compact(any_, all_):
    """Per (b, h, m): tile list [unmasked..., masked...] (int32) and counts (…, 2) int32."""
    NN = any_.shape[-1]
    n = torch.arange(NN, device=any_.device, dtype=torch.int64)
    key = torch.where(all_, n, torch.where(any_, n + NN, n + 2 * NN))
    lst = torch.remainder(key.sort(dim=-1).values, NN).to(torch.int32)
    cu = all_.sum(-1)
    cm = (any_ & ~all_).sum(-1)
    return lst.contiguous(), torch.stack([cu, cm], -1).to(torch.int32).contiguous()


def _vslash_flags(cmask, omask, cols, L, QT, BN, lr, nslash_max):
    dev = cmask.device
    B, Hv, _ = cmask.shape
    NM, NN, q0, q1, k0, k1, lr4 = _geometry(L, QT, BN, lr, dev)
    pos = torch.arange(L, device=dev)
    S = max(1, min(nslash_max, L))
    offs = torch.where(omask, pos, torch.full_like(pos, L + QT + 1)).sort(dim=-1).values[..., :S]  # (B,Hv,S)
    q0v = q0.view(1, 1, NM, 1)
    q1v = q1.view(B, 1, NM, 1)
    o = offs.view(B, Hv, 1, S)
    lo = (q0v - o).clamp(min=0)
    hi = q1v - o
    T = (QT + BN - 1) // BN + 1
    slash = torch.zeros(B, Hv, NM, NN + 1, dtype=torch.bool, device=dev)
    nlo = torch.div(lo, BN, rounding_mode="floor")
    nhi = torch.div(hi, BN, rounding_mode="floor")
    for t in range(T):
        n = nlo + t
        ok = (hi >= 0) & (n <= nhi) & (lo <= hi)
        slash.scatter_(3, torch.where(ok, n, torch.full_like(n, NN)).expand(B, Hv, NM, S), True)
    slash = slash[..., :NN]
    # vertical columns not inside a slash tile of this query tile
    V = cols.shape[-1]
    c = cols.view(B, Hv, 1, V)
    cvalid = c < L
    ctile = torch.div(c, BN, rounding_mode="floor").clamp(max=NN - 1).expand(B, Hv, NM, V)
    in_slash = torch.gather(slash, 3, ctile)
    cand = cvalid & (c <= q1v) & ~in_slash
    r = torch.arange(V, device=dev)
    key = torch.where(cand, r, r + V).sort(dim=-1).values
    glist = torch.gather(c.expand(B, Hv, NM, V), 3, torch.remainder(key, V))
    gcnt = cand.sum(-1)
    return slash, glist, gcnt
