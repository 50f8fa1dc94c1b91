"""RULER through lm-eval (``eval --ruler``): task checks, flags and the adapter without lm-eval (a fake task),
and one tiny end-to-end run on random:llama where lm-eval is installed."""
import importlib.util
import json

import pytest

from cases import full, stream
from headplan.errors import HeadplanError
from headplan.eval import ruler
from headplan.plan import save_plan
from helpers import invoke, plan_for, tiny

HAS_LM_EVAL = all(importlib.util.find_spec(m) is not None for m in ruler.NEEDS)
STREAM = stream(4, 64, 0.0)


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    """A hand-made plan for random:llama: one streaming KV head per layer, the other full."""
    lm = tiny("llama")
    p = plan_for(lm, lambda li, h: STREAM if h == 0 else full())
    path = tmp_path_factory.mktemp("ruler") / "plan.yaml"
    save_plan(p, path)
    return path


# ---- checks, without lm-eval ---------------------------------------------------------------------------

def test_offline_tasks_aliases_and_order():
    assert ruler.parse_tasks("niah_single_1, vt,CWE,niah_single_1") == ["niah_single_1", "ruler_vt", "ruler_cwe"]
    assert ruler.parse_tasks(["fwe", "niah_multikey_3"]) == ["ruler_fwe", "niah_multikey_3"]


@pytest.mark.parametrize("task,data", [("niah_single_2", "Paul Graham essays"), ("niah_multivalue", "essays"),
                                       ("niah_multiquery", "essays"), ("niah_multikey_1", "essays"),
                                       ("qa_squad", "SQuAD"), ("ruler_qa_hotpot", "HotpotQA"), ("ruler", "QA")])
def test_tasks_that_download_are_refused_naming_the_data(task, data):
    with pytest.raises(HeadplanError, match=data) as e:
        ruler.parse_tasks(f"niah_single_1,{task}")
    assert "offline tasks: niah_single_1" in str(e.value) and "\n" not in str(e.value)


def test_unknown_and_empty_tasks():
    with pytest.raises(HeadplanError, match="unknown RULER task 'passkey'"):
        ruler.parse_tasks("passkey")
    with pytest.raises(HeadplanError, match="no task given"):
        ruler.parse_tasks(" , ")


def test_spec_defaults_and_checks():
    s = ruler.ruler_spec(check=False, max_positions=8192)
    assert s == {"tasks": list(ruler.DEFAULT_TASKS), "lengths": [4096], "samples": ruler.DEFAULT_SAMPLES}
    assert ruler.ruler_spec(check=False, max_positions=2048)["lengths"] == [2048]  # the default fits the model
    s = ruler.ruler_spec("vt", "1k,2k", 2, 8, 8192, check=False)
    assert s == {"tasks": ["ruler_vt"], "lengths": [1024, 2048], "samples": 2, "gen_tokens": 8}
    s = ruler.ruler_spec(None, None, 3, None, 8192, base={"tasks": ["fwe"], "lengths": [1024]}, check=False)
    assert s == {"tasks": ["ruler_fwe"], "lengths": [1024], "samples": 3}
    for kw, msg in (({"lengths": "128"}, "too short"), ({"lengths": "16k"}, "exceeds the model's 8192"),
                    ({"samples": 0}, "--ruler-samples takes a whole number"),
                    ({"gen_tokens": True}, "--ruler-gen-tokens takes"),
                    ({"base": {"task": ["x"]}}, "unknown key 'task'")):
        with pytest.raises(HeadplanError, match=msg):
            ruler.ruler_spec(max_positions=8192, check=False, **kw)


def test_missing_lm_eval_says_the_extra(monkeypatch):
    monkeypatch.setattr(ruler.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HeadplanError, match=r"pip install 'headplan\[ruler\]'"):
        ruler.check_available()


