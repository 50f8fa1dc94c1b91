"""Per-head sparse attention patterns in tensor form: the one definition of what a head sees.

Everything here is plain PyTorch and imports no model code. The runtime, the profiler, the
reference attention and the Triton kernels all follow the semantics written down here.

Coordinates are *logical* token positions: 0 is the first real (non-padding) token of a sequence.
Padding slots carry position -1 and are never visible.

A head table is an int32 tensor of shape (H, NCOLS), one row per KV head, columns below.

Visibility of key position ``j`` from query position ``i`` (always ``0 <= j <= i``):

- FULL:        every causal key.
- STREAMING:   ``j < sink`` or ``i - j < W(i + 1)``, with the elastic window
               ``W(n) = alpha + (beta_q * n) // BETA_SCALE`` (integer arithmetic, so every
               implementation agrees token for token; ``beta = beta_q / BETA_SCALE``).
- STRIDED:     STREAMING, or ``(j // block) % stride == offset`` (S2-Attention style shards).
- BLOCKSPARSE: dynamic. Per query block ``qb = i // block``: key blocks ``{0, qb}`` plus the
               ``topk`` blocks in ``1..qb-1`` whose mean-pooled keys score highest against the
               mean-pooled queries of the block (query heads of the KV group pooled together).
               ``j`` is visible if ``j // block`` is selected (and causal).
- VSLASH:      dynamic (vertical-slash). From the last ``min(LAST_Q, L)`` queries the summed
               attention probabilities pick ``vertical`` key columns (column 0 always) and
               ``slash`` diagonal offsets ``i - j`` (offset 0 always). ``j`` visible if its column
               or its diagonal is selected.
- SKIP:        nothing; the head's output is zero.
- SELECT:      token selection (SnapKV-style, per KV head). Every query of a chunk sees every causal key
               the head holds (so a prefill from an empty cache is FULL); at the end of each chunk the
               head's cache keeps its ``sink`` first tokens, its last ``alpha`` tokens (a ring; beta is 0)
               and ``K(n) = keep_alpha + (keep_beta_q * n) // BETA_SCALE`` of the others (``n``: tokens
               so far), those the chunk's last ``OBS`` queries attend to most (``select_scores``). Decode
               steps see what the cache holds; the selection is not revisited until the next chunk. Heads
               may instead pool K(n) with the layer's other select heads (column ``C_SHARE``, ``SHARES``).

Every head is also bounded by its layer's own attention: column ``C_LWIN`` holds the layer's
sliding window ``w`` (0 = a global layer). A key is visible only if the pattern allows it *and*
``i - j < w`` (transformers' sliding-window rule), so ``full`` in a sliding layer is the layer's
window, and a plan can narrow the model's attention but never widen it.

Dynamic patterns (BLOCKSPARSE, VSLASH) only apply to a prefill that starts from an empty cache;
queries that attend to a cache (decode, later prefill chunks) see every causal key for them.
"""

from __future__ import annotations

import math

import torch

from .kinds import BETA_SCALE, KIND_NAMES, SHARE_FLOOR, SHARES, window  # noqa: F401  (torch-free vocabulary)

FULL, STREAMING, STRIDED, BLOCKSPARSE, VSLASH, SKIP, SELECT = range(len(KIND_NAMES))

# column layout of a head table
C_KIND, C_SINK, C_ALPHA, C_BETA, C_STRIDE, C_OFFSET, C_TOPK, C_VERT, C_SLASH, C_LWIN, C_KEEP, C_KEEPB, C_SHARE = \
    range(13)
NCOLS = 13


LAST_Q = 64
OBS = 32  # SELECT: the observation window (last queries of a chunk) whose attention picks the kept tokens
POOL = 7  # SELECT: scores are max-pooled over this many neighbouring positions (keeps a needle's context)
POOL_TIE = 1e-3  # SELECT: weight of a token's own score beside its pooled one (orders a pooled plateau)
DEFAULT_BLOCK = 64


