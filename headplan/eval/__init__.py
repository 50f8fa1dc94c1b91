"""Evaluation: the plan against the dense model, on held-out samples, in the same run.

- perplexity (dense and plan) on the tail of held-out text, KL(dense || plan) and top-1 agreement of
  next-token distributions;
- passkey (and optionally key->value) retrieval accuracy: greedy generation through the plan's
  per-head KV cache, dense accuracy measured alongside;
- the plan's attention density and KV share at each evaluated length, and KV bytes.
"""

from __future__ import annotations

import math
import random

import torch

from ..candidates import density, kv_share
from ..errors import HeadplanError
from ..plan import Plan
from ..report import Reporter


def _plan_budget(plan: Plan, n: int) -> tuple[float, float]:
    heads = [e.pattern for layer in plan.layers for e in layer]
    return (sum(density(p, n, plan.block_size) for p in heads) / len(heads),
            sum(kv_share(p, n) for p in heads) / len(heads))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits[0].float()


def _generate(model, ids: torch.Tensor, n_new: int, eos, mem: dict | None = None) -> list[int]:
    """Greedy continuation; records the KV bytes the cache really holds in ``mem`` (dense or plan)."""
    from transformers import DynamicCache

    from ..runtime import NAME, new_cache

    plan_mode = model.config._attn_implementation == NAME
    cache = new_cache(model, ids.shape[1] + n_new + 1) if plan_mode else DynamicCache()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=eos if eos is not None else 0, past_key_values=cache)
    if mem is not None:
        if plan_mode:
            b = cache.kv_bytes()
        else:
            b = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
                    if getattr(layer, "keys", None) is not None)
        key = "plan" if plan_mode else "dense"
        mem[key] = max(mem.get(key, 0), b)
    return out[0, ids.shape[1]:].tolist()


def evaluate(lm, plan: Plan, spec: dict, texts: list[str] | None = None, reporter: Reporter | None = None) -> dict:
    """Dense vs plan on the samples the eval spec describes. Returns a JSON-ready dict."""
    from ..data import Haystack, load_texts, make_sample
    from ..runtime import apply, check_plan_fits, dense, kv_report

    rep = reporter or Reporter()
    check_plan_fits(lm.model, plan)
    model = lm.model
    apply(model, plan)
    text, text_desc = load_texts(texts)
    hay = Haystack(lm.tokenizer, text)
    seed = int(spec.get("seed", 1000))
    dev = next(model.parameters()).device
    ppl_spec = spec.get("perplexity") or {}
    pk_spec = spec.get("passkey") or {}
    kvr_spec = spec.get("kv_retrieval") or {}
    for n in list(ppl_spec.get("lengths", [])) + list(pk_spec.get("lengths", [])) + list(kvr_spec.get("lengths", [])):
        if int(n) > plan.model.max_positions:
            raise HeadplanError(f"eval length {n} exceeds the model's {plan.model.max_positions} positions")
    results: dict = {"model": lm.spec, "plan_counts": plan.counts(), "texts": text_desc, "perplexity": [],
                     "retrieval": [], "budget": []}

    # ---- perplexity, KL, top-1 ---------------------------------------------------------------
    n_ppl = int(ppl_spec.get("samples", 2))
    tail = float(ppl_spec.get("tail", 0.5))
    pk_depths = list(pk_spec.get("depths", [0.5]))
    jobs = len(ppl_spec.get("lengths", [])) * n_ppl + len(pk_spec.get("lengths", [])) * len(pk_depths) \
        + len(kvr_spec.get("lengths", [])) * int(kvr_spec.get("samples", 3))
    memory: dict = {}
    with rep.task("evaluating", jobs) as advance:
        for n in ppl_spec.get("lengths", []):
            n = int(n)
            nll_d = nll_p = kl = agree = 0.0
            count = 0
            for i in range(n_ppl):
                s = make_sample(hay, "lm", n, random.Random(f"{seed}:ppl:{n}:{i}"), {})
                ids = torch.tensor([s.input_ids], device=dev)
                with dense(model):
                    ld = _logits(model, ids)
                lp = _logits(model, ids)
                start = int(n * (1 - tail))
                tgt = ids[0, start + 1:]
                ld_, lp_ = ld[start:-1].log_softmax(-1), lp[start:-1].log_softmax(-1)
                nll_d += float(-ld_.gather(1, tgt[:, None]).sum())
                nll_p += float(-lp_.gather(1, tgt[:, None]).sum())
                kl += float((ld_.exp() * (ld_ - lp_)).sum())
                agree += float((ld_.argmax(-1) == lp_.argmax(-1)).sum())
                count += tgt.numel()
                advance()
            results["perplexity"].append({
                "length": n, "samples": n_ppl, "tokens_scored": count,
                "ppl_dense": math.exp(nll_d / count), "ppl_plan": math.exp(nll_p / count),
                "kl": kl / count, "top1_agree": agree / count})

        # ---- retrieval -------------------------------------------------------------------------
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        for task, tspec, variants in (("passkey", pk_spec, [{"depths": [d]} for d in pk_depths]),
                                      ("kv_retrieval", kvr_spec, [{} for _ in range(int(kvr_spec.get("samples", 3)))])):
            for n in tspec.get("lengths", []):
                n = int(n)
                ok_d = ok_p = 0
                cases = []
                for i, var in enumerate(variants):
                    opts = {**tspec, **var}
                    s = make_sample(hay, task, n, random.Random(f"{seed}:{task}:{n}:{i}"), opts)
                    ids = torch.tensor([s.input_ids], device=dev)
                    k = len(s.answer_ids) + 2
                    mem: dict = {}
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    with dense(model):
                        gd = lm.tokenizer.decode(_generate(model, ids, k, eos, mem), skip_special_tokens=True)
                    if dev.type == "cuda":
                        mem["peak_dense"] = torch.cuda.max_memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    gp = lm.tokenizer.decode(_generate(model, ids, k, eos, mem), skip_special_tokens=True)
                    if dev.type == "cuda":
                        mem["peak_plan"] = torch.cuda.max_memory_allocated()
                    memory.setdefault(n, {})
                    for key, val in mem.items():
                        memory[n][key] = max(memory[n].get(key, 0), val)
                    ok_d += s.answer in gd
                    ok_p += s.answer in gp
                    cases.append({"depth": s.meta.get("depth"), "answer": s.answer, "dense": gd.strip(),
                                  "plan": gp.strip()})
                    advance()
                results["retrieval"].append({"task": task, "length": n, "samples": len(variants),
                                             "acc_dense": ok_d / len(variants), "acc_plan": ok_p / len(variants),
                                             "cases": cases})

    results["kv_cache_measured"] = [
        {"length": n, "kv_bytes_dense": m.get("dense"), "kv_bytes_plan": m.get("plan"),
         **({"peak_bytes_dense": m["peak_dense"], "peak_bytes_plan": m["peak_plan"]} if "peak_plan" in m else {})}
        for n, m in sorted(memory.items())]
    lengths = sorted({r["length"] for r in results["perplexity"] + results["retrieval"]})
    for n in lengths:
        d, k = _plan_budget(plan, n)
        kvr = kv_report(plan, n)
        results["budget"].append({"length": n, "density": d, "kv_share": k, "kv_bytes_dense_bf16": kvr["dense_bytes"],
                                  "kv_bytes_plan_bf16": kvr["plan_bytes"],
                                  "kv_bytes_per_layer_bf16": [(x["dense_bytes"], x["plan_bytes"]) for x in kvr["layers"]]})
    return results
