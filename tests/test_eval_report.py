"""Eval grids, baselines at the same budget, and the written report, on tiny random models."""
import json

import pytest

from cases import full
from headplan.candidates import density, kv_share
from helpers import SMALL_RUN, invoke, tiny_run
from headplan.search.baselines import BASELINES, DEFAULT_BASELINES, build_baselines
from headplan.errors import HeadplanError
from headplan.plan import load_plan, save_plan
from headplan.profile import load_profile

SMALL = SMALL_RUN


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("evrun") / "out")


def _budget_ok(plan, dens, kvb):
    heads = [e.pattern for layer in plan.layers for e in layer]
    for n in plan.budget.lengths:
        d = sum(density(p, n, plan.block_size) for p in heads) / len(heads)
        k = sum(kv_share(p, n) for p in heads) / len(heads)
        if dens is not None:
            assert d <= dens + 1e-9, (n, d, dens)
        if kvb is not None:
            assert k <= kvb + 1e-9, (n, k, kvb)


@pytest.mark.parametrize("dens,kvb", [(0.4, None), (0.5, 0.3), (1.0, 0.3)])
def test_baselines_meet_the_plans_budget_and_are_valid_plans(run_dir, tmp_path, dens, kvb):
    """Every baseline at the plan's budget; the selection ones (snapkv, pyramidkv, adakv, duo-otf: full prefill) at a KV budget
    alone, and refused with a density bound."""
    from headplan.api import do_search

    plan = do_search(run_dir / "profile.safetensors", tmp_path / "p.yaml", density=dens, kv_budget=kvb)
    prof = load_profile(run_dir / "profile.safetensors")
    names = BASELINES if dens >= 1 else DEFAULT_BASELINES
    if dens < 1:
        with pytest.raises(HeadplanError, match="cannot meet density"):
            build_baselines(prof, plan, ["snapkv"])
    bl = build_baselines(prof, plan, names)
    assert list(bl) == list(names)
    if dens >= 1:
        assert all(e.pattern.kind == "select" for layer in bl["snapkv"].layers for e in layer)
        keeps = [layer[0].pattern.keep.beta for layer in bl["pyramidkv"].layers]
        assert keeps == sorted(keeps, reverse=True) and keeps[0] > keeps[-1]
        assert {e.pattern.share for layer in bl["adakv"].layers for e in layer} == {"layer"}
        assert {e.pattern.share for layer in bl["duo-otf"].layers for e in layer} == {"heads"}
        assert bl["adakv"].layers[0][0].pattern.keep == bl["snapkv"].layers[0][0].pattern.keep
        duo = bl["duo-otf"].layers[0][0].pattern  # duo's sink and short window (DuoAttention's sink + recent)
        assert duo.sink > 0 and duo.window.alpha > 0
    for name, b in bl.items():
        f = tmp_path / f"{name}.yaml"
        save_plan(b, f)
        back = load_plan(f)  # validates every field
        assert back.model == plan.model
        assert back.budget.lengths == plan.budget.lengths
        assert back.budget.density == dens and back.budget.kv_budget == kvb
        _budget_ok(back, dens, kvb)
    assert set(bl["streaming"].counts()) == {"streaming"}
    assert set(bl["moa"].counts()) == {"streaming"}
    assert set(bl["duo"].counts()) <= {"full", "streaming"}
    # deterministic: the same seed gives the same random plan
    assert build_baselines(prof, plan, ["random"])["random"].to_yaml() == bl["random"].to_yaml()


GRID = """name: t
seed: 1000
perplexity: {lengths: [256], samples: 1, tail: 0.5}
passkey: {lengths: [256], depths: [0.2, 0.8]}
needle: {lengths: [256], depths: [0.5]}
continuations: {length: 64, samples: 1, tokens: 2}
"""


