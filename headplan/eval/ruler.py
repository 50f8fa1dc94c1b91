"""RULER through lm-eval (``headplan eval --ruler``): lm-eval's own RULER task generators and scoring, run on
dense and on each plan through lm-eval's Hugging Face model wrapper around the already-loaded (patched)
model. lm-eval is an optional extra: ``pip install 'headplan[ruler]'``.

Only the tasks whose haystacks lm-eval synthesises itself run here (no network): niah_single_1 (repeated
noise), niah_multikey_2 / _3 (needle haystacks), ruler_vt, ruler_cwe, ruler_fwe. The others download a
data set (Paul Graham essays, SQuAD, HotpotQA) and are refused before any work.

Samples are made per length (lm-eval makes its 500 per length once, at task load) and the first N are
scored, the same N for dense and every method; the score of a sample is lm-eval's own metric (the share
of the reference strings found in the greedy output), a cell's score the mean over its samples.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import random

from ..errors import HeadplanError

EXTRA = "pip install 'headplan[ruler]'"
LM_EVAL_VERSION = "0.4.13"  # what the task names, loading and sample records here were written against

# offline: lm-eval task name -> the haystack it synthesises
OFFLINE = {"niah_single_1": "repeated noise", "niah_multikey_2": "needle lines", "niah_multikey_3": "needle lines",
           "ruler_vt": "variable chains in noise", "ruler_cwe": "word lists", "ruler_fwe": "coded words"}
ALIASES = {"vt": "ruler_vt", "cwe": "ruler_cwe", "fwe": "ruler_fwe", "qa_squad": "ruler_qa_squad",
           "qa_hotpot": "ruler_qa_hotpot"}
# what the others download at task load
DOWNLOADS = {"niah_single_2": "Paul Graham essays", "niah_single_3": "Paul Graham essays",
             "niah_multikey_1": "Paul Graham essays", "niah_multivalue": "Paul Graham essays",
             "niah_multiquery": "Paul Graham essays", "ruler_qa_squad": "SQuAD", "ruler_qa_hotpot": "HotpotQA",
             "ruler": "essays and QA sets for several of its tasks"}
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_2")
DEFAULT_LENGTHS = (4096,)  # RULER's (and lm-eval's) shortest reported length
DEFAULT_SAMPLES = 10
MIN_LENGTH = 256  # below this lm-eval cannot fit a template, the needles and the answer room
NEEDS = ("lm_eval", "nltk", "wonderwords")  # the modules lm-eval's RULER tasks import


def check_available() -> None:
    """One line naming the extra when lm-eval (or what its RULER tasks import) is missing."""
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise HeadplanError(f"--ruler needs lm-eval {LM_EVAL_VERSION} with its RULER dependencies "
                            f"({', '.join(missing)} not installed): {EXTRA}")


def parse_tasks(value) -> list[str]:
    """'niah_single_1,vt' (or a list) -> lm-eval task names, each one that runs offline; anything else is
    refused in one line (a task that downloads data says which data)."""
    given = [x.strip() for x in (value.split(",") if isinstance(value, str) else (value or ())) if str(x).strip()]
    if not given:
        raise HeadplanError(f"--ruler: no task given (offline RULER tasks: {', '.join(OFFLINE)})")
    out = []
    for g in given:
        t = ALIASES.get(g.lower(), g.lower())
        if t in DOWNLOADS:
            raise HeadplanError(f"--ruler: {g} downloads {DOWNLOADS[t]} and headplan runs RULER offline; "
                                f"offline tasks: {', '.join(OFFLINE)}")
        if t not in OFFLINE:
            raise HeadplanError(f"--ruler: unknown RULER task {g!r} (offline tasks: {', '.join(OFFLINE)})")
        if t not in out:
            out.append(t)
    return out


def ruler_spec(tasks=None, lengths=None, samples=None, gen_tokens=None, max_positions: int | None = None,
               base: dict | None = None, check: bool = True) -> dict:
    """The eval spec's ``ruler`` section {tasks, lengths, samples, gen_tokens}, from flags over ``base`` (a
    spec's own section), checked before any work: lm-eval installed, offline tasks, lengths in
    [MIN_LENGTH, max_positions], whole numbers."""
    from ..lengths import parse_lengths

    b = dict(base or {})
    unknown = set(b) - {"tasks", "lengths", "samples", "gen_tokens", "settings"}
    if unknown:
        raise HeadplanError(f"eval spec: ruler: unknown key {sorted(unknown)[0]!r} (known: tasks, lengths, samples, "
                            "gen_tokens, settings)")
    if check:
        check_available()
    t = parse_tasks(tasks if tasks is not None else b.get("tasks", list(DEFAULT_TASKS)))
    lens = parse_lengths(lengths if lengths is not None else b.get("lengths", list(DEFAULT_LENGTHS)))
    if max_positions is not None and lengths is None and "lengths" not in b:  # the default: what fits
        lens = [n for n in lens if n <= max_positions] or [int(max_positions)]
    for n in lens:
        if n < MIN_LENGTH:
            raise HeadplanError(f"--ruler-lengths: {n} is too short for RULER (at least {MIN_LENGTH}: the prompt "
                                "template, the needles and the answer room must fit)")
        if max_positions is not None and n > max_positions:
            raise HeadplanError(f"--ruler-lengths: {n} exceeds the model's {max_positions} positions")
    out = {"tasks": t, "lengths": lens}
    if "settings" in b:
        from .prompts import prompt_settings as _settings

        out["settings"] = _settings("ruler", b)
    for key, flag, v, default in (("samples", "--ruler-samples", samples, DEFAULT_SAMPLES),
                                  ("gen_tokens", "--ruler-gen-tokens", gen_tokens, None)):
        v = v if v is not None else b.get(key, default)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HeadplanError(f"{flag} takes a whole number >= 1, got {v!r}")
        out[key] = v
    return out


# ---- tokenizer -----------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what a byte-level pre-tokenizer sees)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def hf_tokenizer(tok):
    """A Hugging Face tokenizer for ``tok``: itself when it is one; for headplan's ByteTokenizer (random models)
    a fast tokenizer with the same ids (byte + 2; 0 pad, 1 bos) and an end token at 258, which lm-eval's
    wrapper needs."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from ..models import ByteTokenizer

    if isinstance(tok, PreTrainedTokenizerBase):
        return tok
    if not isinstance(tok, ByteTokenizer):
        raise HeadplanError(f"--ruler needs a Hugging Face tokenizer; this model has {type(tok).__name__}")
    if tok.vocab_size < 259:
        raise HeadplanError(f"--ruler: a byte-tokenizer model needs at least 259 tokens, it has {tok.vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    m = _bytes_to_unicode()
    vocab = {"<pad>": 0, "<s>": 1, **{m[b]: b + 2 for b in range(256)}, "</s>": 258}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ---- lm-eval -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet(capture: bool = False):
    """lm-eval's logging below ERROR off; with ``capture`` its prints and bars too (sample generation writes
    both), and nltk's punkt download is not tried (only the essay haystacks, refused here, use it)."""
    import functools
    import sys

    lg = logging.getLogger("lm_eval")
    level = lg.level
    lg.setLevel(logging.ERROR)
    task_mod = sys.modules.get("lm_eval.api.task")  # its request-building bar takes no flag
    bar = getattr(task_mod, "tqdm", None)
    if bar is not None:
        task_mod.tqdm = functools.partial(bar, disable=True)
    nltk = None
    if capture and importlib.util.find_spec("nltk") is not None:
        import nltk
        dl = nltk.download
        nltk.download = lambda *a, **k: False
    buf = io.StringIO()
    try:
        if capture:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield buf
        else:
            yield buf
    finally:
        lg.setLevel(level)
        if bar is not None:
            task_mod.tqdm = bar
        if nltk is not None:
            nltk.download = dl


def question_start(ids: list[int], tokenizer, search: int = 256) -> int:
    """Where the question of a RULER prompt begins: the last token from which the prompt's text reads
    ``What ...`` (lm-eval's niah templates end with that question and the answer's prefix), searched among
    the last ``search`` tokens. Raises HeadplanError when there is none."""
    for i in range(len(ids) - 1, max(0, len(ids) - search) - 1, -1):
        if tokenizer.decode(ids[i:]).lstrip().startswith("What "):
            return i
    raise HeadplanError("RULER after setting: the prompt has no 'What ...' question in its last "
                        f"{search} tokens to put after the compressed context")


def _wrapper(model, tokenizer, on_generate, state: dict | None = None):
    """lm-eval's HFLM around the loaded model: greedy generation through ``model.generate`` with
    ``max_new_tokens`` (so a plan's per-head cache is sized for the request), its bars off, and
    ``on_generate()`` after each request (headplan's progress bar). ``state["setting"]`` (``single`` when
    absent) is the prompt setting of headplan's eval: with ``after`` / ``after-context`` the context before the
    question is prefilled, and compressed, alone (``driver.prefilled_cache``)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils_hf import stop_sequences_criteria

    class HeadplanHFLM(HFLM):
        def _model_generate(self, context, max_length, stop, **kw):
            do_sample = bool(kw.pop("do_sample", False))
            temp = kw.pop("temperature", 0.0)
            if do_sample and temp:
                kw["temperature"] = temp
            crit = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
            setting = (state or {}).get("setting", "single")
            if setting != "single":
                from ..runtime import cache_kwarg
                from .prompts import prefilled_cache, setting_parts

                first, scorer = setting_parts(setting)
                split = question_start(context[0].tolist(), self.tokenizer) if first else None
                kw[cache_kwarg(self.model)] = prefilled_cache(self.model, context, split, int(max_length) + 1, scorer)
            out = self.model.generate(input_ids=context, max_new_tokens=int(max_length) - context.shape[1],
                                      stopping_criteria=crit, pad_token_id=self.tokenizer.pad_token_id,
                                      use_cache=True, do_sample=do_sample, **kw)
            on_generate()
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    with _quiet():
        return HeadplanHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1,
                            max_length=int(getattr(model.config, "max_position_embeddings", 0) or 0) or None)


def check_fits(tasks: list[str], length: int, tokenizer) -> None:
    """Refuse a task lm-eval 0.4.13 cannot make at ``length`` with this tokenizer: its vt and cwe generators
    shrink a prompt that does not fit in a ``while True`` loop that never ends once the smallest does not
    fit (vt: its in-context example must fit 500 tokens, then the smallest prompt with that example
    ``length``; cwe: ten words). Probed with lm-eval's own prompt builders, before any sample is made."""
    n = int(length)
    ntok = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    with _quiet(capture=True):
        if "ruler_vt" in tasks:
            from lm_eval.tasks.ruler import vt_utils as vt

            icl = max(ntok(t + " " + " ".join(a)) for t, a in (vt.generate_input_output(5, 1, 4, is_icl=True)
                                                              for _ in range(3)))
            main = max(ntok(vt.generate_input_output(10, 1, 4)[0]) for _ in range(3))
            need = icl + main + 2 * 30 + 16  # the example (at most 500 - 30) ahead of the prompt, both answers
            if icl + 30 > 500 or need > n:
                raise HeadplanError(f"--ruler: ruler_vt does not fit {n} tokens with this tokenizer (lm-eval's "
                                    f"generator would loop forever): its in-context example takes {icl} of 470 "
                                    f"tokens and the smallest prompt ~{need}; use a longer length or drop vt")
        if "ruler_cwe" in tasks:
            from lm_eval.tasks.ruler import cwe_utils as cwe

            need = max(ntok(cwe.generate_input_output(10, n)[1]) for _ in range(3)) + 120 + 8
            if need > n:
                raise HeadplanError(f"--ruler: ruler_cwe does not fit {n} tokens with this tokenizer (lm-eval's "
                                    f"generator would loop forever): its smallest prompt takes ~{need}; use a "
                                    "longer length or drop cwe")


def load_tasks(tasks: list[str], length: int, tokenizer_dir: str, gen_tokens: int | None, seed: int,
               tokenizer=None):
    """lm-eval's task objects for ``tasks`` at one length (their samples made now, seeded)."""
    import numpy as np
    from lm_eval.tasks import TaskManager

    if tokenizer is not None:
        check_fits(tasks, length, tokenizer)
    random.seed(f"{seed}:ruler:{length}")  # lm-eval's generators draw from the global generators
    np.random.seed((int(seed) * 7919 + int(length)) % 2**32)
    with _quiet(capture=True) as buf:
        try:
            loaded = TaskManager(metadata={"max_seq_lengths": [int(length)], "tokenizer": tokenizer_dir}).load(tasks)
        except (ValueError, AssertionError) as e:
            raise HeadplanError(f"RULER at length {length}: lm-eval could not make samples "
                                f"({str(e).splitlines()[0][:200]}); try a longer --ruler-lengths") from None
        except OSError as e:
            raise HeadplanError(f"RULER at length {length}: lm-eval needed something it could not fetch "
                                f"({str(e).splitlines()[0][:200]})") from None
    del buf
    for t in loaded["tasks"].values():
        if gen_tokens is not None:
            t.set_config(key="generation_kwargs", value={"max_gen_toks": int(gen_tokens)}, update=True)
    return loaded


def score_samples(samples: list[dict], length: int) -> tuple[float, list[dict]]:
    """lm-eval's sample records of one task at one length -> (mean score, [{answer, output, score}])."""
    key = str(int(length))
    cases = []
    for s in samples:
        v = s.get(key)
        if v is None or float(v) < 0:
            continue
        out = s.get("filtered_resps") or s.get("resps") or [""]
        while isinstance(out, (list, tuple)):
            out = out[0] if out else ""
        ans = (s.get("doc") or {}).get("outputs", s.get("target"))
        cases.append({"answer": list(ans) if isinstance(ans, (list, tuple)) else ans, "output": str(out),
                      "score": float(v)})
    return (sum(c["score"] for c in cases) / len(cases) if cases else float("nan")), cases


def _version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def _evaluate(hflm, loaded, limit: int) -> dict:
    """lm-eval's evaluate on the loaded tasks, the first ``limit`` samples of each: task -> sample records."""
    from lm_eval import evaluator

    with _quiet():
        r = evaluator.evaluate(lm=hflm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=0,
                               verbosity="ERROR")
    return r["samples"]


def run_ruler(lm, methods: dict, spec: dict, reporter=None, seed: int = 1000, keep_cases: int = 3) -> list[dict]:
    """Dense and every method (name -> Plan) on lm-eval's RULER tasks at each length of ``spec`` (the eval
    spec's ``ruler`` section). Returns rows {task, length, samples, score {dense, method...}, gen_tokens,
    cases [first ``keep_cases``: answer, dense, methods]}."""
    import tempfile

    from ..progress import Reporter
    from .loop import MethodLoop

    rep = reporter or Reporter()
    tasks, lengths = list(spec["tasks"]), [int(n) for n in spec["lengths"]]
    settings = list(spec.get("settings") or ["single"])
    n_samples, gen = int(spec.get("samples", DEFAULT_SAMPLES)), spec.get("gen_tokens")
    model = lm.model
    tok = hf_tokenizer(lm.tokenizer)
    names = list(methods)
    rows = []
    ver = _version()
    with tempfile.TemporaryDirectory(prefix="headplan-ruler-") as tdir:
        tok.save_pretrained(tdir)  # lm-eval's generators load the tokenizer by path, to size each sample
        total = (len(names) + 1) * len(tasks) * len(lengths) * n_samples * len(settings)
        prepared = {}
        rep.log(f"RULER (lm-eval {ver}): making samples of {', '.join(tasks)} at {', '.join(map(str, lengths))}")
        for n in lengths:
            prepared[n] = load_tasks(tasks, n, tdir, gen, seed, tok)
        with rep.task(f"RULER: dense + {len(names)} plan(s)", total) as advance:
            state = {"setting": "single"}
            hflm = _wrapper(model, tok, advance, state)
            for n, setting in [(n, st) for n in lengths for st in settings]:
                state["setting"] = setting
                loaded = prepared[n]
                outs = MethodLoop(model, methods).each(lambda m: _evaluate(hflm, loaded, n_samples))
                for t in tasks:
                    score, per = {}, {}
                    for m, samp in outs.items():
                        score[m], per[m] = score_samples(samp.get(t, []), n)
                    k = len(per["dense"])
                    cases = [{"answer": per["dense"][i]["answer"], "dense": per["dense"][i]["output"],
                              "methods": {m: per[m][i]["output"] for m in names if i < len(per[m])}}
                             for i in range(min(keep_cases, k))]
                    cfg = getattr(loaded["tasks"][t].config, "generation_kwargs", None) or {}
                    rows.append({"task": t if setting == "single" else f"{t}-{setting}", "length": n,
                                 "samples": k, "score": score,
                                 "gen_tokens": cfg.get("max_gen_toks"), "lm_eval": ver, "cases": cases})
    return rows


def ruler_part(spec: dict, max_positions: int, tasks, lengths, samples, gen_tokens, only: bool) -> dict:
    """The eval spec with its ``ruler`` section from the --ruler flags (over the spec's own), checked before
    any work (lm-eval installed, offline tasks, lengths that fit); ``only``: that section alone."""
    if tasks is None and "ruler" not in spec:
        given = [f for f, v in (("--ruler-lengths", lengths), ("--ruler-samples", samples),
                                ("--ruler-gen-tokens", gen_tokens), ("--ruler-only", only or None)) if v is not None]
        if given:
            raise HeadplanError(f"{given[0]} goes with --ruler TASKS (e.g. --ruler niah_single_1)")
        return spec
    base = spec.get("ruler")
    if base is not None and not isinstance(base, dict):
        raise HeadplanError("eval spec: ruler: expected a mapping {tasks, lengths, samples, gen_tokens}")
    r = ruler_spec(tasks, lengths, samples, gen_tokens, max_positions, base)
    if only:
        return {"name": "ruler", "seed": spec.get("seed", 1000), "ruler": r}
    return {**spec, "ruler": r}


def ruler_fits(ruler: dict, tokenizer) -> None:
    """Refuse, before any work, RULER prompts lm-eval cannot make with this tokenizer at the section's lengths."""
    tok = hf_tokenizer(tokenizer)
    for n in ruler["lengths"]:
        check_fits(ruler["tasks"], n, tok)
