"""Plain-PyTorch reference attention for per-head patterns (the CPU runtime and the kernels' oracle).

Shapes follow transformers: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D); query head h reads KV head
h // (Hq // Hkv). Computation is in fp32 and the result is cast to q's dtype. A query row that sees
no key (padding, a SKIP head) gets a zero output.
"""

from __future__ import annotations

import torch

from . import patterns as P


def logical_positions(pad: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
    """(B, L) logical positions for left-padded sequences: slot - pad, -1 on padding."""
    pos = torch.arange(L, device=device).expand(B, L)
    if pad is None:
        return pos.clone()
    pos = pos - pad.to(device).view(B, 1).long()
    return torch.where(pos < 0, torch.full_like(pos, -1), pos)


def build_dynamic_index(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, scale: float,
                        pad: torch.Tensor | None = None, block: int = P.DEFAULT_BLOCK) -> list[dict]:
    """Per batch element, {kv_head: index} for the dynamic heads (prefill from an empty cache).

    Works on the logical (unpadded) part of each sequence, on q's device (no host sync besides
    reading the small head table).
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kinds = table[:, P.C_KIND].tolist()
    out = []
    for b in range(B):
        p = int(pad[b]) if pad is not None else 0
        d = {}
        for h, kind in enumerate(kinds):
            if kind == P.BLOCKSPARSE:
                d[h] = P.build_block_index(q[b, h * G:(h + 1) * G, p:], k[b, h, p:], int(table[h, P.C_TOPK]), block)
            elif kind == P.VSLASH:
                d[h] = P.build_vslash_index(q[b, h * G:(h + 1) * G, p:], k[b, h, p:], int(table[h, P.C_VERT]),
                                            int(table[h, P.C_SLASH]), scale)
        out.append(d)
    return out


def visible(qpos: torch.Tensor, kpos: torch.Tensor, table: torch.Tensor, block: int = P.DEFAULT_BLOCK,
            dyn_index: list[dict] | None = None) -> torch.Tensor:
    """(B, Hkv, Lq, Lk) visibility. qpos (B, Lq); kpos (B, Lk) or (B, Hkv, Lk)."""
    q4 = qpos[:, None, :, None]
    k4 = kpos[:, None, None, :] if kpos.dim() == 2 else kpos[:, :, None, :]
    vis = P.static_visible(q4, k4, table, block)
    if dyn_index is not None:
        vis = vis.clone()
        for b, d in enumerate(dyn_index):
            for h, idx in d.items():
                kp = kpos[b] if kpos.dim() == 2 else kpos[b, h]
                q1, k1 = qpos[b][:, None], kp[None, :]
                vis[b, h] = P.dynamic_visible(q1, k1, int(table[h, P.C_KIND]), idx, block) \
                    & P.in_layer_window(q1, k1, int(table[h, P.C_LWIN]))
    return vis


def attention_ref(q, k, v, qpos, kpos, table, scale: float, block: int = P.DEFAULT_BLOCK,
                  dyn_index: list[dict] | None = None, chunk: int = 1024, fused: bool = False) -> torch.Tensor:
    """Masked attention with explicit per-head visibility; returns (B, Hq, Lq, D) in q.dtype.

    fused: compute each chunk with ``torch.nn.functional.scaled_dot_product_attention`` under the same
    boolean mask (faster on the CPU); rows that see no key (skip heads, padding) give 0 on both paths."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    out = torch.empty(B, Hq, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, Lq, chunk):
        e = min(Lq, s + chunk)
        vis = visible(qpos[:, s:e], kpos, table, block, dyn_index)
        vis = vis.repeat_interleave(G, dim=1)  # (B, Hq, l, Lk)
        if fused:
            seen = vis.any(-1, keepdim=True)  # an empty row attends to everything, then is zeroed
            o = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e].float(), kf, vf,
                                                                 attn_mask=vis | ~seen, scale=scale)
            out[:, :, s:e] = o.masked_fill(~seen, 0.0).to(q.dtype)
            continue
        sc = torch.matmul(q[:, :, s:e].float(), kf.transpose(-1, -2)) * scale
        sc = sc.masked_fill(~vis, float("-inf"))
        mx = sc.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(sc - mx)
        den = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vf) / torch.where(den > 0, den, torch.ones_like(den))
        out[:, :, s:e] = o.to(q.dtype)
    return out


