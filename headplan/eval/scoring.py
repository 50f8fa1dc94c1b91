"""Scores of a method against dense on the same sample: logits, perplexity (summed token NLL), KL(dense ||
plan), top-1 agreement, teacher-forced answer NLL, retrieval hits."""

from __future__ import annotations

import torch


@torch.no_grad()
def logits(model, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all when 0), float32."""
    try:
        out = model(ids, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(ids, use_cache=False)
    lg = out.logits[0]
    return (lg[-keep:] if keep else lg).float()


def answer_nll(model, full: torch.Tensor, tgt: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of the last ``len(tgt)`` tokens of ``full``,
    teacher-forced through whatever attention the model runs now."""
    lp = logits(model, full, len(tgt) + 1)[:-1].log_softmax(-1)
    return float(-lp.gather(1, tgt[:, None]).mean())


def summed_nll(lp: torch.Tensor, tgt: torch.Tensor) -> float:
    """Summed negative log-likelihood of the targets ``tgt`` under log-probabilities ``lp``."""
    return float(-lp.gather(1, tgt[:, None]).sum())


def summed_kl(ld: torch.Tensor, lp: torch.Tensor) -> float:
    """Summed KL(dense || plan) of next-token distributions, from log-probabilities."""
    return float((ld.exp() * (ld - lp)).sum())


def top1_agreements(top_d: torch.Tensor, lp: torch.Tensor) -> float:
    """How many positions' top-1 tokens agree with dense's ``top_d``."""
    return float((top_d == lp.argmax(-1)).sum())


def hit(answer: str, output: str) -> bool:
    """Retrieval accuracy of one case: the reference answer appears in the generated text."""
    return answer in output


_logits = logits  # the old private names (eval/select.py imports them until it moves)
_answer_nll = answer_nll
