"""Measured selection among candidate plans (MoA's last step: choose by a measured validation loss, not by
the profile's first-order estimate).

The profile scores each head alone, with every other head dense; the sum of those losses predicts
badly how much *perplexity* a whole plan costs once every head is sparse at once (on SmolLM2 the plan
with the lowest profiled lm loss had a worse perplexity than uniform windows). So a small family of plans
is searched from the same profile at the same budget, each is run on held-out validation samples, and
the rule picks:

    among the plans whose language-model loss (NLL per token on the second half of plain-text samples)
    is within ``tolerance`` (relative perplexity) of the best plan's, the one with the lowest answer NLL
    (teacher-forced reference answers of passkey / needle / key->value samples).

The family (``family``): ``search`` (the plain search, every kind), ``windows`` (sink + window only: the
MoA-style plan, the same as the ``moa`` baseline), and ``fullK`` (exactly K full heads, the rest windows:
DuoAttention's few retrieval heads, each K a point between the two). Validation samples come from their
own seeded mixture (``calibration_data/select.yaml``), apart from profiling's and eval's.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import HeadplanError
from ..plan import KINDS, Plan
from ..progress import Reporter

FULL_STEPS = (1, 2, 3, 4, 6, 8, 12, 16)


def family(base, steps=FULL_STEPS) -> dict:
    """name -> SearchSettings: the candidate plans' settings, all at ``base``'s budget and signals."""
    dyn = tuple(k for k in KINDS if k not in ("full", "streaming"))
    out = {"search": base,
           "windows": dataclasses.replace(base, exclude_kinds=tuple(k for k in KINDS if k != "streaming"))}
    for k in steps:
        out[f"full{k}"] = dataclasses.replace(base, exclude_kinds=dyn, full_heads=k)
    return out


def build_family(prof, base, profile_ref=None, steps=FULL_STEPS) -> dict[str, Plan]:
    """The family's plans; a member the budget cannot hold (too many full heads) is left out."""
    from ..search import search

    plans = {}
    for name, st in family(base, steps).items():
        try:
            plans[name] = search(prof, st, profile_ref)
        except HeadplanError:
            continue
    if not plans:
        raise HeadplanError("no candidate plan meets the budget")
    return plans


def validate(lm, plans: dict[str, Plan], spec: dict, lengths, texts=None, samples: int | None = None,
             reporter: Reporter | None = None) -> dict:
    """Dense and every plan on the validation mixture at ``lengths``: per method the mean lm NLL (nats per
    token over the scored tail) and the mean answer NLL (nats per answer token, averaged over samples)."""
    from ..data import Haystack, answer_options, load_texts, mixture_samples
    from ..runtime import apply, check_plan_fits, dense
    from . import _answer_nll, _logits

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
            for m in names:
                if m == "dense":
                    with dense(model):
                        v = _answer_nll(model, full, tgt)
                else:
                    apply(model, plans[m], check=False)
                    v = _answer_nll(model, full, tgt)
                if s.answer_ids:
                    ans[m].append(v)
                else:
                    lm_sum[m] += v * tgt.numel()
                advance()
    if not lm_tok or not ans["dense"]:
        raise HeadplanError("the validation mixture needs both lm and answered samples at every length "
                            "(raise --samples)")
    return {m: {"lm_nll": lm_sum[m] / lm_tok, "answer_nll": sum(ans[m]) / len(ans[m]),
                "ppl_vs_dense": math.exp((lm_sum[m] - lm_sum["dense"]) / lm_tok)} for m in names}


def check_tolerance(tolerance: float) -> None:
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise HeadplanError(f"--tolerance must be a non-negative number, got {tolerance}")


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


def choose(table: dict, tolerance: float) -> str:
    """The rule (module doc): lowest answer NLL among plans within ``tolerance`` of the best lm loss."""
    check_tolerance(tolerance)
    cands = {m: v for m, v in table.items() if m != "dense"}
    best = min(v["lm_nll"] for v in cands.values())
    ok = [m for m, v in cands.items() if v["lm_nll"] <= best + math.log1p(tolerance) + 1e-12]
    return min(ok, key=lambda m: (cands[m]["answer_nll"], cands[m]["lm_nll"], m))