def test_eval_baselines_side_by_side_then_report(run_dir, tmp_path):
    out = tmp_path / "ev"
    (tmp_path / "grid.yaml").write_text(GRID)
    r = invoke("eval", "random:llama", "--plan", run_dir / "plan.yaml", "--baselines", "--data", tmp_path / "grid.yaml",
               "--out", out)
    assert r.exit_code == 0, r.output
    for name in DEFAULT_BASELINES:
        assert name in r.output, name
        assert (out / "baselines" / f"{name}.yaml").is_file()
    res = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in res["methods"]] == ["headplan", *DEFAULT_BASELINES]
    assert {(c["task"], c["depth"]) for c in res["grid"]} == {("passkey", 0.2), ("passkey", 0.8), ("needle", 0.5)}
    for c in res["grid"]:
        assert set(c["acc"]) == {"dense", "headplan", *DEFAULT_BASELINES}
    assert set(res["perplexity"][0]["methods"]) == {"headplan", *DEFAULT_BASELINES}
    assert res["continuations"] and set(res["continuations"][0]["methods"]) == {"headplan", *DEFAULT_BASELINES}
    # report over the run dir and the eval dir side by side (two evaluations -> curves)
    (tmp_path / "both").mkdir()
    import shutil
    shutil.copytree(run_dir, tmp_path / "both" / "run")
    shutil.copytree(out, tmp_path / "both" / "ev")
    (tmp_path / "both" / "pareto.csv").write_text("density,expected_loss\n0.2,0.3\n0.4,0.1\n0.6,0.05\n")
    rep = tmp_path / "rep"
    r = invoke("report", tmp_path / "both", "--out", rep)
    assert r.exit_code == 0, r.output
    md = (rep / "report.md").read_text()
    assert (rep / "report.html").read_text().startswith("<!doctype html>")
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert "quality_vs_density.png" in pngs and "pareto_0.png" in pngs
    assert any(p.startswith("heatmap_") for p in pngs) and any(p.startswith("headmap_") for p in pngs)
    for p in pngs:
        assert (rep / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p})" in md
    for name in DEFAULT_BASELINES:
        assert name in md


def test_multikey_and_kv_retrieval_grid(run_dir):
    import headplan
    from headplan.eval import evaluate

    lm = headplan.load_model("random:llama")
    spec = {"seed": 1, "multikey": {"lengths": [512], "depths": [0.5]},
            "kv_retrieval": {"lengths": [256], "samples": 1, "pairs": 3}}
    res = evaluate(lm, load_plan(run_dir / "plan.yaml"), spec)
    assert [(r["task"], r["samples"]) for r in res["retrieval"]] == [("multikey", 1), ("kv_retrieval", 1)]
    assert [c["depth"] for c in res["grid"]] == [0.5, None]
    assert set(res["grid"][0]["acc"]) == {"dense", "headplan"}


def test_report_from_a_plain_run_dir(run_dir, tmp_path):
    r = invoke("report", run_dir, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "report.html").is_file()
    assert list((tmp_path / "rep").glob("heatmap_*_passkey.png"))
    assert (tmp_path / "rep" / "headmap_0.png").is_file()


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "badjson"])
def test_report_bad_run_dir_is_one_line_exit_2(tmp_path, kind):
    d = tmp_path / "d"
    if kind == "file":
        d.write_text("x")
    elif kind == "empty":
        d.mkdir()
    elif kind == "badjson":
        d.mkdir()
        (d / "eval.json").write_text("{not json")
    r = invoke("report", d, "--out", tmp_path / "rep")
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("headplan: error:"), r.output


def test_eval_baselines_bad_input(run_dir, tmp_path):
    r = invoke("eval", "random:llama", "--plan", run_dir / "plan.yaml", "--baseline-names", "nope",
               "--data", "eval-small")
    assert r.exit_code == 2 and "unknown baseline" in r.output
    r = invoke("eval", "random:llama", "--plan", run_dir / "plan.yaml", "--baselines", "--profile",
               tmp_path / "none.safetensors", "--data", "eval-small")
    assert r.exit_code == 2 and "profile not found" in r.output


