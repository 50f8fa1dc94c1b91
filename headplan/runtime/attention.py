"""The attention function registered with transformers' AttentionInterface as "headplan"."""

from __future__ import annotations

import torch

from ..errors import HeadplanError
from . import backend
from .cache import HeadplanLayer, pending_layer
from .state import ATTR

NAME = "headplan"


class LayerRuntime:
    """What one attention module needs at run time: its head table (cached per device)."""

    def __init__(self, table: torch.Tensor, block: int, patterns=(), cost=None):
        from ..kernels import patterns as P

        self.table = table.cpu()
        self.block = block
        self.lwin = int(self.table[0, P.C_LWIN]) if len(self.table) else 0  # the layer's own sliding window
        # every head full in a global layer: the model's own causal attention (dense SDPA is the same)
        self.all_full = bool(torch.isin(self.table[:, P.C_KIND], torch.tensor([P.FULL, P.SELECT])).all()) and self.lwin == 0
        self.dense_below = 0  # CUDA prompts shorter than this run dense SDPA (opt-in; see README)
        self.route = backend.FullRoute(patterns, block, self.lwin, cost)  # full heads to the dense library?
        self._on: dict = {}

    def table_on(self, device) -> torch.Tensor:
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = self.table.to(device)
        return t


def _valid_keys(mask, B: int, Lk: int, device) -> torch.Tensor:
    """(B, Lk) bool: key slots that are real tokens (the last query row of a causal mask sees them all)."""
    if mask is None:
        return torch.ones(B, Lk, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, -Lk:]
    if row.dtype != torch.bool:
        row = row == 0
    return row.expand(B, Lk)


def _positions(valid: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    pos = valid.long().cumsum(dim=1) - 1
    if start is not None:
        pos = pos + start.view(-1, 1)
    return torch.where(valid, pos, torch.full_like(pos, -1))


def _left_pad(valid: torch.Tensor) -> torch.Tensor | None:
    """Pad counts if ``valid`` is a left-padding pattern (True after a prefix of False), else None."""
    B, L = valid.shape
    pad = L - valid.sum(dim=1)
    if not bool((valid == (torch.arange(L, device=valid.device)[None, :] >= pad[:, None])).all()):
        return None
    return pad


def headplan_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    B, Hq, Lq, D = query.shape
    scale = float(scaling) if scaling is not None else D ** -0.5
    rt: LayerRuntime | None = module.__dict__.get(ATTR)
    layer: HeadplanLayer | None = pending_layer(key)
    if rt is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if layer is not None:  # a headplan cache on a module without a plan cannot happen via apply()
            raise RuntimeError("headplan cache used on a layer that has no plan")
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    table = rt.table_on(query.device)
    Lk = key.shape[2]
    own = kwargs.get("sliding_window")
    if int(own or 0) != rt.lwin:
        raise HeadplanError(f"layer {getattr(module, 'layer_idx', '?')}: the model attends with sliding window "
                            f"{own}, the plan was made for {rt.lwin or 'none'}")
    if kwargs.get("softcap"):
        raise HeadplanError("attention logit softcapping is not supported by headplan's runtime")

    if layer is None or layer.seen == Lk:
        # keys are exactly the sequence so far (no cache, a DynamicCache, or a first prefill)
        if attention_mask is None and Lq == Lk:  # no padding: no host synchronisation on this path
            if rt.all_full or (query.is_cuda and Lk < rt.dense_below and not rt.lwin):
                out = backend.dense_causal(query, key, value, scale)
            else:
                out = backend.prefill(query, key, value, table, scale, pad=None, block=rt.block, route=rt.route)
            if layer is not None:
                obs = (query, torch.arange(Lq, device=query.device).expand(B, Lq), scale) if any(layer.keep) else None
                layer.commit_contiguous(key, value, obs)
            return out.transpose(1, 2).contiguous(), None
        if Lq != Lk and rt.lwin and layer is None:
            raise HeadplanError("a sliding-window layer's transformers cache drops old tokens, so their positions are "
                                "unknown: decode a patched model through headplan's cache (generate(), or "
                                "past_key_values=headplan.new_cache(model))")
        valid = _valid_keys(attention_mask, B, Lk, query.device)
        kpos = _positions(valid)
        qpos = kpos[:, Lk - Lq:]
        pad = _left_pad(valid) if Lq == Lk else None
        if Lq == Lk and pad is not None and not bool(pad.any()) and rt.all_full:
            # every head full and no padding: dense causal SDPA is the same computation, and faster
            out = backend.dense_causal(query, key, value, scale)
        elif Lq == Lk and pad is not None:
            out = backend.prefill(query, key, value, table, scale, pad=pad if bool(pad.any()) else None,
                                  block=rt.block, route=rt.route)
        else:
            out = backend.attend(query, key, value, qpos, kpos, table, scale, rt.block)
        if layer is not None:
            layer.commit(key, value, kpos, (query, qpos, scale))
    else:
        if Lq == 1:
            valid1 = None if attention_mask is None else _valid_keys(attention_mask, B, 1, query.device)[:, 0]
            vlen = layer.commit_one(key[:, :, 0], value[:, :, 0], valid1)
            out = backend.decode(query[:, :, 0], layer.k_buf, layer.v_buf, layer.slot_pos,
                                 layer.head_off(query.device), layer.head_cap(query.device), layer.n_logical,
                                 table, scale, valid_len=vlen, max_cap=max(layer.cap))[:, :, None]
            layer.advance_one(valid1)
        else:
            valid = _valid_keys(attention_mask, B, Lq, query.device)
            qpos = _positions(valid, layer.n_logical)
            out = _chunk(layer, query, key, value, qpos, table, scale, rt.block)
            layer.commit(key, value, qpos, (query, qpos, scale))
    return out.transpose(1, 2).contiguous(), None


def _chunk(layer: HeadplanLayer, query, key, value, qpos, table, scale, block):
    """Queries of a later prefill chunk attend to each head's retained slots plus the chunk."""
    B, Hkv, Lq, D = key.shape
    width = max([c for c in layer.cap] + [0])
    k_all = key.new_zeros(B, Hkv, width + Lq, D)
    v_all = value.new_zeros(B, Hkv, width + Lq, value.shape[-1])
    kpos = torch.full((B, Hkv, width + Lq), -1, dtype=torch.long, device=key.device)
    for h in range(Hkv):
        kb, vb, pb = layer.head_view(h)
        c = kb.shape[1]
        k_all[:, h, :c], v_all[:, h, :c], kpos[:, h, :c] = kb, vb, pb.long()
    k_all[:, :, width:], v_all[:, :, width:] = key, value
    kpos[:, :, width:] = qpos[:, None, :]
    return backend.attend(query, k_all, v_all, qpos, kpos, table, scale, block)
