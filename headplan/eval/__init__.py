"""Evaluation: the plan against the dense model, on held-out samples, in the same run.

- perplexity (dense and plan) on the tail of held-out text, KL(dense || plan) and top-1 agreement of
  next-token distributions;
- retrieval accuracy over a length x depth grid — passkey, multi-key passkey (``multikey``: four keys,
  one asked), needle-in-a-haystack, key->value lines: greedy generation through each plan's per-head
  KV cache, dense accuracy measured alongside on the same samples;
- a few greedy continuations side by side;
- several plans in one run (the plan and its baselines at the same budget, see ``baselines``);
- the plan's attention density and KV share at each evaluated length, and KV bytes.
"""

from .driver import (GEN_ROOM, GRID_TASKS, _generate, _logits, _plan_budget, answer_nll, evaluate,
                     logits, method_info, spec_for)
from .scoring import hit, mean_nll, perplexity, summed_kl, summed_nll, top1_agreements

__all__ = ["GEN_ROOM", "GRID_TASKS", "answer_nll", "evaluate", "hit", "logits", "mean_nll", "method_info",
           "perplexity", "spec_for", "summed_kl", "summed_nll", "top1_agreements"]
