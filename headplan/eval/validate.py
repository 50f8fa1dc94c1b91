"""Measured selection, the measuring half: dense and every candidate plan (``search.family``) on held-out
validation samples, and the checks on the arguments that needs (before any model loads)."""

from __future__ import annotations

import math

import torch

from ..errors import HeadplanError
from ..plan import Plan
from ..progress import Reporter
from ..search.family import check_tolerance



def validate(lm, plans: dict[str, Plan], spec: dict, lengths, texts=None, samples: int | None = None,
             reporter: Reporter | None = None) -> dict:
    """Dense and every plan on the validation mixture at ``lengths``: per method the mean lm NLL (nats per
    token over the scored tail) and the mean answer NLL (nats per answer token, averaged over samples)."""
    from ..data import Haystack, answer_options, load_texts, mixture_samples
    from ..runtime import check_plan_fits
    from .driver import answer_nll
    from .loop import MethodLoop

    rep = reporter or Reporter()
    model = lm.model
    for p in plans.values():
        check_plan_fits(model, p)
    _, reserve, tail = answer_options(spec)
    text, _ = load_texts(texts)
    hay = Haystack(lm.tokenizer, text)
    dev = next(model.parameters()).device
    sets = [s for n in lengths for s in mixture_samples(hay, spec, int(n), samples, reserve=reserve)]
    names = ["dense", *plans]
    lm_sum = {m: 0.0 for m in names}
    lm_tok = 0
    ans = {m: [] for m in names}
    with rep.task(f"validating dense + {len(plans)} candidate plan(s)", len(sets) * len(names)) as advance:
        for s in sets:
            if s.answer_ids:
                full = torch.tensor([list(s.input_ids) + list(s.answer_ids)], device=dev)
                tgt = full[0, -len(s.answer_ids):]
            else:
                full = torch.tensor([list(s.input_ids)], device=dev)
                start = int(full.shape[1] * (1 - tail))
                tgt = full[0, start + 1:]
                lm_tok += tgt.numel()
            for m, v in MethodLoop(model, plans, advance).each(lambda m: answer_nll(model, full, tgt)).items():
                if s.answer_ids:
                    ans[m].append(v)
                else:
                    lm_sum[m] += v * tgt.numel()
    if not lm_tok or not ans["dense"]:
        raise HeadplanError("the validation mixture needs both lm and answered samples at every length "
                            "(raise --samples)")
    return {m: {"lm_nll": lm_sum[m] / lm_tok, "answer_nll": sum(ans[m]) / len(ans[m]),
                "ppl_vs_dense": math.exp((lm_sum[m] - lm_sum["dense"]) / lm_tok)} for m in names}


def check_arguments(spec: dict, samples: int | None, tolerance: float) -> None:
    """Everything ``validate``/``choose`` would refuse that depends only on the arguments, checked before
    any model loads: the tolerance, the mixture's options, and that ``samples`` per length split into at
    least one plain-text (lm) sample and one answered sample."""
    from ..data import ANSWER_TASKS, answer_options, mixture_counts

    check_tolerance(tolerance)
    answer_options(spec)
    kinds = [t.get("task") for t in spec.get("tasks") or []]

    def both(n):
        counts = mixture_counts(spec, n)
        return all(sum(c for k, c in zip(kinds, counts) if k in want) for want in (("lm",), ANSWER_TASKS))

    n = sum(mixture_counts(spec, samples))
    if not both(n):
        need = next((m for m in range(n + 1, 1025) if both(m)), None)
        raise HeadplanError(f"--samples {n}: the validation mixture {spec.get('name', '')!r} needs both lm and "
                            "answered samples at every length" + (f"; pass --samples {need} or more" if need else ""))
