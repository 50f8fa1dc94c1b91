"""Gate optimisation (DuoAttention's idea on headplan's candidates): which KV heads a whole plan can
least afford to make local, learned with every head sparse at once.

Each KV head h gets a gate g_h in [0, 1]; its attention output becomes

    g_h · dense_h + (1 - g_h) · local_h

where ``local`` is a sink + window pattern (the gate's *reference* candidate). The gates are trained
(Adam, the model's weights frozen) to keep the dense model's behaviour while a penalty pulls every gate
to 0: loss = KL(dense ‖ gated) over next-token distributions at sampled positions of the plain-text
samples, plus the teacher-forced NLL of the reference answers of the retrieval samples (passkey,
needle, ...), plus ``penalty`` · mean(g). Since every head is gated at once, a head's gate measures what
it is worth with the other heads sparse: the interaction the one-head-at-a-time signals cannot see.

The search needs a cost per (head, candidate), not one number per head: ``gate_loss`` scales each head's
recall profile (the attention mass each candidate drops) by its learned gate relative to the mass the
reference candidate drops, so the reference costs exactly g_h, a wider candidate less and a narrower one
more, and the MILP keeps its exact budget.
"""

from __future__ import annotations

import math

import torch

from ..candidates import Candidate
from ..errors import HeadplanError
from ..kernels import patterns as P

_ATTN_NAME = "headplan_gates"
KL_POSITIONS = 64  # positions per plain-text sample whose next-token distribution is distilled


class _GateState:
    gates: torch.Tensor | None = None  # (layers, KV heads) raw parameters; g = clamp(., 0, 1)
    low: list | None = None  # per layer: the (KV heads, NCOLS) head table of each head's sparse side


_STATE = _GateState()


def reference_candidate(candidates: list[Candidate], n: int) -> int:
    """Index of the gate's local side: the fixed sink + window candidate whose window is closest to n / 16
    (DuoAttention's streaming heads keep a sink and a short recent window)."""
    best, arg = None, None
    for i, c in enumerate(candidates):
        p = c.pattern
        if p.kind == "streaming" and p.window is not None and p.window.beta == 0 and p.sink > 0:
            d = abs(math.log(max(1, p.window.alpha) / (n / 16)))
            if best is None or d < best - 1e-12:
                best, arg = d, i
    if arg is None:
        raise HeadplanError("the gate signal needs a sink + window candidate (a fixed window) in the candidate set")
    return arg


def _gate_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from ..kernels.reference import prefill_ref
    from .hook import _sdpa

    if kwargs.get("softcap"):
        raise HeadplanError("attention logit softcapping is not supported by headplan")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    lwin = int(kwargs.get("sliding_window") or 0)
    G = query.shape[1] // key.shape[1]
    dense = _sdpa(query, key, value, scale, lwin)
    table = _STATE.low[module.layer_idx]
    if lwin:
        table = table.clone()
        table[:, P.C_LWIN] = lwin
    low = prefill_ref(query, key, value, table.to(query.device), scale, fused=True)
    g = _STATE.gates[module.layer_idx].clamp(0.0, 1.0).to(query.dtype)
    g = g.repeat_interleave(G)[None, :, None, None]
    out = g * dense + (1.0 - g) * low
    return out.transpose(1, 2).contiguous(), None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTN_NAME, _gate_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)