def test_cli_without_lm_eval_one_line_exit_2(plan_path, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(ruler.importlib.util, "find_spec", lambda n: None if n == "lm_eval" else real(n))
    r = invoke("eval", "random:llama", "--plan", plan_path, "--ruler", "niah_single_1", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "pip install 'headplan[ruler]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "eval.json").exists()


@pytest.mark.parametrize("args,msg", [
    (["--ruler", "niah_single_1,niah_single_3"], "downloads Paul Graham essays"),
    (["--ruler", "qa_squad"], "downloads SQuAD"),
    (["--ruler-lengths", "1024"], "--ruler-lengths goes with --ruler TASKS"),
    (["--ruler-only"], "--ruler-only goes with --ruler TASKS"),
    (["--ruler", "niah_single_1", "--ruler-lengths", "100"], "too short"),
    (["--ruler", "niah_single_1", "--ruler-lengths", "64k"], "exceeds the model's 8192 positions"),
])
def test_cli_refusals_are_one_line_before_any_work(plan_path, tmp_path, monkeypatch, args, msg):
    monkeypatch.setattr(ruler, "check_available", lambda: None)  # the same refusals with or without lm-eval
    loaded = []
    import headplan.models
    monkeypatch.setattr(headplan.models, "load_model", lambda *a, **k: loaded.append(1))
    r = invoke("eval", "random:llama", "--plan", plan_path, *args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not loaded


def test_byte_tokenizer_as_hf_tokenizer_keeps_the_ids():
    lm = tiny("llama")
    tok = ruler.hf_tokenizer(lm.tokenizer)
    for text in ("The grass is green.\nOne of the special magic numbers is: 1234567.", "héllo wörld ✓"):
        assert tok(text).input_ids == lm.tokenizer.encode(text)
        assert tok.decode(tok(text).input_ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 258)


def test_score_samples_reads_lm_eval_records():
    recs = [{"doc": {"outputs": ["42"]}, "filtered_resps": ["it is 42"], "1024": 1.0, "4096": -1.0},
            {"doc": {"outputs": ["7", "8"]}, "filtered_resps": ["7"], "1024": 0.5, "4096": -1.0},
            {"doc": {"outputs": ["9"]}, "resps": [["no"]], "1024": 0.0}]
    score, cases = ruler.score_samples(recs, 1024)
    assert score == pytest.approx(0.5)
    assert [c["output"] for c in cases] == ["it is 42", "7", "no"] and cases[1]["answer"] == ["7", "8"]


class _FakeTask:
    class config:
        generation_kwargs = {"max_gen_toks": 3}

    def __init__(self, length):
        self.length = length


def test_adapter_runs_dense_and_each_plan_with_a_fake_task(plan_path, monkeypatch):
    """run_ruler without lm-eval: a fake task whose 'evaluation' generates through the model as it is at
    that moment, and records which attention ran; dense first, then the plan, the model restored after."""
    import torch

    from headplan.plan import load_plan
    from headplan.runtime import NAME, state_of

    lm = tiny("llama")
    seen = []

    def fake_evaluate(hflm, loaded, limit):
        model = hflm["model"]
        seen.append(model.config._attn_implementation)
        recs = []
        for (t, task) in loaded["tasks"].items():
            for i in range(limit):
                ids = torch.tensor([[2 + (i * 7 + j) % 200 for j in range(40)]])
                out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 40:].tolist()
                hflm["advance"]()
                text = "".join(map(str, out))
                # the 'answer' is dense's first output: dense scores 1 on its own sample 0
                recs.append((t, {"doc": {"outputs": [seen_ans.setdefault((t, task.length, i), text)]},
                                 "filtered_resps": [text], str(task.length): float(seen_ans[(t, task.length, i)] in text)}))
        by: dict = {}
        for t, r in recs:
            by.setdefault(t, []).append(r)
        return by

    seen_ans: dict = {}
    monkeypatch.setattr(ruler, "_wrapper", lambda model, tok, advance, state=None: {"model": model, "advance": advance})
    monkeypatch.setattr(ruler, "load_tasks", lambda tasks, n, d, gen, seed, tok=None:
                        {"tasks": {t: _FakeTask(n) for t in tasks}})
    monkeypatch.setattr(ruler, "_evaluate", fake_evaluate)
    plan = load_plan(plan_path)
    before = lm.model.config._attn_implementation, state_of(lm.model)  # the cached model may carry a plan
    steps = []

    from headplan.progress import Reporter

    class Counting(Reporter):  # a reporter that counts the bar's steps
        def task(self, description, total):
            import contextlib

            @contextlib.contextmanager
            def cm():
                steps.append(total)
                yield lambda n=1: steps.append(-n)
            return cm()

    spec = {"tasks": ["niah_single_1", "niah_multikey_2"], "lengths": [512, 1024], "samples": 2}
    rows = ruler.run_ruler(lm, {"headplan": plan, "other": plan}, spec, Counting())
    assert seen == ["sdpa", NAME, NAME] * 2  # per length: dense, then each method under the plan
    assert (lm.model.config._attn_implementation, state_of(lm.model)) == before  # left as it was found
    assert [(r["task"], r["length"]) for r in rows] == [("niah_single_1", 512), ("niah_multikey_2", 512),
                                                         ("niah_single_1", 1024), ("niah_multikey_2", 1024)]
    for r in rows:
        assert r["samples"] == 2 and set(r["score"]) == {"dense", "headplan", "other"}
        assert r["score"]["dense"] == 1.0 and r["score"]["headplan"] == r["score"]["other"]
        assert r["gen_tokens"] == 3 and len(r["cases"]) == 2 and set(r["cases"][0]["methods"]) == {"headplan", "other"}
    assert steps[0] == 3 * 2 * 2 * 2 and -sum(s for s in steps[1:]) == steps[0]  # one step per generation


def test_eval_spec_ruler_section_is_checked(plan_path, tmp_path, monkeypatch):
    monkeypatch.setattr(ruler, "check_available", lambda: None)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nruler:\n  tasks: [niah_single_2]\n")
    r = invoke("eval", "random:llama", "--plan", plan_path, "--data", spec)
    assert r.exit_code == 2 and "downloads Paul Graham essays" in r.output
    spec.write_text("name: s\nruler: [niah_single_1]\n")
    r = invoke("eval", "random:llama", "--plan", plan_path, "--data", spec)
    assert r.exit_code == 2 and "ruler: expected a mapping" in r.output


# ---- end to end, with lm-eval --------------------------------------------------------------------------

needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install 'headplan[ruler]')")


@needs_lm_eval
def test_ruler_end_to_end_on_a_tiny_model_then_report(plan_path, tmp_path):
    """random:llama, niah_single_1 at 512 beside the eval-small spec, one sample, four generated tokens:
    lm-eval's own samples and scoring through its HF wrapper, dense and the plan, into eval.json, the
    console table and the report."""
    out = tmp_path / "ev"
    r = invoke("eval", "random:llama", "--plan", plan_path, "--data", "eval-small", "--ruler", "niah_single_1",
               "--ruler-lengths", "512", "--ruler-samples", "1", "--ruler-gen-tokens", "4", "--out", out)
    assert r.exit_code == 0, r.output
    assert "RULER niah_single_1" in r.output
    res = json.loads((out / "eval.json").read_text())
    assert res["perplexity"] and res["retrieval"]  # the spec's own tasks still ran
    (row,) = res["ruler"]
    assert row["task"] == "niah_single_1" and row["length"] == 512 and row["samples"] == 1
    assert set(row["score"]) == {"dense", "headplan"} and all(0.0 <= v <= 1.0 for v in row["score"].values())
    assert row["gen_tokens"] == 4 and row["lm_eval"] == ruler.LM_EVAL_VERSION
    (case,) = row["cases"]
    assert case["answer"][0].isdigit() and "headplan" in case["methods"]
    assert res["eval_spec"]["ruler"]["tasks"] == ["niah_single_1"]
    r = invoke("report", out, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "RULER niah_single_1@512 (%)" in md and "lm-eval 0.4.13" in md and "RULER answers" in md


@needs_lm_eval
def test_ruler_task_that_cannot_fit_is_one_line(plan_path):
    """lm-eval's vt generator loops forever when its in-context example does not fit; refused up front."""
    r = invoke("eval", "random:llama", "--plan", plan_path, "--ruler", "vt", "--ruler-lengths", "1024",
               "--ruler-only")
    assert r.exit_code == 2 and "ruler_vt does not fit 1024 tokens" in r.output and "Traceback" not in r.output


def test_question_start_finds_the_last_question():
    lm = tiny("llama")
    tok = ruler.hf_tokenizer(lm.tokenizer)
    text = "Some magic numbers are hidden. What a text. The number is 12.\nWhat is the special magic number? It is"
    ids = tok(text)["input_ids"]
    i = ruler.question_start(ids, tok)
    assert tok.decode(ids[i:]).lstrip() == "What is the special magic number? It is"
    with pytest.raises(HeadplanError, match="no 'What"):
        ruler.question_start(tok("no question here")["input_ids"], tok)


@needs_lm_eval
def test_ruler_with_the_question_after_compression(plan_path, tmp_path):
    """The ruler section's settings: after-context prefills the context before RULER's question alone."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nruler:\n  tasks: [niah_single_1]\n  lengths: [512]\n  samples: 1\n  gen_tokens: 4\n"
                    "  settings: [single, after-context]\n")
    out = tmp_path / "ev"
    r = invoke("eval", "random:llama", "--plan", plan_path, "--data", spec, "--out", out)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "eval.json").read_text())["ruler"]
    assert [x["task"] for x in rows] == ["niah_single_1", "niah_single_1-after-context"]
    spec.write_text("name: s\nruler:\n  tasks: [niah_single_1]\n  settings: [later]\n")
    r = invoke("eval", "random:llama", "--plan", plan_path, "--data", spec)
    assert r.exit_code == 2 and "ruler.settings" in r.output
