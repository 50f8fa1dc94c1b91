"""Scores of a method against dense on the same sample, from log-probabilities and generated text:
perplexity, summed token NLL, KL(dense || plan), top-1 agreement, teacher-forced answer NLL, retrieval hits."""

from __future__ import annotations

import math

import torch


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


def mean_nll(lp: torch.Tensor, tgt: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of ``tgt`` under ``lp``: the answer NLL."""
    return float(-lp.gather(1, tgt[:, None]).mean())


def perplexity(nll: float, count: int) -> float:
    """exp of the mean token NLL."""
    return math.exp(nll / count)