def _targets(model, seq, dev):
    """(ids, positions, dense log-probs at them or None, answer targets or None) of one calibration sequence."""
    ids = torch.tensor([seq.ids], device=dev)
    n_ans = len(seq.ids) - seq.loss_from
    if seq.meta.get("task") == "lm":
        tail = torch.arange(seq.loss_from - 1, len(seq.ids) - 1, device=dev)
        step = max(1, len(tail) // KL_POSITIONS)
        pos = tail[::step][:KL_POSITIONS]
        with torch.no_grad():
            ref = model(ids, use_cache=False, logits_to_keep=pos).logits[0].float().log_softmax(-1)
        return ids, pos, ref, None
    pos = torch.arange(seq.loss_from - 1, seq.loss_from - 1 + n_ans, device=dev)
    return ids, pos, None, ids[0, seq.loss_from:]


class _Gated:
    """The model with gated attention for the duration of a ``with``: the weights frozen, dense references of
    the sequences taken first with the model's own attention."""

    def __init__(self, lm, seqs: list, low_rows: list[list[dict]], init: torch.Tensor, targets: list | None = None):
        model = lm.model
        self.model = model
        self.dev = model.get_input_embeddings().weight.device
        if not seqs:
            raise HeadplanError("the gate signal needs calibration samples")
        if not any(s.meta.get("task") != "lm" for s in seqs):
            raise HeadplanError("the gate signal needs answered calibration samples (passkey, needle, ...) "
                                "in the data spec")
        self.targets = targets if targets is not None else dense_targets(lm, seqs)
        self.theta = init.detach().to(self.dev, torch.float32).clone().requires_grad_(True)
        self.low = [P.make_table(rows) for rows in low_rows]

    def __enter__(self):
        _register()
        self.prev = self.model.config._attn_implementation
        self.saved = {name: q.requires_grad for name, q in self.model.named_parameters()}
        for q in self.model.parameters():
            q.requires_grad_(False)
        _STATE.gates, _STATE.low = self.theta, self.low
        self.model.set_attn_implementation(_ATTN_NAME)
        return self

    def __exit__(self, *exc):
        _STATE.gates, _STATE.low = None, None
        self.model.set_attn_implementation(self.prev)
        for name, q in self.model.named_parameters():
            q.requires_grad_(self.saved.get(name, q.requires_grad))

    def fit_loss(self, t: int) -> torch.Tensor:
        """KL(dense || gated) per position of a plain-text sequence, or the answer NLL of an answered one."""
        ids, pos, dref, ans = self.targets[t]
        lp = self.model(ids, use_cache=False, logits_to_keep=pos).logits[0].float().log_softmax(-1)
        if dref is not None:
            return (dref.exp() * (dref - lp)).sum(-1).mean()
        return torch.nn.functional.nll_loss(lp, ans)


def train_gates(lm, seqs: list, low_rows: list[list[dict]], steps: int, lr: float = 0.05, penalty: float = 0.05,
                seed: int = 0, advance=None) -> tuple[torch.Tensor, list[float]]:
    """Train one gate per (layer, KV head) from 1 (dense) on the calibration sequences (``runner._Seq``: ids,
    loss_from, meta); ``low_rows[layer][head]``: the pattern row of each head's sparse side. Returns (gates
    (layers, KV heads) in [0, 1], the fit loss of each step). Deterministic for a seed."""
    ident = lm.identity
    init = torch.ones(ident.num_layers, ident.num_kv_heads)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    with _Gated(lm, seqs, low_rows, init) as run:
        opt = torch.optim.Adam([run.theta], lr=lr)
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(run.targets), generator=gen).tolist()
            with torch.enable_grad():
                fit = run.fit_loss(order.pop())
                loss = fit + penalty * run.theta.clamp(0.0, 1.0).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            with torch.no_grad():
                run.theta.clamp_(0.0, 1.0)
            losses.append(float(fit.detach()))
            if advance is not None:
                advance()
        return run.theta.detach().clamp(0.0, 1.0).cpu(), losses


def dense_targets(lm, seqs: list) -> list:
    """The dense references of the sequences (taken once; every round of plan in the loop reuses them)."""
    dev = lm.model.get_input_embeddings().weight.device
    return [_targets(lm.model, s, dev) for s in seqs]


def gate_gradients(lm, seqs: list, low_rows: list[list[dict]], at: torch.Tensor, advance=None,
                   targets: list | None = None) -> torch.Tensor:
    """What each head is worth at the operating point ``at`` (gates (layers, KV heads), 1 = dense, 0 = its
    sparse side): -dL/dg, the first-order loss a head saves by being dense rather than its sparse side, with
    every other head as ``at`` has it; L = the mean over sequences of their fit losses. (layers, KV heads)."""
    with _Gated(lm, seqs, low_rows, at, targets) as run:
        grad = torch.zeros_like(run.theta)
        for t in range(len(run.targets)):
            with torch.enable_grad():
                fit = run.fit_loss(t) / len(run.targets)
                g, = torch.autograd.grad(fit, run.theta)
            grad += g
            if advance is not None:
                advance()
        return (-grad).cpu()


def head_scaled_loss(weight: torch.Tensor, recall: torch.Tensor, low_idx: torch.Tensor) -> torch.Tensor:
    """(layers, KV heads, candidates, lengths) costs: each head's recall costs (the attention mass each
    candidate drops) divided by those of its sparse side ``low_idx`` (layers, KV heads) candidate (floored
    at 1% of the mean over heads, so a head that drops almost nothing there does not blow up), times its
    ``weight`` (a learned gate, or a measured worth): the sparse side costs exactly ``weight``, a wider
    candidate less, a narrower one more."""
    r = recall.double()
    idx = low_idx.long()[:, :, None, None].expand(-1, -1, 1, r.shape[-1])
    rlow = r.gather(2, idx)
    floor = (rlow.mean(dim=(0, 1), keepdim=True) * 0.01).clamp(min=1e-12)
    return weight.double().clamp(min=0.0)[:, :, None, None] * r / torch.maximum(rlow, floor)