def make_table(rows: list[dict], device=None, layer_window: int = 0) -> torch.Tensor:
    """Build a head table from dicts with keys kind (name or int) and the pattern's parameters.

    ``layer_window``: the layer's own sliding window (0 = none), stored in column C_LWIN."""
    t = torch.zeros(len(rows), NCOLS, dtype=torch.int32)
    t[:, C_LWIN] = int(layer_window or 0)
    for h, r in enumerate(rows):
        kind = r["kind"]
        t[h, C_KIND] = KIND_NAMES.index(kind) if isinstance(kind, str) else int(kind)
        t[h, C_SINK] = int(r.get("sink", 0))
        t[h, C_ALPHA] = int(r.get("alpha", 0))
        t[h, C_BETA] = beta_q(r)
        t[h, C_STRIDE] = int(r.get("stride", 1))
        t[h, C_OFFSET] = int(r.get("offset", 0))
        t[h, C_TOPK] = int(r.get("topk", 0))
        t[h, C_VERT] = int(r.get("vertical", 0))
        t[h, C_SLASH] = int(r.get("slash", 0))
        t[h, C_KEEP] = int(r.get("keep_alpha", 0))
        t[h, C_KEEPB] = int(round(float(r.get("keep_beta", 0.0)) * BETA_SCALE))
        t[h, C_SHARE] = SHARES.index(r.get("share", "head"))
    return t.to(device) if device is not None else t


def in_layer_window(qpos, kpos, lwin):
    """The layer's own sliding-window rule: ``lwin == 0`` (global layer) or ``qpos - kpos < lwin``."""
    return (lwin == 0) | ((qpos - kpos) < lwin)


def is_dynamic(table: torch.Tensor) -> torch.Tensor:
    kind = table[:, C_KIND]
    return (kind == BLOCKSPARSE) | (kind == VSLASH)


def static_visible(qpos: torch.Tensor, kpos: torch.Tensor, table: torch.Tensor, block: int = DEFAULT_BLOCK,
                   dynamic_as_full: bool = True) -> torch.Tensor:
    """Boolean visibility for the static part of every head's pattern.

    qpos: (..., Lq, 1) or broadcastable, int64 logical positions (-1 = padding).
    kpos: (..., 1, Lk) or (..., H, 1, Lk) likewise.
    table: (H, NCOLS). Returns (..., H, Lq, Lk) (heads broadcast on dim -3).
    Dynamic heads are returned as causal-full when ``dynamic_as_full``; otherwise causal only and
    the caller intersects with the dynamic selection.
    """
    tb = table.to(torch.int64)
    col = lambda c: tb[:, c].view(-1, 1, 1)  # noqa: E731  (H, 1, 1)
    kind = col(C_KIND)
    causal = (qpos >= 0) & (kpos >= 0) & (kpos <= qpos)
    w = window(col(C_ALPHA), col(C_BETA), qpos + 1)
    local = (kpos < col(C_SINK)) | ((qpos - kpos) < w)
    stride = col(C_STRIDE).clamp(min=1)
    shard = torch.remainder(torch.div(kpos, block, rounding_mode="floor"), stride) == col(C_OFFSET)
    vis = torch.where(kind == STREAMING, local, torch.ones_like(local))
    vis = torch.where(kind == STRIDED, local | shard, vis)
    vis = torch.where(kind == SKIP, torch.zeros_like(vis), vis)
    return causal & vis & in_layer_window(qpos, kpos, col(C_LWIN))


# ---------------------------------------------------------------------------------------------
# dynamic index building (one sequence, logical layout, no padding)
# ---------------------------------------------------------------------------------------------

