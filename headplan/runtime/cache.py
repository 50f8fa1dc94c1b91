"""A per-head KV cache: each KV head keeps only what its pattern needs.

All KV heads of a layer live in one packed buffer ``k_buf/v_buf (B, S, D)``; KV head h owns slots
``[off[h], off[h] + cap[h])`` and ``slot_pos (B, S)`` holds the logical position stored in each slot
(-1 = empty). Full (and dynamic, strided) heads store position p in slot p of their region; streaming
heads keep a sink region and a ring buffer of the window, slot ``sink + (p - sink) % ring``; select
heads lay out sink and ring the same way, followed by ``keep`` slots that hold the tokens each chunk's
selection keeps (``_select``; kernels.patterns SELECT); skip heads hold nothing. The ring is sized for the largest window up to ``max_length`` and regrown
(re-placing slots by position) if the sequence outgrows it.

The layer is used through transformers' Cache API: ``update`` returns the new key/value states
unchanged, the key tensor carrying the layer in a slot (``pending_layer`` takes it off), and the
attention function attends over the retained slots plus the new tokens and then calls ``commit`` to
write them (evicting what no future query can see).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
            if t[P.C_SHARE]:  # a pooled budget: room for what the layer's pool may give this head
                cap = max_len if sink + ring < max_len else cap
            elif cap >= max_len:
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
        pool = [h for h, (c, r, s) in enumerate(lay) if r and c - r - s and int(self.table[h, P.C_SHARE]) == 1]
        if pool:  # AdaKV heads: each may hold up to the layer pool's total keep (its KV is the pool's, shared)
            tot = sum(int(P.select_keep(max_len, int(self.table[h, P.C_KEEP]), int(self.table[h, P.C_KEEPB])))
                      for h in pool)
            for h in pool:
                c, r, s = lay[h]
                lay[h] = (min(c, s + r + tot), r, s)
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
        sel = [h for h in range(len(self.cap)) if self.keep[h]] if obs is not None else []
        if sel:
            self._select(sel, pos, key_states, value_states, n_after, obs, fresh=False)
        for h in range(len(self.cap)):
            if self.cap[h] and h not in sel:
                self._scatter(h, pos, key_states[:, h], value_states[:, h], valid)
        self.n_logical += valid.sum(dim=1)  # in place: a captured decode graph reads this buffer

    def _select(self, hs: list[int], pos, key, value, n_after, obs, fresh: bool) -> None:
        """The select heads ``hs`` of a chunk, all at once: of what each held and the chunk, keep the sink, the
        last ``ring`` tokens and the K(n) others the chunk's queries score highest (kernels.patterns
        ``select_scores`` or ``context_scores``), or, for heads that pool their budget (``C_SHARE``), what the
        layer's pool gives them. One scoring call, one top-k and scatters: no host synchronisation.

        key/value (B, Hkv, n, D), pos (B, n) (-1 = padding), n_after (B,) tokens after the chunk. ``fresh``: the
        heads hold nothing yet (a first prefill), so the pool is the chunk alone."""
        query, qpos, scale = obs
        B, Hk, dev = key.shape[0], len(self.cap), key.device
        S, G = len(hs), query.shape[1] // len(self.cap)
        hi = torch.tensor(hs, device=dev)
        pk, pv = key[:, hi].to(self.k_buf.dtype), value[:, hi].to(self.v_buf.dtype)  # (B, S, n, D)
        pp = pos.long()[:, None].expand(B, S, -1)
        if not fresh:  # what each head holds, padded to the largest region (-1: empty), before the chunk
            m = max(self.cap[h] for h in hs)
            held = [[F.pad(t, (0, 0, 0, m - self.cap[h])) for t in self.head_view(h)[:2]] for h in hs]
            hp = torch.stack([F.pad(self.head_view(h)[2].long(), (0, m - self.cap[h]), value=-1) for h in hs], 1)
            pk = torch.cat([torch.stack([x[0] for x in held], 1), pk], 2)
            pv = torch.cat([torch.stack([x[1] for x in held], 1), pv], 2)
            pp = torch.cat([hp, pp], 2)
        M = pp.shape[2]
        flat = lambda t: t.reshape(B * S, *t.shape[2:])  # noqa: E731  heads as rows
        q = flat(query.reshape(B, Hk, G, *query.shape[2:])[:, hi])  # (B*S, G, Lq, D)
        qp, kp, lwin = flat(qpos[:, None].expand(B, S, -1)), flat(pp), int(self.table[hs[0], P.C_LWIN])
        O = min(P.OBS, q.shape[2])
        if self.scorer == "context":
            sc = P.context_scores(q, flat(pk), kp, qp, scale, lwin)
        else:
            sc = P.select_scores(q[:, :, -O:], flat(pk), kp, qp[:, -O:], scale, lwin)
        sc = sc.view(B, S, M)
        shares = self.table[hs, P.C_SHARE].tolist()  # host values: no synchronisation below
        col = self._select_cols(tuple(hs), dev)
        sink, ring, share, cap_k, off = col["sink"], col["ring"], col["share"], col["cap_k"], col["off"]
        own = P.select_keep(n_after[:, None], col["keep_a"][None], col["keep_b"][None])  # (B, S) own K(n)
        near = (pp >= 0) & ((pp < sink[None, :, None]) | (pp >= (n_after[:, None] - ring[None])[..., None]))
        score = sc.masked_fill(~((pp >= 0) & ~near), -torch.inf)
        K = torch.minimum(own, cap_k[None])
        if 1 in shares:
            score, K = self._pool_tokens(score, K, own, cap_k, share == 1, [self.keep[h] for h in hs])
        if 2 in shares:
            mass = P.observed_attention(q[:, :, -O:], flat(pk), kp, qp[:, -O:], scale, lwin).view(B, S, M)
            K = self._pool_heads(mass.masked_fill(~torch.isfinite(score), 0).sum(-1), torch.isfinite(score).sum(-1),
                                 K, own, cap_k, share == 2)
        kk = min(max(self.keep[h] for h in hs), M)
        top = score.topk(kk, dim=2)  # (B, S, kk)
        chosen = (torch.arange(kk, device=dev)[None, None] < K[..., None]) & torch.isfinite(top.values)
        for h in hs:
            self.slot_pos[:, self.off[h]:self.off[h] + self.cap[h]] = -1
        trash = self.total
        q0 = pp.clamp(min=0)
        ring_slot = torch.where(q0 < sink[None, :, None], q0, sink[None, :, None] + torch.remainder(
            q0 - sink[None, :, None], ring[None, :, None]))
        # the near tokens (at most sink + ring per head) taken out first: a scatter of every pool entry would
        # send all the others to the one trash slot, and writes to one address serialise
        nr = min(max(int(self.table[h, P.C_SINK]) + self.ring[h] for h in hs), M)
        ni = near.to(torch.float16).topk(nr, dim=2).indices  # (B, S, nr): the near entries first
        slots = torch.where(near.gather(2, ni), off[None, :, None] + ring_slot.gather(2, ni), trash)
        kslots = torch.where(torch.arange(kk, device=dev)[None] < cap_k[:, None],
                             (off + sink + ring)[:, None] + torch.arange(kk, device=dev)[None], trash)
        idx = top.indices
        take = lambda x, i: x.gather(2, i[..., None].expand(-1, -1, -1, x.shape[-1]))  # noqa: E731
        for buf, src in ((self.k_buf, pk), (self.v_buf, pv)):
            D = buf.shape[-1]
            buf.scatter_(1, slots.reshape(B, -1, 1).expand(-1, -1, D), take(src, ni).reshape(B, -1, D))
            buf.scatter_(1, kslots.reshape(1, -1, 1).expand(B, -1, D), take(src, idx).reshape(B, -1, D))
        self.slot_pos.scatter_(1, slots.reshape(B, -1), pp.gather(2, ni).reshape(B, -1).to(self.slot_pos.dtype))
        self.slot_pos.scatter_(1, kslots.reshape(1, -1).expand(B, -1),
                               torch.where(chosen, pp.gather(2, idx), -1).reshape(B, -1).to(self.slot_pos.dtype))
        self.slot_pos[:, trash] = -1

    def _select_cols(self, hs: tuple, device) -> dict:
        """Per select head of ``hs``, on ``device`` (made once per layout): sink, ring, share, keep rule, the keep
        region's size and the region's offset, each (S,) int64."""
        key = ("select", hs, str(device), self.layout_len)
        cache = self.__dict__.setdefault("_dev", {})
        if key not in cache:
            t = self.table[list(hs)].long()
            cols = {"sink": t[:, P.C_SINK], "share": t[:, P.C_SHARE], "keep_a": t[:, P.C_KEEP],
                    "keep_b": t[:, P.C_KEEPB], "ring": torch.tensor([self.ring[h] for h in hs]),
                    "cap_k": torch.tensor([self.keep[h] for h in hs]), "off": torch.tensor([self.off[h] for h in hs])}
            cache.clear() if len(cache) > 8 else None
            cache[key] = {k: v.to(device) for k, v in cols.items()}
        return cache[key]

    @staticmethod
    def _pool_tokens(score, K, own, cap_k, pool, caps):
        """AdaKV: the ``pool`` heads' budgets summed, their tokens competing by score across the heads, each head
        first given the top SHARE_FLOOR of its own K(n) (``caps``: the select heads' keep region sizes). Returns the scores with every token the pool does not
        keep at -inf, and each pooled head's K (its region: what it was given is what stays finite)."""
        sp = score[:, pool]  # (B, P, M)
        B, Pn, M = sp.shape
        floor = (own[:, pool] * P.SHARE_FLOOR).long()
        kf = int(max(caps) * P.SHARE_FLOOR)  # a bound on the floors from the host (``caps``: the regions' sizes)
        if kf:
            tf = sp.topk(min(kf, M), dim=2)
            first = torch.zeros_like(sp, dtype=torch.bool).scatter_(
                2, tf.indices, (torch.arange(tf.indices.shape[2], device=sp.device) < floor[..., None]))
            sp = torch.where(first & torch.isfinite(sp), sp + 1e4, sp)  # the floor wins every comparison
        total = own[:, pool].sum(1)  # (B,)
        tj = sp.reshape(B, -1).topk(min(sum(caps), Pn * M), dim=1)
        member = torch.zeros(B, Pn * M, dtype=torch.bool, device=sp.device).scatter_(
            1, tj.indices, (torch.arange(tj.indices.shape[1], device=sp.device)[None] < total[:, None])
            & torch.isfinite(tj.values)).view(B, Pn, M)
        score = score.clone()
        score[:, pool] = score[:, pool].masked_fill(~member, -torch.inf)
        K = K.clone()
        K[:, pool] = cap_k[pool][None].expand(B, -1)
        return score, K

    @staticmethod
    def _pool_heads(mass, count, K, own, cap_k, pool):
        """DuoAttention scored on the fly: the ``pool`` heads' budgets summed buy whole heads, in the order of
        the attention ``mass`` their observation queries put outside sink and ring; a head is bought while the
        budget covers at least half of its ``count`` candidate tokens. Bought heads keep every candidate (their
        region holds them all), the others only sink and ring. Returns K."""
        B = mass.shape[0]
        mp, cp = mass[:, pool], count[:, pool]
        order = mp.argsort(dim=1, descending=True)
        cost = cp.gather(1, order)
        before = cost.cumsum(1) - cost
        buy = (before + cost / 2) <= own[:, pool].sum(1, keepdim=True)
        bought = torch.zeros_like(buy).scatter_(1, order, buy)
        K = K.clone()
        K[:, pool] = torch.where(bought, cap_k[pool][None].expand(B, -1), 0)
        return K

    def commit_contiguous(self, key_states: torch.Tensor, value_states: torch.Tensor, obs=None) -> None:
        """First prefill without padding: tokens 0..n-1 of every row. Slice copies, no host sync (select heads
        excepted: their selection, given ``obs`` as in ``commit``)."""
        n = key_states.shape[2]
        dev = key_states.device
        if n > self.layout_len:
            return self.commit(key_states, value_states, torch.arange(n, device=dev).expand(key_states.shape[0], n),
                               obs)
        sel = [h for h in range(len(self.cap)) if self.keep[h]] if obs is not None else []
        if sel:
            self._select(sel, torch.arange(n, device=dev).expand(key_states.shape[0], n), key_states, value_states,
                         self.n_logical + n, obs, fresh=True)
        for h, (o, c, ring, sink) in enumerate(zip(self.off, self.cap, self.ring, self.sink)):
            if c == 0 or h in sel:
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
