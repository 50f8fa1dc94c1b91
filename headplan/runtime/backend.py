"""Pick the implementation for each hot path: Triton kernels on CUDA, the PyTorch reference elsewhere.

Both give the same result up to dtype tolerance; the reference is exact in fp32 on the CPU.
Set ``HEADPLAN_BACKEND=reference`` to force the reference everywhere. This module is the only reader
of that variable and the only place in the runtime that picks a kernel.
"""

from __future__ import annotations

import os

import torch

from ..kernels import reference as R

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_SUPPORTED_DIMS = (64, 128, 256)


def _reference_forced() -> bool:
    return os.environ.get("HEADPLAN_BACKEND", "auto") == "reference"


def _use_triton(x: torch.Tensor) -> bool:
    if _reference_forced():
        return False
    return x.is_cuda and x.dtype in _SUPPORTED_DTYPES and x.shape[-1] in _SUPPORTED_DIMS


def _kernel(name: str):
    try:
        if name == "prefill":
            from ..kernels.prefill import sparse_prefill as fn
        else:
            from ..kernels.decode import sparse_decode as fn
    except ImportError:
        return None
    return fn


def prefill(q, k, v, table, scale: float, pad=None, block: int = 64):
    """Self-attention prefill from an empty cache (q, k, v cover the same left-padded slots)."""
    if _use_triton(q):
        fn = _kernel("prefill")
        if fn is not None:
            return fn(q, k, v, table, scale, pad=pad, block=block)
    # the reference's visibility, attention fused by SDPA (set HEADPLAN_BACKEND=reference for the explicit oracle)
    return R.prefill_ref(q, k, v, table, scale, pad=pad, block=block,
                         fused=not _reference_forced())


def decode(q, k_buf, v_buf, slot_pos, head_off, head_cap, qpos, table, scale: float, valid_len=None,
           max_cap: int | None = None):
    """One new token per sequence against the packed per-head cache.

    valid_len (B, Hkv), optional: slots of a head at or past it are known empty (not read).
    """
    if _use_triton(q):
        fn = _kernel("decode")
        if fn is not None:
            return fn(q, k_buf, v_buf, slot_pos, head_off, head_cap, qpos, table, scale, valid_len=valid_len,
                      max_cap=max_cap)
    return R.decode_ref(q, k_buf, v_buf, slot_pos, head_off, head_cap, qpos, table, scale)


def attend(q, k, v, qpos, kpos, table, scale: float, block: int = 64):
    """General case (chunked prefill over a cache, right padding): explicit per-head positions."""
    return R.attention_ref(q, k, v, qpos, kpos, table, scale, block)


def commit_decode(k, v, k_buf, v_buf, slot_pos, n_logical, valid, head_off, head_cap, ring, sink):
    """Decode step's cache write: one token per row into every head's region (the cache layer's
    commit_one). Triton on CUDA (any dtype and head size), else the reference. Returns valid_len (B, Hkv)."""
    args = (k_buf, v_buf, slot_pos, n_logical, valid, head_off, head_cap, ring, sink)
    if k.is_cuda and not _reference_forced():
        from ..kernels.cache_ops import commit_decode as fn

        return fn(k, v, *args)
    return R.commit_decode_ref(k, v, *args)
