"""A per-head KV cache: each KV head keeps only what its pattern needs.

All KV heads of a layer live in one packed buffer ``k_buf/v_buf (B, S, D)``; KV head h owns slots
``[off[h], off[h] + cap[h])`` and ``slot_pos (B, S)`` holds the logical position stored in each slot
(-1 = empty). Full (and dynamic, strided) heads store position p in slot p of their region; streaming
heads keep a sink region and a ring buffer of the window, slot ``sink + (p - sink) % ring``; select
heads lay out sink and ring the same way, followed by ``keep`` slots that hold the tokens each chunk's
selection keeps (``_select_commit``; kernels.patterns SELECT); skip heads hold nothing. The ring is sized for the largest window up to ``max_length`` and regrown
(re-placing slots by position) if the sequence outgrows it.

The layer is used through transformers' Cache API: ``update`` returns the new key/value states
unchanged, the key tensor carrying the layer in a slot (``pending_layer`` takes it off), and the
attention function attends over the retained slots plus the new tokens and then calls ``commit`` to
write them (evicting what no future query can see).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kernels import patterns as P
from . import backend

_SLOT = "_headplan_layer"  # on the key tensor update() returns: the layer that will commit it


def pending_layer(key_states: torch.Tensor) -> "HeadplanLayer | None":
    """The cache layer whose update() returned ``key_states`` (taken off the tensor), else None."""
    return key_states.__dict__.pop(_SLOT, None)


class HeadplanLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, table: torch.Tensor, max_length: int, grow: bool = True, scorer: str = "obs"):
        super().__init__()
        if scorer not in P.SCORERS:
            raise ValueError(f"select scorer must be one of {', '.join(P.SCORERS)}, got {scorer!r}")
        self.grow = grow
        self.scorer = scorer  # select heads: "obs" (the chunk's last queries) or "context" (query-agnostic)
        self.table = table.cpu()  # (Hkv, NCOLS) int32
        self.max_length = int(max_length)
        self.seen = 0  # slots processed (padding included): what transformers calls the cache length
        self.n_logical: torch.Tensor | None = None  # (B,) real tokens seen per sequence
        self.slot_pos: torch.Tensor | None = None
        self.k_buf = self.v_buf = None
        self._layout(self.max_length)

    # -- layout --------------------------------------------------------------------------------
    def _cap(self, h: int, max_len: int) -> tuple[int, int, int]:
        """(capacity, ring, ring's sink) of KV head h for sequences up to max_len tokens.

        In a sliding layer (window w) no head keeps more than w tokens: a head that would is a plain
        ring of the last w tokens (what transformers' sliding cache layer keeps)."""
        t = self.table[h].tolist()
        kind, lw = t[P.C_KIND], t[P.C_LWIN]
        if kind == P.SKIP:
            return 0, 0, 0
        cap, ring, sink = max_len, 0, 0
        if kind == P.SELECT:
            sink, ring = t[P.C_SINK], max(1, t[P.C_ALPHA])
            cap = sink + ring + int(P.select_keep(max_len, t[P.C_KEEP], t[P.C_KEEPB]))
            if cap >= max_len:
                cap, ring, sink = max_len, 0, 0  # keeps everything: store like a full head
        if kind == P.STREAMING:
            sink = t[P.C_SINK]
            ring = max(1, int(P.window(t[P.C_ALPHA], t[P.C_BETA], max_len + 1)))
            if sink + ring >= max_len:
                cap, ring, sink = max_len, 0, 0  # the window covers everything: store like a full head
            else:
                cap = sink + ring
        if lw and cap > lw:
            return lw, lw, 0
        return cap, ring, sink

    def _layout(self, max_len: int):
        lay = [self._cap(h, max_len) for h in range(self.table.shape[0])]
        self.cap = [c for c, _, _ in lay]
        self.ring = [r for _, r, _ in lay]
        self.sink = [s for _, _, s in lay]  # where each ring starts (sink slots come first)
        # select heads that really select (ring and keep slots after it); others are plain rings or full
        self.keep = [c - r - s if r and int(self.table[h, P.C_KIND]) == P.SELECT else 0
                     for h, (c, r, s) in enumerate(lay)]
        self.off = [0]
        for c in self.cap[:-1]:
            self.off.append(self.off[-1] + c)
        self.total = sum(self.cap)
        self.layout_len = max_len

    def head_off(self, device) -> torch.Tensor:
        return self._dev_tensor("off", device)

    def head_cap(self, device) -> torch.Tensor:
        return self._dev_tensor("cap", device)

    def _dev_tensor(self, name: str, device) -> torch.Tensor:
        key = (name, str(device), self.layout_len)
        cache = self.__dict__.setdefault("_dev", {})
        if key not in cache:
            cache.clear() if len(cache) > 8 else None
            cache[key] = torch.tensor(getattr(self, name), dtype=torch.int32, device=device)
        return cache[key]

    def valid_len(self) -> torch.Tensor:
        """(B, Hkv) int32: slots in use per head region (full heads fill from slot 0; rings may be full)."""
        cap = self.head_cap(self.n_logical.device).long()
        ring = self._dev_tensor("ring", self.n_logical.device) > 0
        used = torch.minimum(self.n_logical[:, None], cap[None, :])
        return torch.where(ring[None, :], cap[None, :], used).to(torch.int32)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        # one extra "trash" slot at the end (never inside a head's region) takes writes of skip heads
        self.k_buf = torch.zeros(B, self.total + 1, D, dtype=key_states.dtype, device=key_states.device)
        self.v_buf = torch.zeros(B, self.total + 1, value_states.shape[-1], dtype=value_states.dtype,
                                 device=value_states.device)
        self.slot_pos = torch.full((B, self.total + 1), -1, dtype=torch.int32, device=key_states.device)
        self.n_logical = torch.zeros(B, dtype=torch.int64, device=key_states.device)
        self.is_initialized = True

    def _grow(self, need: int):
        new_len = max(need, 2 * self.layout_len)
        old = (self.k_buf, self.v_buf, self.slot_pos, list(self.off), list(self.cap))
        self._layout(new_len)
        B = old[0].shape[0]
        k_buf = old[0].new_zeros(B, self.total + 1, old[0].shape[-1])
        v_buf = old[1].new_zeros(B, self.total + 1, old[1].shape[-1])
        slot_pos = old[2].new_full((B, self.total + 1), -1)
        self.k_buf, self.v_buf, self.slot_pos = k_buf, v_buf, slot_pos
        for h in range(len(self.cap)):
            o, c = old[3][h], old[4][h]
            if c == 0:
                continue
            if self.keep[h]:  # the kept slots move as they are (the keep region only grows)
                a, ka = self.off[h] + self.sink[h] + self.ring[h], o + self.sink[h] + self.ring[h]
                n = c - self.sink[h] - self.ring[h]
                for new_t, old_t in zip((k_buf, v_buf, slot_pos), old[:3]):
                    new_t[:, a:a + n] = old_t[:, ka:ka + n]
                c = self.sink[h] + self.ring[h]
            pos = old[2][:, o:o + c].long()
            self._scatter(h, pos, old[0][:, o:o + c], old[1][:, o:o + c], pos >= 0)

    # -- writing -------------------------------------------------------------------------------
    def _slots(self, h: int, pos: torch.Tensor) -> torch.Tensor:
        sink = self.sink[h]
        if self.ring[h] == 0:
            return pos
        return torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, self.ring[h]))

    def _scatter(self, h, pos, k, v, valid):
        """Write tokens (B, n) at logical positions pos into head h's region where valid."""
        o = self.off[h]
        if self.ring[h]:
            # only the newest `ring` tokens of each row can survive: keep writes unique
            pmax = torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)
            sink = self.sink[h]
            valid = valid & ((pos < sink) | (pos > pmax - self.ring[h]))
        slots = self._slots(h, pos.clamp(min=0)) + o
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        s = slots[b_idx, t_idx]
        self.k_buf[b_idx, s] = k[b_idx, t_idx].to(self.k_buf.dtype)
        self.v_buf[b_idx, s] = v[b_idx, t_idx].to(self.v_buf.dtype)
        self.slot_pos[b_idx, s] = pos[b_idx, t_idx].to(torch.int32)

    def commit(self, key_states: torch.Tensor, value_states: torch.Tensor, pos: torch.Tensor,
               obs=None) -> None:
        """Store new tokens. key/value (B, Hkv, n, D); pos (B, n) logical positions, -1 = padding.

        ``obs``: (query (B, Hq, Lq, D), its positions (B, Lq), scale) of the chunk, for the selection of
        select heads (without it they keep only sink and ring)."""
        valid = pos >= 0
        need = int(pos.max()) + 1 if valid.any() else 0
        if need > self.layout_len:
            if not self.grow:
                raise ValueError(f"headplan cache was sized for {self.layout_len} tokens, the sequence needs {need}; "
                                 "make it with a larger max_length (or grow=True)")
            self._grow(need)
        n_after = self.n_logical + valid.sum(dim=1)
        for h in range(len(self.cap)):
            if self.keep[h] and obs is not None:
                self._select_commit(h, pos, key_states[:, h], value_states[:, h], n_after, obs)
            elif self.cap[h]:
                self._scatter(h, pos, key_states[:, h], value_states[:, h], valid)
        self.n_logical += valid.sum(dim=1)  # in place: a captured decode graph reads this buffer

    def _select_commit(self, h: int, pos, k, v, n_after, obs) -> None:
        """A select head's chunk: of what it held and the chunk, keep the sink, the last ``ring`` tokens and
        the K(n) others the chunk's observation queries score highest (kernels.patterns.select_scores)."""
        query, qpos, scale = obs
        o, c, ring, sink = self.off[h], self.cap[h], self.ring[h], self.sink[h]
        kb, vb, pb = self.head_view(h)
        pool_k, pool_v = torch.cat([kb, k.to(kb.dtype)], 1), torch.cat([vb, v.to(vb.dtype)], 1)
        pool_p = torch.cat([pb.long(), pos.long()], 1)  # (B, M), -1 = empty or padding
        G = query.shape[1] // len(self.cap)
        if self.scorer == "context":
            sc = P.context_scores(query[:, h * G:(h + 1) * G], pool_k, pool_p, qpos, scale,
                                  int(self.table[h, P.C_LWIN]))
        else:
            O = min(P.OBS, query.shape[2])
            sc = P.select_scores(query[:, h * G:(h + 1) * G, -O:], pool_k, pool_p, qpos[:, -O:], scale,
                                 int(self.table[h, P.C_LWIN]))
        t = self.table[h]
        K = torch.clamp(P.select_keep(n_after, int(t[P.C_KEEP]), int(t[P.C_KEEPB])), max=self.keep[h])
        near = (pool_p >= 0) & ((pool_p < sink) | (pool_p >= (n_after - ring)[:, None]))
        cand = (pool_p >= 0) & ~near
        top = sc.masked_fill(~cand, -torch.inf).topk(min(self.keep[h], sc.shape[1]), dim=1)
        chosen = (torch.arange(top.indices.shape[1], device=sc.device)[None] < K[:, None]) & \
            torch.isfinite(top.values)
        self.slot_pos[:, o:o + c] = -1
        self._scatter(h, pool_p, pool_k, pool_v, near)
        a = o + sink + ring
        idx = top.indices[:, :self.keep[h]]
        pick = lambda t_: t_.gather(1, idx[..., None].expand(-1, -1, t_.shape[-1]))  # noqa: E731
        n = idx.shape[1]
        self.k_buf[:, a:a + n] = pick(pool_k)
        self.v_buf[:, a:a + n] = pick(pool_v)
        self.slot_pos[:, a:a + n] = torch.where(chosen, pool_p.gather(1, idx), -1).to(self.slot_pos.dtype)

    def commit_contiguous(self, key_states: torch.Tensor, value_states: torch.Tensor, obs=None) -> None:
        """First prefill without padding: tokens 0..n-1 of every row. Slice copies, no host sync (select heads
        excepted: their selection, given ``obs`` as in ``commit``)."""
        n = key_states.shape[2]
        if n > self.layout_len or (obs is not None and any(self.keep)):
            return self.commit(key_states, value_states,
                               torch.arange(n, device=key_states.device).expand(key_states.shape[0], n), obs)
        dev = key_states.device
        for h, (o, c, ring, sink) in enumerate(zip(self.off, self.cap, self.ring, self.sink)):
            if c == 0:
                continue
            if ring == 0:
                self.k_buf[:, o:o + n] = key_states[:, h]
                self.v_buf[:, o:o + n] = value_states[:, h]
                self.slot_pos[:, o:o + n] = torch.arange(n, device=dev, dtype=torch.int32)
                continue
            s = min(sink, n)
            self.k_buf[:, o:o + s] = key_states[:, h, :s]
            self.v_buf[:, o:o + s] = value_states[:, h, :s]
            self.slot_pos[:, o:o + s] = torch.arange(s, device=dev, dtype=torch.int32)
            lo = max(sink, n - ring)
            if lo < n:
                p = torch.arange(lo, n, device=dev)
                slots = o + sink + torch.remainder(p - sink, ring)
                self.k_buf.index_copy_(1, slots, key_states[:, h, lo:n])
                self.v_buf.index_copy_(1, slots, value_states[:, h, lo:n])
                self.slot_pos.index_copy_(1, slots, p.to(torch.int32).expand(self.slot_pos.shape[0], -1).contiguous())
        self.n_logical += n

    def commit_one(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Decode step: store one token per row (k, v (B, Hkv, D)) at position n_logical, for every head
        in one write (a Triton kernel on CUDA). ``valid`` (B,) marks real tokens (None = all).
        Returns valid_len (B, Hkv): slots in use per head region. ``n_logical`` still holds the new
        token's position afterwards (the decode attention reads it): ``advance_one`` moves it on.

        No host synchronisation and no allocation that outlives the step: a CUDA graph can capture it."""
        if self.seen > self.layout_len:
            if not self.grow:
                raise ValueError(f"headplan cache was sized for {self.layout_len} tokens, the sequence needs "
                                 f"{self.seen}; make it with a larger max_length (or grow=True)")
            self._grow(self.seen)
        dev = k.device
        return backend.commit_decode(k, v, self.k_buf, self.v_buf, self.slot_pos, self.n_logical, valid,
                                     self.head_off(dev), self.head_cap(dev), self._dev_tensor("ring", dev),
                                     self._dev_tensor("sink", dev))

    def advance_one(self, valid: torch.Tensor | None) -> None:
        """After the decode attention: count the step's token (in place, so a captured graph sees it)."""
        if valid is None:
            self.n_logical += 1
        else:
            self.n_logical += valid.long()

    def clear(self) -> None:
        """Empty the cache but keep its buffers (and their addresses, which a captured decode graph holds)."""
        self.seen = 0
        if self.is_initialized:
            self.k_buf.zero_()
            self.v_buf.zero_()
            self.slot_pos.fill_(-1)
            self.n_logical.zero_()

    # -- reading -------------------------------------------------------------------------------
    def head_view(self, h: int):
        o, c = self.off[h], self.cap[h]
        return self.k_buf[:, o:o + c], self.v_buf[:, o:o + c], self.slot_pos[:, o:o + c]

    # -- Cache API -----------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.k_buf.shape[0]:
            raise ValueError(f"headplan cache was sized for batch {self.k_buf.shape[0]}, got batch "
                             f"{key_states.shape[0]}; make a new cache (headplan.new_cache) for this batch")
        elif key_states.dtype != self.k_buf.dtype or key_states.device != self.k_buf.device:
            raise ValueError(f"headplan cache holds {self.k_buf.dtype} on {self.k_buf.device}, got "
                             f"{key_states.dtype} on {key_states.device}")
        if key_states.shape[1] != len(self.cap):
            raise ValueError(f"headplan cache layer has {len(self.cap)} KV heads, got {key_states.shape[1]}")
        setattr(key_states, _SLOT, self)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        # while update() has run but the attention has not, `seen` already counts the new tokens
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.k_buf.numel() * self.k_buf.element_size() + self.v_buf.numel() * self.v_buf.element_size()

    def reset(self) -> None:
        self.seen = 0
        self.k_buf = self.v_buf = self.slot_pos = self.n_logical = None
        self.is_initialized = False
        self._layout(self.max_length)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("HeadplanLayer.crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if any(self.ring):
            raise ValueError("cannot crop a headplan cache with streaming heads: evicted tokens are gone")
        new_n = self.n_logical - n
        self.slot_pos = torch.where(self.slot_pos.long() >= new_n[:, None], torch.full_like(self.slot_pos, -1),
                                    self.slot_pos)
        self.n_logical.copy_(new_n)
        self.seen -= n

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in ("k_buf", "v_buf", "slot_pos", "n_logical"):
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for name in ("k_buf", "v_buf", "slot_pos", "n_logical"):
                setattr(self, name, getattr(self, name)[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in ("k_buf", "v_buf", "slot_pos", "n_logical"):
                t = getattr(self, name)
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))


class HeadplanCache(Cache):
    """One HeadplanLayer per decoder layer, built from the compiled plan's head tables."""

    def __init__(self, tables: list[torch.Tensor], max_length: int, grow: bool = True, scorer: str = "obs"):
        super().__init__(layers=[HeadplanLayer(t, max_length, grow, scorer) for t in tables])

    def clear(self) -> None:
        """Empty every layer, keeping the buffers (see ``HeadplanLayer.clear``)."""
        for layer in self.layers:
            layer.clear()

    def kv_bytes(self) -> int:
        """Bytes the K/V buffers hold: the model's dtype, preallocated for max_length tokens (kv_report
        predicts the plan's share at one length, in the dtype it is given)."""
        return sum(layer.kv_bytes() for layer in self.layers)
