"""Plan in the loop: re-measure what each head is worth with the current plan applied, re-solve, repeat.

The profile measures each head with every other head dense; a whole plan's effect is not the sum of
those. Each round here takes the current plan's operating point instead: every head runs the plan's
pattern, and a gate per KV head (``profile.gates``: 1 = dense, 0 = its sparse side) gives, by one
backward pass per calibration sample, what each head saves by being dense rather than sparse while
every other head is as the plan has it (-dL/dg, L = the distillation loss of gate optimisation). A sparse
head's sparse side is its chosen candidate; a full head's is the reference candidate (sink + short
window). The measured worths (optionally shrunk toward their mean, ``shrunk``) scale each head's recall
profile (``head_scaled_loss``), the MILP re-solves at the same budget, and the rounds' cost tensors are averaged (so a head measured once as vital stays
expensive). Every round's plan is scored on held-out validation samples and the best is kept
(``search.family.choose``'s rule over the rounds).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import HeadplanError
from ..plan import Plan
from ..progress import Reporter
from ..profile import Profile


def recall_part(prof: Profile) -> torch.Tensor:
    """The profile's recall costs (the attention mass each candidate drops), which round costs scale."""
    if "recall" in prof.parts:
        return prof.parts["recall"]
    if prof.method == "recall":
        return prof.loss
    raise HeadplanError("plan in the loop needs the recall signal in the profile (profile with --method recall, "
                        "gates, or a combination that includes one of them)")


def plan_indices(prof: Profile, plan: Plan) -> torch.Tensor:
    """(layers, KV heads) candidate index of each head of a plan searched from ``prof``."""
    names = [c.name for c in prof.candidates]
    return torch.tensor([[names.index(e.candidate) for e in layer] for layer in plan.layers])


def operating_point(prof: Profile, plan: Plan, ref: int) -> tuple[torch.Tensor, list[list[dict]], torch.Tensor]:
    """(gates at the plan: 1 for full heads else 0, each head's sparse side as pattern rows, their indices).

    A select head is dense within one forward (its loss comes from what its cache evicts, later), so a gate
    there would measure nothing: its sparse side is the profile's streaming candidate with its sink and
    window (what it keeps of the recent past without its selection), else ``ref``."""
    idx = plan_indices(prof, plan)
    full = torch.tensor([[prof.candidates[int(c)].pattern.kind == "full" for c in row] for row in idx.tolist()])

    def proxy(c: int) -> int:
        p = prof.candidates[c].pattern
        if p.kind != "select":
            return c
        same = [i for i, q in enumerate(prof.candidates) if q.pattern.kind == "streaming" and q.pattern.sink == p.sink
                and q.pattern.window == p.window]
        return same[0] if same else ref

    idx = idx.apply_(proxy)
    low = torch.where(full, torch.full_like(idx, ref), idx)
    rows = [[prof.candidates[int(c)].pattern.row() for c in row] for row in low.tolist()]
    return full.float(), rows, low


def _rounded(worth: torch.Tensor) -> torch.Tensor:
    """Worths as the plan records them (6 significant digits): the search runs on exactly what is recorded,
    so ``replay`` regenerates the plan from its provenance without the model."""
    return torch.tensor([[float(f"{float(x):.6g}") for x in row] for row in worth.tolist()], dtype=torch.float64)


def shrunk(worth: torch.Tensor) -> torch.Tensor:
    """Worths as costs with ``shrink`` (``headplan refine --shrink-worths``): each head's measured worth (clamped
    at 0) plus the mean over heads. A worth is a gradient on a few short calibration samples, so many heads
    measure ~0 or slightly negative; taken as is, those heads cost nothing and the search gives them its
    shortest window, which holds at the calibration length but less at longer ones (SmolLM2, 25%: 39 of 90
    heads at <= 0). Adding the mean keeps every head at least an average head's worth while the heads measured
    as vital stay far above the rest. Measured on SmolLM2 it trades retrieval at 1K-2K for perplexity at 8K,
    so it is off by default (README, issue 15)."""
    w = worth.double().clamp(min=0.0)
    return w + w.mean()


def full_heads_of(plan: Plan) -> tuple[int, ...]:
    """The plan's full KV heads, flat (layer * KV heads + head)."""
    H = plan.model.num_kv_heads
    return tuple(li * H + e.kv_head for li, layer in enumerate(plan.layers) for e in layer if e.pattern.kind == "full")


