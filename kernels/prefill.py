"""Triton sparse prefill: one flash-attention forward where every KV group visits only the tiles
its head pattern needs (issue 4).

Same signature and result as :func:`kernels.reference.prefill_ref`.

Layout of the work
------------------
* Query tiles are laid out in *logical* positions (0 = first real token of a sequence), so left
  padding only shifts pointers; padded output rows are zeroed by a tiny second kernel.
* GQA native: one program handles one (batch, KV head, query tile of ``QT`` positions) and stacks
  the ``G`` query heads of the group along M (``BM = GP * QT`` rows, ``GP`` = G rounded up to a
  power of two), so each K/V tile is loaded once for the whole group.
* Per (batch, KV head, query tile) a compact list of KV tiles (``BN`` positions) is precomputed on
  the device with torch ops: first the tiles that are visible to every row (no mask needed), then
  the partially visible ones (token-exact mask). VSLASH heads additionally get a list of single
  vertical key columns that fall outside their slash tiles; these are gathered ``BN`` at a time.
* Static tables (no BLOCKSPARSE / VSLASH head) have their lists cached per (table, L, pad).
* Programs are launched heavy-first (sorted by tile count on the device), so a FULL head among
  streaming heads starts early instead of trailing at the end.
* On compute capability 9.0 :func:`build_plan` picks the Hopper path (:mod:`kernels.prefill_hopper`: TMA
  tensor descriptors, one query head per 128-row tile) for every table it serves; the kernel below stays
  for other GPUs, the interpreter, VSLASH heads, tile-straddling pattern blocks and fp32.
  ``HEADPLAN_PREFILL_PATH=portable`` forces this kernel.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import patterns as P
from . import prefill_hopper as _hp
from ._triton import K_BLOCKSPARSE, K_STREAMING, K_STRIDED, K_VSLASH, device_ints, head_row, window
from ._triton import interpret as _interpret
from ._triton import online_update as _update
from .dynamic_index import block_select, vslash_select
from .prefill_tiles import _compact, _rect_flags, _static_flags, _vslash_flags

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prefill_kernel(Q, K, V, O, PAD, TAB, ORDER, CNT, LIST, GCNT, GLIST, SEL, CM, OM,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                    L, HKV, NM, NN, NB, NGL, qk_scale,
                    G: tl.constexpr, QT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    D: tl.constexpr, BLOCK: tl.constexpr, NCOLS: tl.constexpr,
                    HAS_PAD: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_STRIDED: tl.constexpr,
                    HAS_BS: tl.constexpr, BS_GATHER: tl.constexpr, HAS_VS: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)
    item = tl.load(ORDER + pid).to(tl.int64)
    m = item % NM
    bh = item // NM
    h = bh % HKV
    b = bh // HKV
    pad = tl.load(PAD + b).to(tl.int32)
    Lr = L - pad

    rows = tl.arange(0, BM)
    g = rows // QT
    qpos = (m * QT).to(tl.int32) + rows % QT
    row_ok = (g < G) & (qpos < Lr)
    dd = tl.arange(0, D)
    cols = tl.arange(0, BN)

    q_base = Q + b * sqb + (h * G) * sqh
    q_ptrs = q_base + g[:, None].to(tl.int64) * sqh + (pad + qpos)[:, None].to(tl.int64) * sql + dd[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh + pad.to(tl.int64) * skl
    v_base = V + b * svb + h * svh + pad.to(tl.int64) * svl

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)

    cu = tl.load(CNT + item * 2)
    cmk = tl.load(CNT + item * 2 + 1)
    lbase = LIST + item * NN

    # 1) tiles every row sees entirely: no mask, no bounds checks
    for i in range(0, cu):
        n = tl.load(lbase + i)
        kpos = n * BN + cols
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skl + dd[None, :])
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svl + dd[None, :])
        acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, row_ok, qk_scale, False, PREC)

    # 2) partially visible tiles: token-exact mask
    kind, sink, alpha, beta, stride, offset, lw = head_row(TAB, h, NCOLS)
    win = window(alpha, beta, (qpos + 1).to(tl.int64)).to(tl.int32)
    for i in range(cu, cu + cmk):
        n = tl.load(lbase + i)
        kpos = n * BN + cols
        col_ok = kpos < Lr
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skl + dd[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svl + dd[None, :], mask=col_ok[:, None], other=0.0)
        vis = (kpos[None, :] <= qpos[:, None]) & col_ok[None, :] & ((qpos[:, None] - kpos[None, :]) < lw)
        if HAS_LOCAL:
            loc = (kpos[None, :] < sink) | ((qpos[:, None] - kpos[None, :]) < win[:, None])
            if HAS_STRIDED:
                shard = ((kpos // BLOCK) % stride) == offset
                loc = loc | (shard & ((kpos * 0 + kind) == K_STRIDED))[None, :]
            kv = kpos * 0 + kind
            vis = vis & (loc | ((kv != K_STREAMING) & (kv != K_STRIDED))[None, :])
        if HAS_BS:
            if BS_GATHER:
                sp = SEL + bh * NB * NB + (qpos // BLOCK)[:, None] * NB + (kpos // BLOCK)[None, :]
                sb = tl.load(sp, mask=vis & ((kpos * 0 + kind) == K_BLOCKSPARSE)[None, :], other=0)
                vis = vis & ((sb != 0) | ((kpos * 0 + kind) != K_BLOCKSPARSE)[None, :])
        if HAS_VS:
            vsv = (kpos * 0 + kind) == K_VSLASH
            cmv = tl.load(CM + bh * L + kpos, mask=col_ok & vsv, other=0)
            omv = tl.load(OM + bh * L + (qpos[:, None] - kpos[None, :]), mask=vis & vsv[None, :], other=0)
            vis = vis & ((cmv[None, :] != 0) | (omv != 0) | (~vsv)[None, :])
        acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, vis, qk_scale, True, PREC)

    # 3) VSLASH: single vertical columns outside the slash tiles, gathered BN at a time
    if HAS_VS:
        ng = tl.load(GCNT + item)
        gbase = GLIST + item * NGL
        for c0 in range(0, ng, BN):
            c_ok = (c0 + cols) < ng
            kpos = tl.load(gbase + c0 + cols, mask=c_ok, other=0)
            k = tl.load(k_base + kpos[:, None].to(tl.int64) * skl + dd[None, :], mask=c_ok[:, None], other=0.0)
            v = tl.load(v_base + kpos[:, None].to(tl.int64) * svl + dd[None, :], mask=c_ok[:, None], other=0.0)
            vis = (kpos[None, :] <= qpos[:, None]) & c_ok[None, :] & ((qpos[:, None] - kpos[None, :]) < lw)
            acc, m_i, l_i = _update(acc, m_i, l_i, q, k, v, vis, qk_scale, True, PREC)

    den = tl.where(l_i > 0, l_i, 1.0)
    out = acc / den[:, None]
    o_ptrs = O + b * sob + (h * G) * soh + g[:, None].to(tl.int64) * soh + \
        (pad + qpos)[:, None].to(tl.int64) * sol + dd[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _zero_pad_kernel(O, PAD, HQ, sob, soh, sol, D: tl.constexpr, BR: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    hq = bh % HQ
    pad = tl.load(PAD + b)
    if t * BR < pad:
        rows = t * BR + tl.arange(0, BR)
        dd = tl.arange(0, D)
        ptrs = O + b.to(tl.int64) * sob + hq * soh + rows[:, None].to(tl.int64) * sol + dd[None, :]
        tl.store(ptrs, tl.zeros([BR, D], dtype=O.dtype.element_ty), mask=(rows < pad)[:, None])


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

# (BM rows per program, BN keys per tile, num_warps, num_stages) per head_dim, GPU. Measured on an
# H100 (bf16, D=128, 32K, see BENCHMARKS_prefill_section.md): BN=128 is ~15% faster for static
# plans; with dynamic heads it needs more shared memory than the chip has (the extra mask loads)
# and straddles 64-token pattern blocks, so those plans use BN=64.
_GPU_CFG = {64: (128, 128, 4, 3), 128: (128, 128, 8, 3), 256: (64, 64, 8, 2)}
_GPU_CFG_DYN = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)}
_INTERP_CFG = (64, 32, 4, 1)


def _config(D: int, G: int, block: int, has_bs: bool, has_dyn: bool):
    if _interpret():
        BM, BN, W, S = _INTERP_CFG
    else:
        BM, BN, W, S = (_GPU_CFG_DYN if has_dyn else _GPU_CFG)[D]
        env = os.environ.get("HEADPLAN_PREFILL_CFG")  # "BM,BN,W,S" override for tuning runs
        if env:
            BM, BN, W, S = (int(x) for x in env.split(","))
    GP = 1 << max(0, (G - 1).bit_length())
    BM = max(BM, GP)
    QT = BM // GP
    if has_bs and QT > block and block & (block - 1) == 0:
        QT = block  # a query tile never straddles two pattern blocks
        BM = QT * GP
    return BM, QT, BN, W, S


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------

_CACHE: "OrderedDict[tuple, dict]" = OrderedDict()
_CACHE_MAX = 16


def _key_of(t):
    if t is None:
        return None
    return (t.data_ptr(), t._version, tuple(t.shape), str(t.device))


def _table_info(table, device):
    key = ("table", _key_of(table), str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit["ref"] is table:
        return hit
    rows = table.detach().to("cpu", torch.int64).tolist()
    info = {"ref": table, "rows": rows, "tab": table.detach().to(device=device, dtype=torch.int32).contiguous()}
    _put(key, info)
    return info


def _put(key, val):
    _CACHE[key] = val
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)


def build_plan(q, k, table, scale, pad=None, block=P.DEFAULT_BLOCK):
    """Everything the kernel needs besides q/k/v: tile lists, dynamic selections, launch order."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    info = _table_info(table, dev)
    rows = info["rows"]
    kinds = [r[P.C_KIND] for r in rows]
    has_bs = P.BLOCKSPARSE in kinds
    has_vs = P.VSLASH in kinds
    # the one place that picks the kernel: the Hopper (TMA) path on sm90 where it serves the table's kinds,
    # else the portable kernel (other GPUs, the interpreter, VSLASH heads, pattern blocks across tiles)
    hcfg = _hp.config(D, G, has_bs, block) if _hp.enabled(dev) and _hp.supported_kinds(q.dtype, kinds) else None
    GS, WS = 1, False
    if hcfg is not None:
        GS, QT, BN, W, S, WS = hcfg
        BM = GS * QT
    else:
        BM, QT, BN, W, S = _config(D, G, block, has_bs, has_bs or has_vs)
    padt = pad.to(device=dev, dtype=torch.int32).contiguous() if pad is not None else None
    padk = padt if padt is not None else torch.zeros(B, dtype=torch.int32, device=dev)
    lr = (L - padt.long()) if padt is not None else torch.full((B,), L, dtype=torch.int64, device=dev)
    skey = ("static", _key_of(table), _key_of(pad) if pad is not None else None, B, L, QT, BN, block, str(dev))
    st = _CACHE.get(skey)
    if st is None or st["ref"] is not table or st["pref"] is not pad:
        any_, all_ = _static_flags(info["tab"].long(), L, QT, BN, lr, block, dev)
        st = {"ref": table, "pref": pad, "any": any_, "all": all_}
        if not (has_bs or has_vs):
            st["lists"] = _finish(any_, all_, None, None, B, Hkv)
        _put(skey, st)
    plan = {"path": "hopper" if hcfg is not None else "portable", "GS": GS, "WS": WS,
            "B": B, "Hq": Hq, "Hkv": Hkv, "L": L, "D": D, "G": G, "BM": BM, "QT": QT, "BN": BN,
            "W": W, "S": S, "block": block, "pad": padt, "padk": padk, "tab": info["tab"], "kinds": kinds,
            "has_bs": has_bs, "has_vs": has_vs, "dev": dev}
    plan["has_local"] = any(kd in (P.STREAMING, P.STRIDED) for kd in kinds)
    plan["has_strided"] = P.STRIDED in kinds
    plan["has_lwin"] = any(r[P.C_LWIN] > 0 for r in rows)
    plan["bs_gather"] = has_bs and not (block % QT == 0 and block % BN == 0)
    NM, NN = triton.cdiv(L, QT), triton.cdiv(L, BN)
    NB = triton.cdiv(L, block)
    dummy8 = torch.zeros(1, dtype=torch.uint8, device=dev)
    dummy32 = torch.zeros(1, dtype=torch.int32, device=dev)
    plan.update(NM=NM, NN=NN, NB=NB, sel=dummy8, cm=dummy8, om=dummy8, gcnt=dummy32, glist=dummy32, NGL=1)
    if not (has_bs or has_vs):
        plan.update(st["lists"])
        return plan
    any_, all_ = st["any"].clone(), st["all"].clone()
    if has_bs:
        heads = [h for h, kd in enumerate(kinds) if kd == P.BLOCKSPARSE]
        sel = block_select(q, k, heads, [rows[h][P.C_TOPK] for h in heads], padt, lr, block)
        ra, rl = _rect_flags(sel, L, QT, BN, lr, block)
        hs = device_ints(heads, dev)
        any_[:, hs] &= ra
        all_[:, hs] &= rl
        if plan["bs_gather"]:
            full = torch.zeros(B, Hkv, NB, NB, dtype=torch.uint8, device=dev)
            full[:, hs] = sel.to(torch.uint8)
            plan["sel"] = full.contiguous()
    gcnt = glist = None
    if has_vs:
        heads = [h for h, kd in enumerate(kinds) if kd == P.VSLASH]
        verts = [rows[h][P.C_VERT] for h in heads]
        slashes = [rows[h][P.C_SLASH] for h in heads]
        cmask, omask, cols = vslash_select(q, k, heads, verts, slashes, scale, padt, lr)
        slash, gl, gc = _vslash_flags(cmask, omask, cols, L, QT, BN, lr, max(slashes))
        hs = device_ints(heads, dev)
        any_[:, hs] &= slash
        all_[:, hs] = False
        cm = torch.zeros(B, Hkv, L, dtype=torch.uint8, device=dev)
        om = torch.zeros(B, Hkv, L, dtype=torch.uint8, device=dev)
        cm[:, hs] = cmask.to(torch.uint8)
        om[:, hs] = omask.to(torch.uint8)
        V = gl.shape[-1]
        glist = torch.zeros(B, Hkv, NM, V, dtype=torch.int32, device=dev)
        gcnt = torch.zeros(B, Hkv, NM, dtype=torch.int32, device=dev)
        glist[:, hs] = gl.to(torch.int32)
        gcnt[:, hs] = gc.to(torch.int32)
        plan.update(cm=cm.contiguous(), om=om.contiguous(), NGL=V)
    plan.update(_finish(any_, all_, gcnt, glist, B, Hkv, BN))
    return plan


