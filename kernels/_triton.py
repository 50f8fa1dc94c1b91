"""Shared Triton pieces of the kernels: the head-table columns by name, the window rule, the
interpreter flag. The constants come from :mod:`kernels.patterns` (the one definition), so a kernel
never spells a column index or the window grid as a literal; and the host-side helpers the kernels' launchers
share."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import patterns as P

# head-table columns and pattern kinds, as compile-time constants
C_KIND = tl.constexpr(P.C_KIND)
C_SINK = tl.constexpr(P.C_SINK)
C_ALPHA = tl.constexpr(P.C_ALPHA)
C_BETA = tl.constexpr(P.C_BETA)
C_STRIDE = tl.constexpr(P.C_STRIDE)
C_OFFSET = tl.constexpr(P.C_OFFSET)
C_LWIN = tl.constexpr(P.C_LWIN)
BETA_SCALE = tl.constexpr(P.BETA_SCALE)
K_FULL = tl.constexpr(P.FULL)
K_STREAMING = tl.constexpr(P.STREAMING)
K_STRIDED = tl.constexpr(P.STRIDED)
K_BLOCKSPARSE = tl.constexpr(P.BLOCKSPARSE)
K_VSLASH = tl.constexpr(P.VSLASH)
K_SKIP = tl.constexpr(P.SKIP)
K_SELECT = tl.constexpr(P.SELECT)  # kernels treat it as FULL: a select head sees every key its cache holds
NO_LIMIT = tl.constexpr(1 << 30)  # "no layer window": larger than any distance


_INTS: dict = {}


def device_ints(values, device) -> torch.Tensor:
    """``values`` (head lists, per-head counts) as an int32 tensor on ``device``, cached: no host-to-device copy
    per layer call."""
    key = (tuple(int(v) for v in values), str(device))
    t = _INTS.get(key)
    if t is None:
        if len(_INTS) >= 256:
            _INTS.clear()
        t = _INTS[key] = torch.tensor(key[0], dtype=torch.int32, device=device)
    return t


def interpret() -> bool:
    """True when kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def head_row(TAB, h, stride_row):
    """The parameters of KV head h's table row: kind, sink, alpha, beta_q, stride, offset, and the
    layer's own window bound (NO_LIMIT for a global layer)."""
    row = TAB + h * stride_row
    kind = tl.load(row + C_KIND)
    sink = tl.load(row + C_SINK)
    alpha = tl.load(row + C_ALPHA).to(tl.int64)
    beta = tl.load(row + C_BETA).to(tl.int64)
    stride = tl.maximum(tl.load(row + C_STRIDE), 1)
    offset = tl.load(row + C_OFFSET)
    lwin = tl.load(row + C_LWIN)
    lw = tl.where(lwin > 0, lwin, NO_LIMIT)
    return kind, sink, alpha, beta, stride, offset, lw


@triton.jit
def window(alpha, beta, n):
    """W(n) = alpha + floor(beta_q * n / BETA_SCALE) (int64), as ``patterns.window`` defines it."""
    x = beta * n
    xq = x // BETA_SCALE
    xq = tl.where((x < 0) & (xq * BETA_SCALE != x), xq - 1, xq)  # floor division, like torch
    return alpha + xq


@triton.jit
def online_update(acc, m_i, l_i, q, k, v, vis, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One flash-attention step over a K/V tile: scores, optional mask, running max/sum rescale, P@V
    (exp2 domain: ``qk_scale`` includes log2(e)). Shared by the portable and the Hopper prefill kernels."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_new, l_i
