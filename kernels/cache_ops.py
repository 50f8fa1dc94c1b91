"""Triton kernel for the decode-step cache write: one launch stores the new token of every sequence
into every KV head's region of the packed cache (ring-buffer placement for streaming heads) and
returns the slots in use per head. Oracle: ``reference.commit_decode_ref`` (same signature)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _commit_decode_kernel(K, V, KB, VB, SP, NL, VALID, OFF, CAP, RING, SINK, VLEN,
                          stride_kb, stride_kh, stride_vb, stride_vh,
                          stride_kbb, stride_kbs, stride_vbb, stride_vbs, stride_spb,
                          H, D, HAS_VALID: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.load(NL + b).to(tl.int64)  # logical position of the new token
    if HAS_VALID:
        real = tl.load(VALID + b).to(tl.int32) != 0
    else:
        real = p >= 0
    off = tl.load(OFF + h).to(tl.int64)
    cap = tl.load(CAP + h).to(tl.int64)
    ring = tl.load(RING + h).to(tl.int64)
    sink = tl.load(SINK + h).to(tl.int64)
    ring_c = tl.maximum(ring, 1)
    rel = tl.where((ring > 0) & (p >= sink), sink + (p - sink) % ring_c, p)
    ok = real & (cap > 0) & (rel < cap)
    d = tl.arange(0, BLOCK_D)
    okv = tl.full([BLOCK_D], 0, tl.int32) + ok.to(tl.int32)
    dm = (d < D) & (okv != 0)
    slot = off + rel
    kv = tl.load(K + b * stride_kb + h * stride_kh + d, mask=dm)
    vv = tl.load(V + b * stride_vb + h * stride_vh + d, mask=dm)
    tl.store(KB + b * stride_kbb + slot * stride_kbs + d, kv.to(KB.dtype.element_ty), mask=dm)
    tl.store(VB + b * stride_vbb + slot * stride_vbs + d, vv.to(VB.dtype.element_ty), mask=dm)
    tl.store(SP + b * stride_spb + slot + d * 0, (p + d * 0).to(SP.dtype.element_ty), mask=(d < 1) & (okv != 0))
    n_after = p + real.to(tl.int64)
    vlen = tl.where(ring > 0, cap, tl.minimum(n_after, cap))
    tl.store(VLEN + b * H + h, vlen.to(tl.int32))


def commit_decode(k, v, k_buf, v_buf, slot_pos, n_logical, valid, head_off, head_cap, head_ring, head_sink):
    """Same as ``reference.commit_decode_ref``; k/v (B, Hkv, D) with a unit last stride."""
    B, H, D = k.shape
    if not (k.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("commit_decode needs CUDA tensors (or TRITON_INTERPRET=1)")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if k_buf.stride(-1) != 1 or v_buf.stride(-1) != 1 or slot_pos.stride(-1) != 1:
        raise ValueError("cache buffers must be contiguous in their last dimension")
    vlen = torch.empty(B, H, dtype=torch.int32, device=k.device)
    has_valid = valid is not None
    vflag = valid.to(torch.int8) if has_valid else n_logical
    _commit_decode_kernel[(B, H)](
        k, v, k_buf, v_buf, slot_pos, n_logical, vflag, head_off, head_cap, head_ring, head_sink, vlen,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), slot_pos.stride(0),
        H, D, HAS_VALID=has_valid, BLOCK_D=triton.next_power_of_2(D))
    return vlen
