"""Hopper (sm90) path of the sparse prefill (issue 17 item 2): the same tile lists and head table as the
portable kernel in :mod:`kernels.prefill`, with Q/K/V/O moved by the bulk tensor copy engine (TMA tensor
descriptors built on the host, 4-D over (batch, head, slot, dim) so every (batch, head) is bounded by its
own length and out-of-range rows read as zeros / are never written).

Layout: one program per (batch, KV head, query tile of ``QT`` logical positions, chunk of ``GS`` query
heads of the group); ``BM = GS * QT`` rows (``GS = 1``: one query head per program, FlashAttention-style;
``GS = G``: the portable kernel's GQA stacking). Programs of one KV group are launched next to each other
so their K/V tiles are shared through L2, heaviest (batch, KV head, query tile) first.

What it covers: FULL, STREAMING (elastic windows), STRIDED, SKIP, and BLOCKSPARSE when the tiles do not
straddle pattern blocks (``block % QT == 0 and block % BN == 0``: the tile lists are then exact and no
per-element selection is needed). VSLASH heads (single-column gathers) and block sizes that do not align
with the tiles go to the portable kernel: :func:`supported` says which. Never used under the Triton
interpreter or on a GPU other than compute capability 9.0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import patterns as P
from ._triton import K_STREAMING, K_STRIDED, head_row, online_update, window
from ._triton import interpret as _interpret

try:  # triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the portable kernel only
    TensorDescriptor = None


@triton.jit
def _unmasked_step(acc, m_i, l_i, q, kk, vv, qk_scale, dt: tl.constexpr):
    """``_triton.online_update`` for a tile every row sees whole: no mask and no empty-row guard, and the scale
    folded into the max and the exponent (one FMA per score), as the fastest loop measured on sm90 has it."""
    s = tl.dot(q, kk.T)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(dt), vv, acc)
    return acc, m_new, l_i


@triton.jit
def _hopper_prefill_kernel(DQ, DK, DV, DO, PAD, TAB, ORDER, CNT, LIST,
                           L, HKV, NM, NN, qk_scale,
                           G: tl.constexpr, GS: tl.constexpr, QT: tl.constexpr, BN: tl.constexpr,
                           D: tl.constexpr, BLOCK: tl.constexpr, NCOLS: tl.constexpr,
                           HAS_LOCAL: tl.constexpr, HAS_STRIDED: tl.constexpr, HAS_LWIN: tl.constexpr,
                           WS: tl.constexpr):
    BM: tl.constexpr = GS * QT
    NCH: tl.constexpr = G // GS
    pid = tl.program_id(0)
    idx = pid // NCH
    ch = pid % NCH
    item = tl.load(ORDER + idx)
    m = item % NM
    bh = item // NM
    h = bh % HKV
    b = bh // HKV
    pad = tl.load(PAD + b)
    Lr = L - pad
    hq0 = h * G + ch * GS
    q0 = m * QT

    rows = tl.arange(0, BM)
    qpos = q0 + rows % QT
    cols = tl.arange(0, BN)

    q = DQ.load([b, hq0, pad + q0, 0]).reshape(BM, D)
    dt = q.dtype

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)

    item64 = item.to(tl.int64)
    cu = tl.load(CNT + item64 * 2)
    cmk = tl.load(CNT + item64 * 2 + 1)
    lbase = LIST + item64 * NN

    # 1) tiles every row sees entirely: no mask (WS: the compiler's automatic warp specialisation of this loop)
    if WS:
        for i in tl.range(0, cu, warp_specialize=True):
            n = tl.load(lbase + i)
            kk = DK.load([b, h, pad + n * BN, 0]).reshape(BN, D)
            vv = DV.load([b, h, pad + n * BN, 0]).reshape(BN, D)
            acc, m_i, l_i = _unmasked_step(acc, m_i, l_i, q, kk, vv, qk_scale, dt)
    else:
        for i in range(0, cu):
            n = tl.load(lbase + i)
            kk = DK.load([b, h, pad + n * BN, 0]).reshape(BN, D)
            vv = DV.load([b, h, pad + n * BN, 0]).reshape(BN, D)
            acc, m_i, l_i = _unmasked_step(acc, m_i, l_i, q, kk, vv, qk_scale, dt)

    # 2) partially visible tiles: token-exact mask, the portable kernel's rule written as per-row bounds on
    # the distance dq = qpos - kpos (keys past the sequence only meet rows past it, whose output is never
    # stored): visible iff 0 <= dq < lo_w (window, capped by the layer's window), or kpos < sink and
    # dq < lw (sink inside the layer's window), or a strided head's shard column with dq < lw
    kind, sink, alpha_w, beta_w, stride, offset, lw = head_row(TAB, h, NCOLS)
    if HAS_LOCAL:
        local = (kind == K_STREAMING) | (kind == K_STRIDED)
        win = window(alpha_w, beta_w, (qpos + 1).to(tl.int64)).to(tl.int32)
        lo_w = tl.where(local, tl.minimum(win, lw), lw)
        sink_c = tl.where(local, sink, 0)
    for i in range(cu, cu + cmk):
        n = tl.load(lbase + i)
        kk = DK.load([b, h, pad + n * BN, 0]).reshape(BN, D)
        vv = DV.load([b, h, pad + n * BN, 0]).reshape(BN, D)
        kpos = n * BN + cols
        dq = qpos[:, None] - kpos[None, :]
        if HAS_LOCAL:
            extra = kpos < sink_c
            if HAS_STRIDED:
                extra = extra | ((((kpos // BLOCK) % stride) == offset) & (kind == K_STRIDED))
            vis = (dq >= 0) & ((dq < lo_w[:, None]) | (extra[None, :] & (dq < lw)))
        elif HAS_LWIN:
            vis = (dq >= 0) & (dq < lw)
        else:
            vis = dq >= 0
        acc, m_i, l_i = online_update(acc, m_i, l_i, q, kk, vv, vis, qk_scale, True, "tf32")

    den = tl.where(l_i > 0, l_i, 1.0)
    out = (acc / den[:, None]).to(dt)
    DO.store([b, hq0, pad + q0, 0], out.reshape(1, GS, QT, D))


# ---------------------------------------------------------------------------------------------
# selection and configuration
# ---------------------------------------------------------------------------------------------

# (GS query heads per program, QT query positions, BN keys per tile, num_warps, num_stages) per head_dim on
# sm90. D=128: the best geometric mean over the five static 32K plans of benchmarks/bench_hopper_sweep.py on
# one H200 (BENCHMARKS.md, issue 17; 255 registers, ~30-78 bytes spilled, yet 1.2-1.3x the spill-free 8-warp
# configs). D=64 / 256: not timed, picked from the compiler's report (no spills, fits shared memory).
HOPPER_CFG = {64: (1, 128, 64, 4, 3), 128: (1, 128, 64, 4, 2), 256: (1, 64, 64, 4, 2)}
# with BLOCKSPARSE heads the tiles must not straddle 64-token pattern blocks
HOPPER_CFG_BS = {64: (2, 64, 64, 4, 3), 128: (2, 64, 64, 4, 2), 256: (1, 64, 64, 4, 2)}

_CAP: dict = {}
LAST = None  # the last compiled kernel launched (n_regs, n_spills, metadata.shared: the compiler's report)


def _is_sm90(device) -> bool:
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    cap = _CAP.get(idx)
    if cap is None:
        cap = _CAP[idx] = torch.cuda.get_device_capability(idx)
    return cap == (9, 0)


def enabled(device) -> bool:
    """Whether the Hopper path may run on this device at all (sm90, compiled, not the interpreter)."""
    if _interpret() or TensorDescriptor is None or torch.device(device).type != "cuda":
        return False
    mode = os.environ.get("HEADPLAN_PREFILL_PATH", "auto")
    if mode == "portable":
        return False
    return mode == "hopper" or _is_sm90(device)


def config(D: int, G: int, has_bs: bool, block: int):
    """(GS, QT, BN, W, S, WS) for this head_dim / group size, or None when the Hopper path cannot serve it."""
    GS, QT, BN, W, S, *ws = (HOPPER_CFG_BS if has_bs else HOPPER_CFG)[D]
    env = os.environ.get("HEADPLAN_PREFILL_HCFG")  # "GS,QT,BN,W,S[,WS]" override for tuning runs
    if env:
        GS, QT, BN, W, S, *ws = (int(x) for x in env.split(","))
    WS = bool(ws and ws[0])
    while GS > 1 and G % GS:
        GS //= 2  # a chunk never straddles two KV groups (the TMA box would write the next group's output)
    if has_bs and (block % QT or block % BN):
        return None
    return GS, QT, BN, W, S, WS


def supported_kinds(dtype, kinds) -> bool:
    """Dtypes and head kinds the Hopper path serves (fp16/bf16; no VSLASH head in the layer)."""
    return dtype in (torch.float16, torch.bfloat16) and P.VSLASH not in kinds


def tma_ready(t):
    """t itself when a TMA descriptor can address it (unit last stride, 16-byte aligned base and strides),
    else a contiguous copy (rare: views at odd offsets)."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and \
        all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def launch(q, k, v, out, plan, scale, stages):
    GS, QT, BN, D = plan["GS"], plan["QT"], plan["BN"], q.shape[-1]
    dq = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, GS, QT, D])
    dk = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, BN, D])
    dv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, BN, D])
    do = TensorDescriptor(out, list(out.shape), list(out.stride()), [1, GS, QT, D])
    G = plan["G"]
    grid = (q.shape[0] * plan["Hkv"] * plan["NM"] * (G // GS),)
    global LAST
    LAST = _hopper_prefill_kernel[grid](
        dq, dk, dv, do, plan["padk"], plan["tab"], plan["order"], plan["cnt"], plan["list"],
        q.shape[2], plan["Hkv"], plan["NM"], plan["NN"], float(scale) * 1.4426950408889634,
        G=G, GS=GS, QT=QT, BN=BN, D=D, BLOCK=plan["block"], NCOLS=P.NCOLS,
        HAS_LOCAL=plan["has_local"], HAS_STRIDED=plan["has_strided"], HAS_LWIN=plan["has_lwin"],
        WS=plan.get("WS", False), num_warps=plan["W"], num_stages=stages,
    )