def _rounds(prof: Profile, settings, profile_ref, ref: int, rounds: int, worth_of,
            shrink: bool = False, windows: bool = False, select_rest: bool = False) -> tuple[dict, list]:
    """Round 0 = the search; round r = the search on the mean of rounds 1..r's costs, each round's worths
    from ``worth_of(r, gates at the previous plan, its sparse sides' rows)``. ``windows``: beside each round r
    also ``round{r}w``, round r's full heads with every other head's window re-chosen by the plain search on
    the profile's own costs (which keep how each head's loss grows with length; a round's worths were
    measured at one calibration length). ``select_rest``: also ``round{r}s`` (``select_rest_member``)."""
    from ..profile import head_scaled_loss
    from .assemble import search

    recall = recall_part(prof)
    plans = {"round0": search(prof, settings, profile_ref)}
    later = dataclasses.replace(settings, signals=(), keep=())  # rounds solve on their own measured costs
    costs, worths = [], []
    for r in range(1, rounds + 1):
        at, rows, low = operating_point(prof, plans[f"round{r - 1}"], ref)
        w = _rounded(worth_of(r, at, rows))
        worths.append(w)
        costs.append(head_scaled_loss(shrunk(w) if shrink else w, recall, low))
        loss = torch.stack(costs).mean(0).float()
        plans[f"round{r}"] = search(dataclasses.replace(prof, loss=loss), later, profile_ref)
        if windows:
            try:
                plans[f"round{r}w"] = search(prof, dataclasses.replace(
                    settings, full_set=full_heads_of(plans[f"round{r}"]), full_heads=None), profile_ref)
            except HeadplanError:  # the round's full heads leave no room for the windows the budget needs
                pass
        if select_rest:
            member = select_rest_member(prof, settings, plans[f"round{r}"], profile_ref)
            if member is not None:
                plans[f"round{r}s"] = member
    return plans, worths


def select_rest_member(prof: Profile, settings, plan: Plan, profile_ref=None) -> Plan | None:
    """``round{r}s``: the round's full heads (those the loop measured as vital, the retrieval heads) and every
    other head a ``select`` head, their keep budgets chosen by the plain search on the profile's costs at the
    same budget: DuoAttention's split of heads with SnapKV-style selection in place of its streaming heads.
    The recall profile prices a select head by the attention mass it drops on text, where it is little better
    than a window at the same KV; what it adds is retrieval (what the question asks for stays), which only the
    validation samples see, so this member is scored there beside the rounds. None where it cannot be built:
    no select candidate is allowed, or the budget cannot pay every select head's full prefill (density)."""
    from ..plan import KINDS
    from .assemble import search

    if "select" in settings.exclude_kinds or not any(c.pattern.kind == "select" for c in prof.candidates):
        return None
    only = tuple(k for k in KINDS if k not in ("full", "select"))
    try:
        return search(prof, dataclasses.replace(settings, full_set=full_heads_of(plan), full_heads=None,
                                                exclude_kinds=only), profile_ref)
    except HeadplanError:
        return None


def with_windows(pick: str, plans: dict, windows: bool) -> str:
    """The member kept for the chosen round: with ``windows``, round r's ``round{r}w`` (its full heads, the
    other windows from the profile's costs) where it could be built. Validation runs at the calibration
    length: it can judge which heads a round made full (what retrieval needs), not how the round's windows,
    tuned there, hold at longer lengths; the profile's costs see length (measured on SmolLM2 at 2K-8K, README
    Results)."""
    return f"{pick}w" if windows and f"{pick}w" in plans else pick


def replay(prof: Profile, plan: Plan, profile_ref: dict | None = None) -> Plan:
    """The refined plan regenerated from its provenance (``search.refine``: the settings, the reference
    candidate, each round's recorded worths and the kept round), with no model: what ``headplan check`` runs."""
    from .settings import SearchSettings

    info = plan.provenance["search"]["refine"]
    try:
        settings = SearchSettings.from_dict(info["settings"])
        names = [c.name for c in prof.candidates]
        ref = names.index(info["reference"])
        worths = [torch.tensor(w, dtype=torch.float64) for w in info["worths"]]
        kept = str(info["kept"])
    except (KeyError, TypeError, ValueError):
        raise HeadplanError("provenance.search.refine: malformed (needs settings, reference, worths, kept)") from None
    m = prof.model
    if any(tuple(w.shape) != (m.num_layers, m.num_kv_heads) for w in worths):
        raise HeadplanError("provenance.search.refine.worths: not one value per layer and KV head")
    shrink, windows, rest = info.get("shrink", False), info.get("windows", False), info.get("select_rest", False)
    for key, v in (("shrink", shrink), ("windows", windows), ("select_rest", rest)):
        if not isinstance(v, bool):
            raise HeadplanError(f"provenance.search.refine.{key}: expected true or false")
    plans, _ = _rounds(prof, settings, profile_ref, ref, len(worths), lambda r, at, rows: worths[r - 1], shrink,
                       windows, rest)
    if kept not in plans:
        raise HeadplanError(f"provenance.search.refine.kept: no round {kept!r}")
    new = plans[kept]
    new.provenance["search"]["refine"] = info
    return new