def build_block_index(q: torch.Tensor, k: torch.Tensor, topk: int, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Key blocks each query block visits, for one KV head.

    q: (G, L, D) the query heads of one KV group; k: (L, D).
    Returns int32 (nb, topk + 2): sorted ascending, padded with -1.
    """
    G, L, D = q.shape
    nb = math.ceil(L / block)
    pad = nb * block - L
    qf = q.float()
    kf = k.float()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
    counts = torch.full((nb,), float(block), device=q.device)
    counts[-1] = block - pad
    qbar = qf.view(G, nb, block, D).sum(dim=(0, 2)) / (counts[:, None] * G)  # (nb, D)
    kbar = kf.view(nb, block, D).sum(dim=1) / counts[:, None]  # (nb, D)
    score = qbar @ kbar.T  # (nb, nb)
    qb = torch.arange(nb, device=q.device)[:, None]
    kb = torch.arange(nb, device=q.device)[None, :]
    cand = (kb >= 1) & (kb < qb)
    score = torch.where(cand, score, torch.full_like(score, -math.inf))
    out = torch.full((nb, topk + 2), -1, dtype=torch.int64, device=q.device)
    out[:, 0] = 0
    out[:, 1] = torch.arange(nb, device=q.device)
    if topk > 0 and nb > 2:
        kk = min(topk, nb)
        val, idx = torch.topk(score, kk, dim=1)
        idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
        out[:, 2:2 + kk] = idx
    out[0, 1] = -1  # block 0 is already listed for the first query block
    out = torch.where(out < 0, torch.full_like(out, 1 << 30), out).sort(dim=1).values
    out = torch.where(out == (1 << 30), torch.full_like(out, -1), out)
    return out.to(torch.int32)


def build_vslash_index(q: torch.Tensor, k: torch.Tensor, vertical: int, slash: int, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical columns and slash offsets for one KV head.

    q: (G, L, D); k: (L, D). Returns (cols int32 (vertical,), offsets int32 (slash,)), each
    sorted ascending and padded with -1 at the end when L is too short.
    """
    G, L, D = q.shape
    m = min(LAST_Q, L)
    ql = q[:, L - m:].float()
    s = torch.einsum("gmd,ld->gml", ql, k.float()) * scale
    i = torch.arange(L - m, L, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    s = s.masked_fill(j > i, -math.inf)
    p = torch.softmax(s, dim=-1).sum(0)  # (m, L)
    col = p.sum(0)
    d = (i - j)  # (m, L)
    diag = torch.zeros(L, device=q.device)
    diag.index_add_(0, d.clamp(min=0).flatten(), torch.where(d >= 0, p, torch.zeros_like(p)).flatten())
    col[0] = math.inf
    diag[0] = math.inf

    def pick(score, n):
        out = torch.full((n,), -1, dtype=torch.int64, device=q.device)
        kk = min(n, L)
        if kk > 0:
            out[:kk] = torch.topk(score, kk).indices.sort().values
        return out.to(torch.int32)

    return pick(col, vertical), pick(diag, slash)


def dynamic_visible(qpos: torch.Tensor, kpos: torch.Tensor, kind: int, index, block: int = DEFAULT_BLOCK
                    ) -> torch.Tensor:
    """Visibility of one dynamic head for one sequence. qpos (Lq, 1), kpos (1, Lk) logical.

    index: block index tensor (nb, K) for BLOCKSPARSE, (cols, offsets) for VSLASH.
    """
    causal = (qpos >= 0) & (kpos >= 0) & (kpos <= qpos)
    qs = qpos.clamp(min=0)
    ks = kpos.clamp(min=0)
    if kind == BLOCKSPARSE:
        nb = index.shape[0]
        sel = torch.zeros(nb, nb + 1, dtype=torch.bool, device=index.device)
        idx = index.long()
        sel.scatter_(1, torch.where(idx < 0, torch.full_like(idx, nb), idx), True)
        qb = torch.div(qs, block, rounding_mode="floor").clamp(max=nb - 1)
        kb = torch.div(ks, block, rounding_mode="floor").clamp(max=nb)
        return causal & sel[qb, kb]
    if kind == VSLASH:
        cols, offs = index
        L = int(max(int(qs.max()), int(ks.max()), int(cols.max()), int(offs.max()))) + 1
        cmask = torch.zeros(L + 1, dtype=torch.bool, device=cols.device)
        cmask[torch.where(cols < 0, torch.full_like(cols, L), cols).long()] = True
        omask = torch.zeros(L + 1, dtype=torch.bool, device=offs.device)
        omask[torch.where(offs < 0, torch.full_like(offs, L), offs).long()] = True
        cmask[L] = False
        omask[L] = False
        d = (qs - ks).clamp(min=0, max=L)
        return causal & (cmask[ks.clamp(max=L)] | omask[d])
    raise ValueError(f"kind {kind} is not dynamic")


# ---------------------------------------------------------------------------------------------
# budgets: how many entries / KV slots a pattern needs at length n (used by search and eval)
# ---------------------------------------------------------------------------------------------

def visible_count(row: dict, n: int, block: int = DEFAULT_BLOCK, lwin: int = 0) -> int:
    """Number of (query, key) pairs the pattern visits for a sequence of n tokens (causal), inside a
    layer whose own sliding window is ``lwin`` (0 = global layer)."""
    kind = row["kind"]
    lwin = int(lwin or 0)
    i = torch.arange(n, dtype=torch.int64)
    cap = torch.minimum(i + 1, torch.full_like(i, lwin)) if lwin else i + 1  # what the layer itself sees
    if kind in ("full", "select"):  # a select head's prefill is full; its cache is what it selects
        return int(cap.sum())
    if kind == "skip":
        return 0
    if kind in ("streaming", "strided"):
        # exact, O(n): per row, the sink [lw0, sink) and the window [lo, i] where lw0 = i - lwin + 1 is the
        # layer's own lower edge; strided heads add the keys in [max(sink, lw0), lo) whose block b has
        # b % stride == offset
        sink = int(row.get("sink", 0))
        w = window(int(row.get("alpha", 0)), beta_q(row), i + 1)
        lw0 = (i - lwin + 1).clamp(min=0) if lwin else torch.zeros_like(i)
        lo = torch.minimum(torch.maximum((i - w + 1).clamp(min=0), lw0), i + 1)  # first key of the window
        sink_hi = torch.minimum(torch.full_like(lo, sink), lo)
        count = (sink_hi - lw0).clamp(min=0) + (i - lo + 1)
        if kind == "strided":
            stride, off = max(1, int(row.get("stride", 1))), int(row.get("offset", 0))

            def shard_before(x):  # number of keys j < x with (j // block) % stride == off
                period = block * stride
                return (x // period) * block + (x % period - off * block).clamp(min=0, max=block)

            start = torch.maximum(torch.full_like(lo, sink), lw0)
            count = count + (shard_before(lo) - shard_before(start)).clamp(min=0)
        return int(count.sum())
    if kind == "blocksparse":
        # per row i of query block qb: min(qb + 1, topk + 2) blocks, the diagonal one up to row i
        qb = i // block
        blocks = torch.minimum(qb + 1, torch.full_like(qb, int(row.get("topk", 0)) + 2))
        return int(torch.minimum((blocks - 1) * block + (i % block) + 1, cap).sum())
    if kind == "vslash":
        k = int(row.get("vertical", 0)) + int(row.get("slash", 0))
        return int(torch.minimum(cap, torch.full_like(i, k)).sum())
    raise ValueError(f"unknown pattern kind {kind!r}")


def beta_q(row: dict) -> int:
    """A row's beta on the integer grid (``beta * BETA_SCALE``)."""
    return int(round(float(row.get("beta", 0.0)) * BETA_SCALE))


def kv_count(row: dict, n: int, lwin: int = 0) -> int:
    """KV slots the head keeps after n tokens (what its decode cache must hold) in a layer whose own
    sliding window is ``lwin`` (0 = global): never more than the layer's own cache keeps."""
    kind = row["kind"]
    if kind == "skip":
        return 0
    keep = n
    if kind == "streaming":
        keep = min(n, int(row.get("sink", 0)) + int(window(int(row.get("alpha", 0)), beta_q(row), n)))
    return min(keep, int(lwin)) if lwin else keep


def select_scores(q_obs: torch.Tensor, k: torch.Tensor, kpos: torch.Tensor, qpos: torch.Tensor,
                  scale: float, lwin: int = 0) -> torch.Tensor:
    """SELECT's token scores: how much the observation queries attend to each held key.

    q_obs: (B, G, O, D) the last queries of a chunk (the query heads of one KV group); qpos (B, O) their
    positions (-1 = padding); k: (B, M, D) keys with positions kpos (B, M) (-1 = empty). Each query's
    softmax runs over the keys it sees (causal, inside the layer's window); the probabilities are averaged
    over the queries, the group's heads take the maximum, and the result is max-pooled over ``POOL``
    neighbouring positions (plus ``POOL_TIE`` times the token's own score). Returns (B, M) float32, -inf where kpos is -1."""
    return _pooled(observed_attention(q_obs, k, kpos, qpos, scale, lwin), kpos)  # (B, M)


def observed_attention(q_obs: torch.Tensor, k: torch.Tensor, kpos: torch.Tensor, qpos: torch.Tensor,
                       scale: float, lwin: int = 0) -> torch.Tensor:
    """``select_scores`` before pooling: the observation queries' attention probabilities, averaged over the
    queries, the group's heads taking the maximum. Shapes as there; returns (B, M) float32 (0 where kpos is -1)."""
    B, M = kpos.shape
    s = torch.einsum("bgod,bmd->bgom", q_obs.float(), k.float()) * scale
    qp, kp = qpos[:, None, :, None].long(), kpos[:, None, None, :].long()
    vis = (kp >= 0) & (qp >= 0) & (kp <= qp) & in_layer_window(qp, kp, int(lwin or 0))
    a = torch.softmax(s.masked_fill(~vis, -math.inf), dim=-1).nan_to_num(0.0)
    nq = (qpos >= 0).sum(dim=1).clamp(min=1).view(B, 1, 1)
    return (a.sum(dim=2) / nq).amax(dim=1)


SCORERS = ("obs", "context")  # how select heads score tokens: the chunk's last queries, or query-agnostic


def context_scores(q: torch.Tensor, k: torch.Tensor, kpos: torch.Tensor, qpos: torch.Tensor,
                   scale: float, lwin: int = 0, block: int = 256) -> torch.Tensor:
    """SELECT's query-agnostic token scores (the ``context`` scorer): how much any query of the chunk, shown
    every held key as a reader of the whole text would be, attends to each key.

    A context-reconstruction scorer (KVzip) re-reads the text after itself, so that copying token t makes a
    query like the one token t had, now facing every key, before or after t. The chunk's own queries stand in
    for that second pass: each one's softmax runs over all held keys (not causal; inside the layer's window
    measured both ways), and a key's score is the most any query gives it, the group's heads taking the
    maximum, then max-pooled over ``POOL`` positions as ``select_scores`` does. q: (B, G, Lq, D) with
    positions qpos (B, Lq) (-1 = padding); k, kpos as in ``select_scores``. Computed ``block`` queries at a
    time. Returns (B, M) float32, -inf where kpos is -1."""
    B, M = kpos.shape
    kp = kpos[:, None, None, :].long()
    kf = k.float()
    sc = torch.zeros(B, M, dtype=torch.float32, device=k.device)
    for a in range(0, q.shape[2], block):
        qb, qp = q[:, :, a:a + block].float(), qpos[:, None, a:a + block, None].long()
        s = torch.einsum("bgod,bmd->bgom", qb, kf) * scale
        vis = (kp >= 0) & (qp >= 0) & in_layer_window(torch.maximum(qp, kp), torch.minimum(qp, kp), int(lwin or 0))
        pr = torch.softmax(s.masked_fill(~vis, -math.inf), dim=-1).nan_to_num(0.0)
        sc = torch.maximum(sc, pr.amax(dim=(1, 2)))
    return _pooled(sc, kpos)


def _pooled(sc: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Max-pool scores (B, M) over ``POOL`` neighbouring positions, plus ``POOL_TIE`` times each own score."""
    order = kpos.long().masked_fill(kpos < 0, -1).argsort(dim=1)  # pool along positions
    srt = sc.gather(1, order)
    pooled = torch.nn.functional.max_pool1d(srt[:, None], POOL, stride=1, padding=POOL // 2)[:, 0]
    out = torch.empty_like(sc).scatter_(1, order, pooled) + POOL_TIE * sc  # on a pooled plateau, the peaks first
    return out.masked_fill(kpos < 0, -math.inf)


def select_keep(n, keep_alpha, keep_beta_q):
    """SELECT's number of selected tokens K(n) after n tokens (ints or int tensors)."""
    return keep_alpha + (keep_beta_q * n) // BETA_SCALE