def _finish(any_, all_, gcnt, glist, B, Hkv, BN=64):
    lst, cnt = _compact(any_, all_)
    cost = cnt[..., 0].float() + 1.25 * cnt[..., 1].float()
    out = {"list": lst, "cnt": cnt}
    if gcnt is not None:
        cost = cost + 1.25 * torch.div(gcnt + BN - 1, BN, rounding_mode="floor").float()
        out["gcnt"] = gcnt.contiguous()
        out["glist"] = glist.contiguous()
    order = torch.argsort(cost.flatten(), descending=True, stable=True).to(torch.int32)
    out["order"] = order.contiguous()
    return out


def _check(q, k, v, table):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("sparse_prefill expects q (B,Hq,L,D) and k/v (B,Hkv,L,D)")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS or k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(f"sparse_prefill supports head_dim in {SUPPORTED_HEAD_DIMS} (q, k, v alike); got "
                         f"q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"sparse_prefill supports dtypes {[str(d) for d in SUPPORTED_DTYPES]} (q, k, v alike); "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not _interpret():
        raise ValueError(f"sparse_prefill needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {q.device}")
    B, Hq, L, _ = q.shape
    if k.shape[:3] != (B, k.shape[1], L) or v.shape != k.shape or Hq % k.shape[1] != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if table.dim() != 2 or table.shape[0] != k.shape[1] or table.shape[1] < P.NCOLS:
        raise ValueError(f"table must be ({k.shape[1]}, {P.NCOLS}); got {tuple(table.shape)}")


_STAGES: dict = {}


def run_plan(q, k, v, plan, scale):
    """Launch the prefill kernel for a plan from :func:`build_plan`."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    B, Hq, L, D = q.shape
    out = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
    if L == 0 or B == 0:
        return out
    padt = plan["pad"]
    if plan["path"] == "hopper":
        q, k, v = _hp.tma_ready(q), _hp.tma_ready(k), _hp.tma_ready(v)
    grid = (B * plan["Hkv"] * plan["NM"],)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    vkey = (plan["path"], plan["GS"], q.dtype, D, plan["G"], plan["BM"], plan["BN"], plan["W"], plan["has_local"], plan["has_strided"],
            plan["has_bs"], plan["bs_gather"], plan["has_vs"], plan["pad"] is not None)
    stages = _STAGES.get(vkey, plan["S"])
    while True:
        try:
            _launch(q, k, v, out, plan, scale, grid, prec, stages)
            break
        except triton.runtime.errors.OutOfResources:
            if stages <= 1:
                raise
            stages -= 1  # too much shared memory for this variant: one pipeline stage less, remembered
            _STAGES[vkey] = stages
    if padt is not None:
        BR = 64
        _zero_pad_kernel[(triton.cdiv(L, BR), B * Hq)](out, padt, Hq, out.stride(0), out.stride(1), out.stride(2),
                                                      D=D, BR=BR, num_warps=4)
    return out


def _launch(q, k, v, out, plan, scale, grid, prec, stages):
    if plan["path"] == "hopper":
        _hp.launch(q, k, v, out, plan, scale, stages)
        return
    L, D = q.shape[2], q.shape[3]
    _prefill_kernel[grid](
        q, k, v, out, plan["padk"], plan["tab"], plan["order"], plan["cnt"],
        plan["list"], plan["gcnt"], plan["glist"], plan["sel"], plan["cm"], plan["om"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        L, plan["Hkv"], plan["NM"], plan["NN"], plan["NB"], plan["NGL"], float(scale) * 1.4426950408889634,
        G=plan["G"], QT=plan["QT"], BM=plan["BM"], BN=plan["BN"], D=D, BLOCK=plan["block"], NCOLS=P.NCOLS,
        HAS_PAD=plan["pad"] is not None, HAS_LOCAL=plan["has_local"], HAS_STRIDED=plan["has_strided"],
        HAS_BS=plan["has_bs"], BS_GATHER=plan["bs_gather"], HAS_VS=plan["has_vs"], PREC=prec,
        num_warps=plan["W"], num_stages=stages,
    )


def sparse_prefill(q, k, v, table, scale, pad=None, block=P.DEFAULT_BLOCK):
    """Sparse self-attention prefill from an empty cache; same semantics as ``prefill_ref``.

    q (B, Hq, L, D); k, v (B, Hkv, L, D); table (Hkv, NCOLS) int32 on any device; pad (B,) left
    padding or None. Returns (B, Hq, L, D) in q's dtype; padded rows and SKIP heads are zero.
    """
    _check(q, k, v, table)
    plan = build_plan(q, k, table, scale, pad, block)
    return run_plan(q, k, v, plan, scale)