def refine(lm, prof: Profile, settings, seqs: list, rounds: int, ref: int, score=None, reporter=None,
           profile_ref: dict | None = None, tolerance: float = 0.02, shrink: bool = False,
           windows: bool = False, select_rest: bool = False) -> tuple[Plan, list[dict]]:
    """Plan in the loop (module doc). ``seqs``: calibration sequences (``profile.runner.gate_sequences``);
    ``score(plans: dict[str, Plan]) -> {name: row}`` measures plans on validation samples (rows as
    ``eval.validate``'s, for ``choose`` with ``tolerance``); without it the last round is kept. Returns (the
    kept plan, one record per round: name, plan, counts and the measured row). The plan's
    ``provenance.search.refine`` records each round's measured worths, so ``replay`` regenerates it.
    ``shrink``: the rounds cost heads by ``shrunk`` worths. ``windows``: the chosen round's ``round{r}w`` member
    is kept (``with_windows``). ``select_rest``: each round's ``round{r}s`` (``select_rest_member``) is scored
    beside the rounds and may be kept."""
    from ..profile.gates import dense_targets, gate_gradients
    from ..progress import Reporter
    from .family import choose

    if rounds < 1:
        raise HeadplanError(f"--rounds must be at least 1, got {rounds}")
    rep = reporter or Reporter()
    recall_part(prof)
    targets = dense_targets(lm, seqs) if seqs else None  # dense references once, for every round
    with rep.task(f"plan in the loop ({rounds} rounds x {len(seqs)} samples)", rounds * len(seqs)) as advance:
        plans, worths = _rounds(prof, settings, profile_ref, ref, rounds,
                                lambda r, at, rows: gate_gradients(lm, seqs, rows, at, advance, targets), shrink,
                                windows, select_rest)
    rounds_only = {m: p for m, p in plans.items() if not m.endswith("w")}
    table = score(rounds_only) if score is not None else None
    pick = with_windows(choose(table, tolerance) if table is not None else f"round{rounds}", plans, windows)
    history = [{"round": m, "plan": p, "counts": p.counts(), **({"measured": table[m]} if table and m in table else {})}
               for m, p in plans.items()]
    plan = plans[pick]
    plan.provenance["search"]["refine"] = {
        "method": "plan in the loop", "rounds": rounds, "kept": pick, "samples": len(seqs),
        "reference": prof.candidates[ref].name, "settings": settings.to_dict(), **({"shrink": True} if shrink else {}),
        **({"windows": True} if windows else {}), **({"select_rest": True} if select_rest else {}),
        "history": [{"round": h["round"], "counts": h["counts"],
                     **({k: round(v, 6) for k, v in h["measured"].items() if isinstance(v, float)}
                        if "measured" in h else {})} for h in history],
        "worths": [w.tolist() for w in worths]}
    return plan, history


def refine_fits(lm, data, texts, lengths: list[int], rounds: int, rep: Reporter) -> int:
    """``rounds``, or 0 with one line when the calibration length (the mixture's gates.length, at most the
    longest profiled length) cannot hold the mixture's answered samples."""
    from ..data import Haystack, answer_options, load_task_file, load_texts, mixture_samples
    from ..profile.runner import gate_options

    spec = load_task_file(data, "profile")
    opt = gate_options(spec, lengths)
    try:
        mixture_samples(Haystack(lm.tokenizer, load_texts(texts)[0]), spec, opt["length"], opt["samples"],
                        reserve=answer_options(spec)[1])
    except HeadplanError as e:
        rep.log(f"plan in the loop skipped: its calibration samples at {opt['length']} tokens do not fit ({e})")
        return 0
    return rounds