def test_baselines_command_then_named_plans_match_eval_baselines(run_dir, tmp_path):
    """`headplan baselines` writes the same plans `eval --baselines` builds; NAME=FILE names methods."""
    import headplan
    from headplan.eval import evaluate

    r = invoke("baselines", run_dir / "plan.yaml", "--out", tmp_path / "b", "--names", "streaming,duo")
    assert r.exit_code == 0, r.output
    prof = load_profile(run_dir / "profile.safetensors")
    built = build_baselines(prof, load_plan(run_dir / "plan.yaml"), ["streaming", "duo"])
    from headplan.search import profile_ref

    for name, plan in built.items():  # the same plans; the profile path relative to the baseline's folder
        want = tmp_path / "want" / f"{name}.yaml"
        plan.provenance["profile"] = profile_ref(run_dir / "profile.safetensors", want, prof.sha256)
        save_plan(plan, want)
        assert (tmp_path / "b" / f"{name}.yaml").read_bytes() == want.read_bytes()
    spec = tmp_path / "g.yaml"
    spec.write_text("passkey: {lengths: [384], depths: [0.5]}\n")
    r = invoke("eval", "random:llama", "--plan", f"mine={run_dir / 'plan.yaml'}",
               "--plan", f"streaming@x={tmp_path / 'b' / 'streaming.yaml'}", "--data", spec, "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [m["name"] for m in res["methods"]] == ["mine", "streaming@x"]
    assert set(res["retrieval"][0]["acc"]) == {"dense", "mine", "streaming@x"}
    r = invoke("eval", "random:llama", "--plan", f"a={run_dir / 'plan.yaml'}", "--plan", f"a={run_dir / 'plan.yaml'}",
               "--data", spec)
    assert r.exit_code == 2 and "two methods named" in r.stderr
    r = invoke("baselines", run_dir / "plan.yaml", "--out", tmp_path / "c", "--names", "nope")
    assert r.exit_code == 2 and "unknown baseline" in r.stderr and not (tmp_path / "c").exists()


def test_answer_nll_is_the_teacher_forced_answer_loss(run_dir):
    """answer_nll: an all-full plan equals dense to float tolerance; dense equals a hand computation."""
    import torch

    import headplan
    from headplan.data import Haystack, load_texts, make_sample
    from headplan.eval import evaluate
    from headplan.plan import plan_from_rows
    import random

    lm = headplan.load_model("random:llama")
    plan = load_plan(run_dir / "plan.yaml")
    full_plan = plan_from_rows(plan.model, [[full()] * plan.model.num_kv_heads] * plan.model.num_layers,
                               block_size=plan.block_size)
    spec = {"seed": 7, "passkey": {"lengths": [256], "depths": [0.3]}}
    res = evaluate(lm, plan, spec, others={"full": full_plan})
    nll = res["retrieval"][0]["answer_nll"]
    assert abs(nll["full"] - nll["dense"]) < 1e-4
    text, _ = load_texts(None)
    s = make_sample(Haystack(lm.tokenizer, text), "passkey", 256, random.Random("7:passkey:256:0"), {"depths": [0.3]})
    ids = torch.tensor([list(s.input_ids) + list(s.answer_ids)])
    from headplan.runtime import dense

    with torch.no_grad(), dense(lm.model):  # evaluate() leaves the plan applied
        lp = lm.model(ids).logits[0, -len(s.answer_ids) - 1:-1].float().log_softmax(-1)
    want = float(-lp.gather(1, torch.tensor(s.answer_ids)[:, None]).mean())
    assert abs(nll["dense"] - want) < 1e-4, (nll["dense"], want)
    assert nll["headplan"] != nll["dense"]  # the tiny plan is sparse at 256: the metric can tell
