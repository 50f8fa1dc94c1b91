"""The attention function the model runs while profiling: it hands each layer's Q, K, V (and, for the
gradient signal, dL/dO from the backward) to the active statistics, and otherwise runs dense SDPA."""

from __future__ import annotations

import torch

from ..candidates import Candidate
from ..errors import HeadplanError
from .stats import Stats

ROW_BLOCK = 256
_ATTN_NAME = "headplan_profile"


class _State:
    stats: Stats | None = None
    grad: bool = False


_STATE = _State()


class _Collector(Stats):
    """Recall-only statistics (kept for callers of the first profiler): ``.layer(l, q, k, scale)``."""

    def __init__(self, candidates: list[Candidate], n_layers: int, n_kv: int, block: int):
        super().__init__(candidates, n_layers, n_kv, block, ("recall",))

    @property
    def loss(self) -> torch.Tensor:
        return self.acc["recall"]

    def layer(self, layer_idx, q, k, scale, v=None, dout=None):  # noqa: D102
        return super().layer(layer_idx, q, k, v, scale, dout)


def _sdpa(q, k, v, scale, lwin: int = 0):
    """The layer's own dense attention: causal, within its sliding window ``lwin`` (0 = none)."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    if not lwin:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(q.shape[2], device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < lwin), scale=scale)


class _GradAttention(torch.autograd.Function):
    """Causal SDPA whose backward first hands (q, k, v, dL/dO) to the active statistics."""

    @staticmethod
    def forward(ctx, q, k, v, scale, layer_idx, lwin):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        ctx.layer_idx = layer_idx
        ctx.lwin = lwin
        return _sdpa(q, k, v, scale, lwin)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        if _STATE.stats is not None:
            _STATE.stats.layer(ctx.layer_idx, q[0], k[0], v[0], ctx.scale, dout[0], lwin=ctx.lwin)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = _sdpa(qq, kk, vv, ctx.scale, ctx.lwin)
            dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), dout)
        return dq, dk, dv, None, None, None


def _profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = _STATE.stats
    if st is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]:
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        lwin = int(kwargs.get("sliding_window") or 0)  # the layer's own window: the dense reference
        if kwargs.get("softcap"):
            raise HeadplanError("attention logit softcapping is not supported by headplan")
        if _STATE.grad:
            out = _GradAttention.apply(query, key, value, scale, module.layer_idx, lwin)
            return out.transpose(1, 2).contiguous(), None
        st.layer(module.layer_idx, query[0].detach(), key[0].detach(), value[0].detach(), scale, lwin=lwin)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTN_NAME, _profile_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)