def prefill_ref(q, k, v, table, scale: float, pad: torch.Tensor | None = None, block: int = P.DEFAULT_BLOCK,
                fused: bool = False) -> torch.Tensor:
    """Self-attention prefill from an empty cache: q, k, v cover the same (left-padded) slots.

    This is the oracle for the Triton prefill kernel: same signature, same result.
    """
    B, _, L, _ = q.shape
    pos = logical_positions(pad, B, L, q.device)
    dyn = None
    if bool(P.is_dynamic(table).any()):
        dyn = build_dynamic_index(q, k, table, scale, pad, block)
    return attention_ref(q, k, v, pos, pos, table, scale, block, dyn, fused=fused)


def decode_ref(q, k_buf, v_buf, slot_pos, head_off, head_cap, qpos, table, scale: float) -> torch.Tensor:
    """One new token per sequence against a packed per-head cache (the decode kernel's oracle).

    q: (B, Hq, D). k_buf/v_buf: (B, S, D): KV head h owns slots [head_off[h], head_off[h] + head_cap[h]).
    slot_pos: (B, S) int logical position held by each slot (-1 = empty). qpos: (B,) position of the
    new token (its own K/V must already be written). Dynamic heads count as full here.
    Returns (B, Hq, D) in q.dtype.
    """
    B, Hq, D = q.shape
    Hkv = table.shape[0]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, v_buf.shape[-1], dtype=q.dtype, device=q.device)
    for h in range(Hkv):
        o, c = int(head_off[h]), int(head_cap[h])
        if c == 0:
            continue
        kp = slot_pos[:, o:o + c].long()  # (B, c)
        vis = P.static_visible(qpos.long().view(B, 1, 1, 1), kp[:, None, None, :], table[h:h + 1])[:, 0, 0]  # (B, c)
        sc = torch.einsum("bgd,bcd->bgc", q[:, h * G:(h + 1) * G].float(), k_buf[:, o:o + c].float()) * scale
        sc = sc.masked_fill(~vis[:, None, :], float("-inf"))
        mx = sc.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(sc - mx)
        den = p.sum(-1, keepdim=True)
        oo = torch.einsum("bgc,bcd->bgd", p, v_buf[:, o:o + c].float()) / torch.where(den > 0, den, torch.ones_like(den))
        out[:, h * G:(h + 1) * G] = oo.to(q.dtype)
    return out


def commit_decode_ref(k, v, k_buf, v_buf, slot_pos, n_logical, valid, head_off, head_cap, head_ring, head_sink):
    """Write one new token per sequence into the packed per-head cache (the commit kernel's oracle).

    k, v: (B, Hkv, D) new keys/values. n_logical: (B,) tokens already stored (= the new token's logical
    position). valid: (B,) bool or None (None = all real). head_off/cap/ring/sink: (Hkv,) int tensors.
    A streaming head (ring > 0) stores position p >= sink at slot sink + (p - sink) % ring of its region;
    other heads at slot p; skip heads (cap 0) store nothing. Returns valid_len (B, Hkv) int32: slots in
    use after the write (ring heads: their whole capacity). Buffers are updated in place.
    """
    B, H, D = k.shape
    dev = k.device
    p = n_logical.long().view(B, 1)
    off, cap = head_off.long().view(1, H), head_cap.long().view(1, H)
    ring, sink = head_ring.long().view(1, H), head_sink.long().view(1, H)
    ok_row = torch.ones(B, 1, dtype=torch.bool, device=dev) if valid is None else valid.view(B, 1).bool()
    rel = torch.where((ring > 0) & (p >= sink), sink + torch.remainder(p - sink, ring.clamp(min=1)), p)
    ok = ok_row & (cap > 0) & (rel < cap)
    b_idx, h_idx = ok.nonzero(as_tuple=True)
    slot = (off + rel)[b_idx, h_idx]
    k_buf[b_idx, slot] = k[b_idx, h_idx].to(k_buf.dtype)
    v_buf[b_idx, slot] = v[b_idx, h_idx].to(v_buf.dtype)
    slot_pos[b_idx, slot] = p.expand(B, H)[b_idx, h_idx].to(slot_pos.dtype)
    n_after = p + ok_row.long()
    return torch.where(ring > 0, cap, torch.minimum(n_after, cap)).to(torch.int32)
