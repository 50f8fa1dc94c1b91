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


# Where no cost table with dense-library rates is known for the GPU (see :class:`FullRoute`): measured on one
# H200 (BENCHMARKS.md, "Prefill against the FlexAttention a user would write"), sending a layer's full KV heads
# to cuDNN on that head subset pays from ~16K tokens (32K, 2 full + 6 windowed heads: 6.87 ms vs 7.91) and
# costs below (8K: 1.09 vs 0.97).
ROUTE_FULL_FROM = 16384
_DENSE_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def dense_causal(q, k, v, scale: float):
    """Plain causal attention (every head full, in a global layer) with the fastest dense backend: on CUDA
    cuDNN first (1.7x flash at 32K on the H200), then flash; elsewhere torch's own choice."""
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [getattr(SDPBackend, n) for n in _DENSE_ORDER if hasattr(SDPBackend, n)]
        try:
            ctx = sdpa_kernel(order, set_priority=True)
        except TypeError:  # a torch without priorities: its default order
            ctx = None
        if ctx is not None:
            with ctx:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                        enable_gqa=gqa)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


_SPLITS: dict = {}


def split_heads(table, G: int, device):
    """(full query heads, full KV heads, other query heads, other KV heads, the others' table) of a layer
    whose full heads see plain causal attention (global layer), or None when it has none or only those."""
    from ..kernels import patterns as P

    key = (table.data_ptr(), table._version, G, str(device))
    hit = _SPLITS.get(key)
    if hit is None:
        rows = table.detach().cpu()
        full = [h for h in range(rows.shape[0]) if int(rows[h, P.C_KIND]) in (P.FULL, P.SELECT) and int(rows[h, P.C_LWIN]) == 0]
        rest = [h for h in range(rows.shape[0]) if h not in full]
        hit = None
        if full and rest:
            idx = lambda hs, g: torch.tensor([h * g + i for h in hs for i in range(g)], device=device)  # noqa: E731
            hit = (idx(full, G), idx(full, 1), idx(rest, G), idx(rest, 1), rows[rest].to(device).contiguous())
        if len(_SPLITS) > 64:
            _SPLITS.clear()
        _SPLITS[key] = hit
    return hit


def split_prefill(q, k, v, table, scale: float, block: int, fn, split=None):
    """The layer's full heads through :func:`dense_causal` on that head subset, the others through ``fn``
    (the sparse kernel): the same result as ``fn`` on every head, up to dtype tolerance."""
    fq, fk, rq, rk, rest = split or split_heads(table, q.shape[1] // k.shape[1], q.device)
    out = torch.empty_like(q)
    out[:, fq] = dense_causal(q[:, fq], k[:, fk], v[:, fk], scale)
    out[:, rq] = fn(q[:, rq], k[:, rk], v[:, rk], rest, scale, pad=None, block=block)
    return out


_DEVICE_TABLES: dict = {}


def device_cost_table(device, head_dim: int, group: int):
    """The cost table shipped for this GPU (``headplan/costmodel/devices/*.yaml``, matched on the device
    name), carried to this head_dim / group; None when none is shipped for it or it has no dense rates."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = (name, head_dim, group)
    if key not in _DEVICE_TABLES:
        from ..costmodel.table import shipped_tables

        tabs = [t for t in shipped_tables() if t.device.get("name") == name and t.dense_per_pair_ns > 0]
        tabs.sort(key=lambda t: (abs(t.head_dim - head_dim), abs(t.group - group)))
        _DEVICE_TABLES[key] = tabs[0].for_shape(head_dim, group) if tabs else None
    return _DEVICE_TABLES[key]


class FullRoute:
    """Per layer: whether an unpadded CUDA prefill of n tokens sends the layer's full heads to the dense
    library, decided from a cost table (``CostTable.routes_full``: the split layer's predicted time against
    the sparse kernel's): the one given to ``apply(cost_table=...)``, else the one shipped for this GPU, else
    the measured fixed rule ``n >= ROUTE_FULL_FROM``. Decisions are memoised per (n, head_dim, group)."""

    def __init__(self, patterns, block: int, lwin: int, cost=None):
        self.patterns = list(patterns)
        self.block, self.lwin, self.cost = block, lwin, cost
        kinds = {p.kind for p in self.patterns}
        self.possible = not lwin and "full" in kinds and len(kinds) > 1
        self._memo: dict = {}

    def source(self, device, head_dim: int, group: int) -> str:
        c = self._table(device, head_dim, group)
        return "fixed rule" if c is None else (c.device.get("name", "?") + " cost table")

    def _table(self, device, head_dim, group):
        if self.cost is not None:
            return self.cost.for_shape(head_dim, group)
        return device_cost_table(device, head_dim, group)

    def split(self, n: int, device, head_dim: int, group: int) -> bool:
        if not self.possible:
            return False
        key = (n, head_dim, group, str(device))
        hit = self._memo.get(key)
        if hit is None:
            c = self._table(device, head_dim, group)
            hit = n >= ROUTE_FULL_FROM if c is None else c.routes_full(self.patterns, n, self.block, self.lwin)
            if len(self._memo) > 256:
                self._memo.clear()
            self._memo[key] = hit
        return hit


def prefill(q, k, v, table, scale: float, pad=None, block: int = 64, route: FullRoute | None = None):
    """Self-attention prefill from an empty cache (q, k, v cover the same left-padded slots).

    On CUDA, unpadded prompts send the layer's full heads to :func:`dense_causal` on that head subset and
    the others to the sparse kernel (same result) where ``route`` (the layer's :class:`FullRoute`) says so;
    without one, from ``ROUTE_FULL_FROM`` tokens."""
    if _use_triton(q):
        fn = _kernel("prefill")
        if fn is not None:
            G = q.shape[1] // k.shape[1]
            split = None
            if pad is None:
                go = route.split(q.shape[2], q.device, q.shape[-1], G) if route is not None else \
                    q.shape[2] >= ROUTE_FULL_FROM
                split = split_heads(table, G, q.device) if go else None
            if split is None:
                return fn(q, k, v, table, scale, pad=pad, block=block)
            return split_prefill(q, k, v, table, scale, block, fn, split)
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


def decode_capturable(dtype: torch.dtype, head_dim: int, device) -> bool:
    """Whether the decode step's kernels (cache write and attention) run with no host synchronisation, so a
    CUDA graph can capture them: true exactly when :func:`decode` and :func:`commit_decode` pick Triton
    (the reference reads head offsets on the host)."""
    return (torch.device(device).type == "cuda" and not _reference_forced() and dtype in _SUPPORTED_DTYPES
            and head_dim in _SUPPORTED_DIMS and _kernel("decode") is not None)


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
