"""Triton flash-decoding over the packed per-head KV cache (one new token per sequence).

Same signature and result as :func:`headplan.kernels.reference.decode_ref`:

    sparse_decode(q, k_buf, v_buf, slot_pos, head_off, head_cap, qpos, table, scale) -> (B, Hq, D)

Layout (see ``reference.decode_ref``): ``k_buf``/``v_buf`` are ``(B, S, D)``; KV head ``h`` owns slots
``[head_off[h], head_off[h] + head_cap[h])``; ``slot_pos`` ``(B, S)`` holds the logical position in each
slot (-1 = empty). Slots need not be in position order (a streaming head keeps a sink plus a ring
buffer), so every slot is checked against ``patterns.static_visible``: ``0 <= pos <= qpos`` and, for
STREAMING/STRIDED heads, ``pos < sink or qpos - pos < W(qpos + 1)`` (STRIDED also accepts its shard).
Dynamic kinds and FULL see every valid slot; SKIP heads output zeros.

Two launches, no host synchronisation:

1. split pass, grid ``(NSPLIT, Hkv, B)`` (or ``(NSPLIT, B, Hkv)`` visiting heads by decreasing
   capacity, ``config=dict(order="hb")``). Each KV head's slot range (clipped to ``valid_len`` when
   given) is cut into ``n_h = cdiv(cap_h, chunk_h)`` pieces, ``chunk_h = max(min_chunk,
   roundup(cdiv(cap_h, NSPLIT), BLOCK_N))``, computed on the device from ``head_cap``; short heads get
   fewer pieces, programs past ``n_h`` do nothing. A program loads the G query heads of its KV group
   once (padded to 16 rows for ``tl.dot``), streams its K/V tiles once for all of them with an online
   softmax, and writes a normalised partial output and its log-sum-exp (base 2).
2. combine pass, grid ``(Hq, B)``: merges the ``n_h`` partials of each query head (rows with no
   visible key get exact zeros).

K/V loads are masked by the slot range only (visibility masks the scores), so, as for ``decode_ref``,
empty slots inside a head's range must hold finite data; slots past ``valid_len`` are never read.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import patterns as P
from ._triton import C_KIND, K_SKIP, K_STREAMING, K_STRIDED, device_ints, head_row, window
from ._triton import interpret as _interpret

__all__ = ["sparse_decode", "pick_config"]

_SUPPORTED_D = (64, 128, 256)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _head_extent(CAP, TAB, VLEN, b, h, stride_tab, stride_vlb, NSPLIT, min_chunk,
                 HAS_VLEN: tl.constexpr, BLOCK_N: tl.constexpr):
    """(effective capacity, chunk) of KV head h in batch row b; identical in both passes."""
    cap = tl.load(CAP + h).to(tl.int32)
    kind = tl.load(TAB + h * stride_tab + C_KIND)
    if HAS_VLEN:
        vl = tl.load(VLEN + b * stride_vlb + h).to(tl.int32)
        cap = tl.minimum(cap, tl.maximum(vl, 0))
    cap = tl.where(kind == K_SKIP, 0, cap)  # nothing to read
    chunk = tl.cdiv(tl.cdiv(cap, NSPLIT), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, min_chunk)
    return cap, chunk


@triton.jit
def _decode_split_kernel(
    Q, K, V, POS, OFF, CAP, QPOS, TAB, VLEN, OP, LSEP,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks,
    stride_vb, stride_vs,
    stride_pb,
    stride_tab, stride_vlb,
    NSPLIT, min_chunk,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_VLEN: tl.constexpr, IEEE: tl.constexpr, SHARD_BLOCK: tl.constexpr,
    HEAD_MAJOR: tl.constexpr, HKV_PAD: tl.constexpr,
):
    s = tl.program_id(0)
    if HEAD_MAJOR:
        # grid (NSPLIT, B, Hkv): programs run roughly in launch order, so visit heads from the
        # largest capacity down (longest-processing-time first: the tail is made of short pieces)
        b = tl.program_id(1)
        r = tl.program_id(2)
        Hkv = tl.num_programs(2)
        hh = tl.arange(0, HKV_PAD)
        caps_all = tl.load(CAP + hh, mask=hh < Hkv, other=-1)
        before = (caps_all[None, :] > caps_all[:, None]) | ((caps_all[None, :] == caps_all[:, None])
                                                            & (hh[None, :] < hh[:, None]))
        rank = tl.sum(before.to(tl.int32), 1)
        h = tl.sum(tl.where((rank == r) & (hh < Hkv), hh, 0), 0)
    else:
        h = tl.program_id(1)
        b = tl.program_id(2)
        Hkv = tl.num_programs(1)

    cap, chunk = _head_extent(CAP, TAB, VLEN, b, h, stride_tab, stride_vlb, NSPLIT, min_chunk,
                              HAS_VLEN, BLOCK_N)
    start = s * chunk
    end = tl.minimum(start + chunk, cap)

    # pattern parameters of this head
    kind, sink, alpha, beta, stride, shard_off, lw = head_row(TAB, h, stride_tab)
    qp64 = tl.load(QPOS + b).to(tl.int64)
    w = tl.minimum(tl.maximum(window(alpha, beta, qp64 + 1), -1), qp64 + 1)  # clamped: qpos - pos in [0, qpos]
    w = w.to(tl.int32)
    qp = qp64.to(tl.int32)
    is_local = (kind == K_STREAMING) | (kind == K_STRIDED)
    is_strided = kind == K_STRIDED

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = (offs_g < G) & ((offs_g * 0 + start) < end)  # rows to write; none when the piece is empty

    q = tl.load(Q + b.to(tl.int64) * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)

    off = tl.load(OFF + h).to(tl.int64)
    k_base = K + b.to(tl.int64) * stride_kb + off * stride_ks
    v_base = V + b.to(tl.int64) * stride_vb + off * stride_vs
    p_base = POS + b.to(tl.int64) * stride_pb + off

    m_i = tl.full([G_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)

    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        inb = n < end
        k = tl.load(k_base + n[:, None] * stride_ks + offs_d[None, :], mask=inb[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :], mask=inb[:, None], other=0.0)
        pos = tl.load(p_base + n, mask=inb, other=-1).to(tl.int32)
        vis = (pos >= 0) & (pos <= qp)
        local = (pos < sink) | ((qp - pos) < w)
        shard = ((tl.maximum(pos, 0) // SHARD_BLOCK) % stride) == shard_off
        vis = vis & ((~is_local) | local | (is_strided & shard)) & ((qp - pos) < lw)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(vis[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        corr = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * corr[:, None] + pv
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    part = (b * Hkv + h) * NSPLIT + s
    part = part.to(tl.int64)
    tl.store(OP + (part * G + offs_g)[:, None] * D + offs_d[None, :], o, mask=g_ok[:, None])
    tl.store(LSEP + part * G + offs_g, lse, mask=g_ok)


@triton.jit
def _decode_combine_kernel(
    OP, LSEP, OUT, CAP, TAB, VLEN,
    stride_ob, stride_oh,
    stride_tab, stride_vlb,
    NSPLIT, min_chunk,
    G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, NS_BLOCK: tl.constexpr,
    HAS_VLEN: tl.constexpr,
):
    hq = tl.program_id(0)
    b = tl.program_id(1)
    Hkv = tl.num_programs(0) // G
    h = hq // G
    g = hq % G
    cap, chunk = _head_extent(CAP, TAB, VLEN, b, h, stride_tab, stride_vlb, NSPLIT, min_chunk,
                              HAS_VLEN, BLOCK_N)
    ns = tl.cdiv(cap, chunk)
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, NS_BLOCK)
    base = ((b * Hkv + h) * NSPLIT).to(tl.int64)
    m = tl.full([1], -1.0e30, tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, ns, NS_BLOCK):
        sidx = s0 + offs_s
        ok = sidx < ns
        row = (base + sidx) * G + g
        lse = tl.load(LSEP + row, mask=ok, other=float("-inf"))
        o = tl.load(OP + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        wgt = tl.exp2(lse - m_new)
        corr = tl.exp2(m - m_new)
        l = l * corr + tl.sum(wgt, 0)
        acc = acc * corr + tl.sum(wgt[:, None] * o, 0)
        m = m_new
    res = acc / tl.where(l > 0, l, 1.0)
    res = tl.where(l > 0, res, 0.0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + hq * stride_oh + offs_d, res.to(OUT.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _as_i32(x, device) -> tuple[torch.Tensor, int | None]:
    """Device int32 tensor for head_off/head_cap; also its max when it is known on the host."""
    if isinstance(x, torch.Tensor):
        if x.device == device and x.dtype == torch.int32 and x.is_contiguous():
            return x, None
        if x.device.type == "cpu":
            host = tuple(int(v) for v in x.tolist())
        else:
            return x.to(device=device, dtype=torch.int32).contiguous(), None
    else:
        host = tuple(int(v) for v in x)
    return device_ints(host, device), (max(host) if host else 0)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pick_config(D: int, dtype: torch.dtype, device) -> dict:
    """Tile configuration: fixed under the interpreter, by head_dim on the GPU."""
    if _interpret() or device.type != "cuda":
        return dict(BLOCK_N=32, num_warps=4, num_stages=1, programs_per_sm=8, min_chunk=64, order="hb")
    big = dtype == torch.float32  # 4-byte tiles: halve the tile to keep two pipeline stages in shared memory
    # H100 sweep (benchmarks/bench_decode.py --sweep, D=128 bf16): BLOCK_N 128 x 2 stages ~1-3% ahead of
    # 64 x 3; min_chunk 128 helps small calls; the grid order ("bh" vs "hb") is within noise.
    common = dict(num_warps=4, programs_per_sm=16, min_chunk=128, order="bh")
    if D <= 64:
        return dict(BLOCK_N=64 if big else 128, num_stages=3, **common)
    if D <= 128:
        return dict(BLOCK_N=32 if big else 128, num_stages=2, **common)
    return dict(BLOCK_N=16 if big else 32, num_stages=3, **common)


def sparse_decode(q, k_buf, v_buf, slot_pos, head_off, head_cap, qpos, table, scale: float, *,
                  valid_len: torch.Tensor | None = None, max_cap: int | None = None,
                  num_splits: int | None = None, out: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """Decode attention of one new token per sequence over the packed per-head cache.

    Same arguments and result as ``reference.decode_ref``; q (B, Hq, D), k_buf/v_buf (B, S, D),
    slot_pos (B, S) int32/int64, head_off/head_cap (Hkv,) as python ints, CPU or device tensors,
    qpos (B,), table (Hkv, NCOLS) int32. Returns (B, Hq, D) in q.dtype.

    Optional keyword arguments:
      valid_len (B, Hkv): slots of head h at or past ``valid_len[b, h]`` (relative to its region)
        are known empty and are not read (for full heads whose cache is not full yet).
      max_cap: python upper bound of ``head_cap`` (and of valid_len), used only to size the grid;
        never required (no host synchronisation either way).
      num_splits: pieces per head (grid size); default fills the GPU.
      out: (B, Hq, D) tensor of q.dtype to write into.
      config: override of :func:`pick_config` (BLOCK_N, num_warps, num_stages, programs_per_sm, min_chunk,
        order: "hb" = grid (NSPLIT, B, Hkv) visiting heads by decreasing capacity, "bh" = (NSPLIT, Hkv, B)).
    """
    if q.dim() != 3 or k_buf.dim() != 3 or v_buf.dim() != 3 or slot_pos.dim() != 2:
        raise ValueError("expected q (B, Hq, D), k_buf/v_buf (B, S, D), slot_pos (B, S)")
    B, Hq, D = q.shape
    device = q.device
    if device.type != "cuda" and not _interpret():
        raise ValueError("sparse_decode needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float16, bfloat16 or float32")
    if k_buf.dtype != q.dtype or v_buf.dtype != q.dtype:
        raise ValueError(f"q, k_buf and v_buf must share a dtype, got {q.dtype}, {k_buf.dtype}, {v_buf.dtype}")
    if D not in _SUPPORTED_D or k_buf.shape[-1] != D or v_buf.shape[-1] != D:
        raise ValueError(f"unsupported head_dim {D} (k {k_buf.shape[-1]}, v {v_buf.shape[-1]}); "
                         f"supported: {_SUPPORTED_D} with equal q/k/v head dims")
    if k_buf.shape[:2] != v_buf.shape[:2] or k_buf.shape[0] != B or slot_pos.shape != k_buf.shape[:2]:
        raise ValueError("k_buf, v_buf (B, S, D) and slot_pos (B, S) disagree with q's batch or each other")
    for name, t in (("k_buf", k_buf), ("v_buf", v_buf), ("slot_pos", slot_pos), ("qpos", qpos)):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} is on {t.device}, q on {device}")
    Hkv = table.shape[0]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of the table's Hkv={Hkv}")
    G = Hq // Hkv
    if q.dtype == torch.bfloat16 and device.type != "cuda":
        raise ValueError("bfloat16 is not supported under TRITON_INTERPRET (its tl.dot is wrong there); "
                         "use float16/float32 on the CPU")

    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_buf.stride(-1) != 1:
        k_buf = k_buf.contiguous()
    if v_buf.stride(-1) != 1:
        v_buf = v_buf.contiguous()
    if slot_pos.stride(-1) != 1:
        slot_pos = slot_pos.contiguous()
    table_d = table.to(device=device, dtype=torch.int32).contiguous()
    qpos_d = qpos.to(device=device).contiguous()
    off_d, _ = _as_i32(head_off, device)
    cap_d, host_max = _as_i32(head_cap, device)
    if max_cap is None:
        max_cap = host_max
    if valid_len is not None:
        valid_len = valid_len.to(device=device).contiguous()
        if valid_len.shape != (B, Hkv):
            raise ValueError(f"valid_len must be (B, Hkv) = {(B, Hkv)}, got {tuple(valid_len.shape)}")

    cfg = dict(pick_config(D, q.dtype, device))
    if config:
        cfg.update(config)
    BLOCK_N = int(cfg["BLOCK_N"])
    min_chunk = max(BLOCK_N, int(cfg["min_chunk"]) // BLOCK_N * BLOCK_N)
    if num_splits is None:
        target = _num_sms(device) * int(cfg["programs_per_sm"])
        num_splits = max(1, math.ceil(target / (B * Hkv)))
        if max_cap is not None:
            num_splits = min(num_splits, max(1, math.ceil(max_cap / min_chunk)))
    NSPLIT = int(max(1, num_splits))

    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=device)
    elif out.shape != (B, Hq, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be (B, Hq, D) of q.dtype with unit last stride")
    if B == 0:
        return out
    o_part = torch.empty(B * Hkv * NSPLIT * G, D, dtype=torch.float32, device=device)
    lse_part = torch.empty(B * Hkv * NSPLIT * G, dtype=torch.float32, device=device)
    G_PAD = max(16, triton.next_power_of_2(G))
    vl = valid_len if valid_len is not None else cap_d
    stride_vlb = valid_len.stride(0) if valid_len is not None else 0

    head_major = cfg.get("order", "bh") == "hb"
    grid = (NSPLIT, B, Hkv) if head_major else (NSPLIT, Hkv, B)
    _decode_split_kernel[grid](
        q, k_buf, v_buf, slot_pos, off_d, cap_d, qpos_d, table_d, vl, o_part, lse_part,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1),
        slot_pos.stride(0),
        table_d.stride(0), stride_vlb,
        NSPLIT, min_chunk,
        G=G, G_PAD=G_PAD, D=D, BLOCK_N=BLOCK_N,
        HAS_VLEN=valid_len is not None, IEEE=q.dtype == torch.float32, SHARD_BLOCK=P.DEFAULT_BLOCK,
        HEAD_MAJOR=head_major, HKV_PAD=max(2, triton.next_power_of_2(Hkv)),
        num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]),
    )
    NS_BLOCK = min(64, max(16, triton.next_power_of_2(NSPLIT)))
    _decode_combine_kernel[(Hq, B)](
        o_part, lse_part, out, cap_d, table_d, vl,
        out.stride(0), out.stride(1),
        table_d.stride(0), stride_vlb,
        NSPLIT, min_chunk,
        G=G, D=D, BLOCK_N=BLOCK_N, NS_BLOCK=NS_BLOCK, HAS_VLEN=valid_len is not None,
        num_warps=4 if D >= 128 else 2,
    )
    return out
