"""Issue 13: workflow rough edges (argument checks first, baselines and check, quieter output, flags,
defaults that fit the model, one length parser)."""
import pytest

from headplan.errors import HeadplanError
from helpers import invoke


def _one_line_exit_2(r, msg):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.output, r.stderr


# -- item 6: one parser for the 'k' suffix (k = 1024) --------------------------------------------
def test_k_means_1024_in_every_flag():
    from headplan.lengths import parse_length, parse_lengths
    from headplan.search import parse_latency, parse_memory

    assert parse_lengths("2k,4K,1000") == [1000, 2048, 4096]
    assert parse_length("32k") == 32768
    assert parse_latency("40@32k") == (40.0, 32768)
    assert parse_memory("20@8x2k") == (20.0, 8, 2048)
    with pytest.raises(HeadplanError, match="not a length"):
        parse_lengths("2x")
    with pytest.raises(HeadplanError, match="--latency-budget takes"):
        parse_latency("40@abc")


# -- item 4/5: --version, flags ------------------------------------------------------------------
def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == "headplan 0.1.0"


def _commands():
    import typer.main

    from headplan.cli import app

    root = typer.main.get_command(app)
    todo = [(root.name, root)]
    while todo:
        name, cmd = todo.pop()
        yield name, cmd
        for sub, c in getattr(cmd, "commands", {}).items():
            todo.append((f"{name} {sub}", c))


def test_every_bool_option_is_an_on_off_flag():
    seen = 0
    for name, cmd in _commands():
        for p in cmd.params:
            if getattr(p, "is_flag", False) and p.name not in ("help", "version"):
                seen += 1
                assert p.secondary_opts and p.secondary_opts[0].startswith("--no-"), (name, p.opts)
        sub = name.split()[1:]
        if sub:
            r = invoke(*sub, "--help")
            assert all("<bool>" not in line for line in r.output.splitlines() if "--help" not in line), r.output
    assert seen >= 6


# -- item 4: noise --------------------------------------------------------------------------------
def test_loading_prints_no_progress_bars(tmp_path, capfd):
    from headplan.models import load_model

    d = tmp_path / "m"
    load_model("random:llama").model.save_pretrained(d)
    capfd.readouterr()
    load_model(str(d))
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    from transformers.utils import logging as tlog

    assert tlog.is_progress_bar_enabled()  # restored for the caller


def test_generate_with_a_plan_raises_no_cache_warning():
    import warnings

    import headplan
    from headplan.eval import _generate
    from helpers import ids, mixed_plan

    lm = headplan.load_model("random:llama")
    headplan.apply(lm.model, mixed_plan(lm))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        lm.model.generate(ids(40), max_new_tokens=3, do_sample=False, pad_token_id=0)
        mem = {}
        _generate(lm.model, ids(40), 3, None, mem)
        with headplan.dense(lm.model):
            _generate(lm.model, ids(40), 3, None, mem)
        headplan.runtime.prefill_chunked(lm.model, ids(40), headplan.new_cache(lm.model, 64), 16)
    assert mem["plan"] > 0 and mem["dense"] > 0


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "smollm2-135m" in block
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block.replace("smollm2-135m", "random:llama"), "README.md", "exec"), ns)
    assert ns["ok"] and ns["out"].shape[1] > ns["ids"].shape[1]


# -- item 1: select checks what depends only on its arguments before any work -------------------
@pytest.mark.parametrize("args,msg", [
    (["--samples", "1"], "pass --samples 2 or more"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--lengths", "2x"], "not a length"),
    (["--signals", "nope=1"], "--signals"),
])
def test_select_refuses_bad_arguments_before_loading(tmp_path, monkeypatch, args, msg):
    import headplan.models
    import headplan.profile

    def boom(*a, **k):
        raise AssertionError("loaded something before checking the arguments")

    monkeypatch.setattr(headplan.models, "load_model", boom)
    monkeypatch.setattr(headplan.profile, "load_profile", boom)
    out = tmp_path / "p.yaml"
    r = invoke("select", "random:llama", "--profile", tmp_path / "none.safetensors", "--out", out, *args)
    _one_line_exit_2(r, msg)
    assert not out.exists()


# -- items 2, 3: check compares plans as data; baseline plans regenerate as baselines ------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("wf") / "out")


def test_check_ignores_formatting_and_names_the_changed_head(run_dir, tmp_path):
    import shutil

    import yaml

    shutil.copy(run_dir / "profile.safetensors", tmp_path / "profile.safetensors")
    d = yaml.safe_load((run_dir / "plan.yaml").read_text())
    redumped = tmp_path / "plan.yaml"
    redumped.write_text(yaml.safe_dump(d))  # same plan, another tool's formatting
    assert redumped.read_text() != (run_dir / "plan.yaml").read_text()
    r = invoke("check", redumped)
    assert r.exit_code == 0, r.output
    head = d["layers"][1]["heads"][1]
    was = head["candidate"]
    assert was != "full"
    head.clear()
    head.update({"kv_head": 1, "candidate": "full", "pattern": "full", "kv": "all"})
    redumped.write_text(yaml.safe_dump(d))
    r = invoke("check", redumped)
    assert r.exit_code == 1
    assert f"layer 1 kv_head 1: full -> {was}" in r.stdout
    assert len(r.stdout.splitlines()) < 10, r.stdout  # the head, and the budget figures it moved


def test_baseline_plans_resolve_their_profile_and_check_as_baselines(run_dir, tmp_path):
    from headplan.plan import load_plan

    r = invoke("baselines", run_dir / "plan.yaml", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    grid = tmp_path / "g.yaml"
    grid.write_text("perplexity: {lengths: [256], samples: 1}\n")
    r = invoke("eval", "random:llama", "--plan", run_dir / "plan.yaml", "--baselines", "--data", grid,
               "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "b").glob("*.yaml")) + sorted((tmp_path / "ev" / "baselines").glob("*.yaml"))
    assert len(files) == 8
    for f in files:
        p = load_plan(f)
        assert (f.parent / p.provenance["profile"]["path"]).resolve() == (run_dir / "profile.safetensors").resolve()
        r = invoke("check", f)  # the profile lies outside the baseline's folder: refused without --root
        assert r.exit_code == 2 and "outside the plan's folder" in r.output, (f, r.output)
        import os

        r = invoke("check", f, "--root", os.path.commonpath([f.resolve(), run_dir.resolve()]))
        assert r.exit_code == 0, (f, r.output)
        r = invoke("check", f, "--profile", run_dir / "profile.safetensors")
        assert r.exit_code == 0, (f, r.output)


# -- item 6: defaults fit the model; explicit lengths that do not are refused with what to pass --
def _short_llama(tmp_path) -> str:
    """A Llama-shaped random model with only 2048 positions (the presets have 8K)."""
    import json

    p = tmp_path / "llama2k.json"
    p.write_text(json.dumps({"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 2048}))
    return f"random:{p}"


def test_run_defaults_fit_a_2048_position_model(tmp_path):
    import json

    r = invoke("run", _short_llama(tmp_path), "--out", tmp_path / "r", "--density", "0.4", "--samples", "1",
               "--candidates", "small", "--eval-data", "eval-small")
    assert r.exit_code == 0, r.output
    assert "does not fit the model's 2048 positions: using 2048" in r.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["profiled_lengths"] == [2048]


def test_explicit_lengths_too_long_say_what_to_pass(tmp_path):
    out = tmp_path / "p.safetensors"
    r = invoke("profile", _short_llama(tmp_path), "--lengths", "1k,4k", "--out", out)
    _one_line_exit_2(r, "length 4096 exceeds the model's 2048 positions: pass --lengths 1024")
    assert not out.exists()


def test_eval_lengths_and_samples_override_the_spec(run_dir, tmp_path):
    import json

    r = invoke("eval", "random:llama", "--plan", run_dir / "plan.yaml", "--data", "eval-small-grid",
               "--lengths", "512", "--samples", "1", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {x["length"] for x in res["perplexity"] + res["retrieval"]} == {512}
    assert {x["samples"] for x in res["perplexity"]} == {1}
    r = invoke("eval", "random:llama", "--plan", run_dir / "plan.yaml", "--lengths", "9k")
    _one_line_exit_2(r, "length 9216 exceeds the model's 8192 positions: pass --lengths 4096,8192")


# -- item 5: summaries ----------------------------------------------------------------------------
def test_run_summary_rows_are_unique_and_eval_says_how_far_from_dense(run_dir):
    import json

    from rich.console import Console

    from headplan.cli import _eval_table

    res = json.loads((run_dir / "eval.json").read_text())
    con = Console(width=200, record=True)
    con.print(_eval_table(res))
    text = con.export_text()
    # one method: a "vs dense" column; several (run evaluates the MoA-style baseline too): "(+N%)" in the cells
    assert "headplan" in text.splitlines()[0] + text and ("vs dense" in text or "%)" in text)
    ppl = res["perplexity"][0]
    want = f"{100 * (ppl['methods']['headplan']['ppl'] / ppl['ppl_dense'] - 1):+.0f}%"
    line = next(x for x in text.splitlines() if x.strip().startswith("│ perplexity") or "perplexity " in x)
    assert want in line, (want, line)
    r = invoke("run", "random:llama", "--out", run_dir.parent / "again", "--density", "0.4",
               "--lengths", "384,512", "--samples", "2", "--candidates", "small", "--eval-data", "eval-small")
    assert r.exit_code == 0, r.output
    items = [x.split("│")[1].strip() for x in r.stdout.split("headplan run:")[1].splitlines()
             if x.count("│") >= 3 and x.split("│")[1].strip()]
    assert len(items) == len(set(items)), items


def test_eval_progress_bar_covers_all_the_work(run_dir, monkeypatch):
    """Every forward pass happens before the bar's last step, and the steps add up to its total."""
    import contextlib

    import headplan.eval.driver as ev
    from headplan.plan import load_plan
    from headplan.progress import Reporter

    events = []
    for fn in ("_logits", "_generate"):
        orig = getattr(ev, fn)
        monkeypatch.setattr(ev, fn, lambda *a, _o=orig, **k: (events.append("work"), _o(*a, **k))[1])

    class Rec(Reporter):
        @contextlib.contextmanager
        def task(self, description, total):
            self.total = total
            yield lambda n=1: events.extend(["step"] * n)

    rep = Rec()
    spec = {"seed": 1, "perplexity": {"lengths": [256], "samples": 1},
            "passkey": {"lengths": [512], "depths": [0.5]}, "continuations": {"length": 64, "samples": 1, "tokens": 2}}
    import headplan

    lm = headplan.load_model("random:llama")
    ev.evaluate(lm, load_plan(run_dir / "plan.yaml"), spec, reporter=rep)
    assert events.count("step") == rep.total
    spec.pop("continuations")
    events.clear()
    ev.evaluate(lm, load_plan(run_dir / "plan.yaml"), spec, reporter=rep)
    assert events.count("step") == rep.total and events[-1] == "step", events[-6:]


def test_kv_report_uses_the_model_dtype_and_matches_a_full_cache():
    import torch

    import headplan
    from cases import full
    from helpers import ids, plan_for

    lm = headplan.load_model("random:llama")
    full_plan = plan_for(lm, lambda li, h: full())
    headplan.apply(lm.model, full_plan)
    cache = headplan.new_cache(lm.model, 64)
    with torch.no_grad():
        lm.model(ids(64), use_cache=True, **{headplan.runtime.cache_kwarg(lm.model): cache})
    rep = headplan.kv_report(full_plan, 64, model=lm.model)
    assert rep["dtype_bytes"] == 4 and rep["dense_bytes"] == rep["plan_bytes"]
    assert rep["dense_bytes"] <= cache.kv_bytes() < 1.1 * rep["dense_bytes"]  # the cache pads a little
    assert headplan.kv_report(full_plan, 64)["dtype_bytes"] == 2  # no model: the bf16 default, said in the result


def test_report_figures_legends_titles_and_quality_axis(run_dir, monkeypatch, tmp_path):
    import json

    import headplan.report.plots as rm
    from headplan.plan import load_plan

    figs = {}

    def keep(fig, path):
        fig.canvas.draw()
        figs[path.name] = fig
        return path

    monkeypatch.setattr(rm, "_save", keep)
    res = json.loads((run_dir / "eval.json").read_text())
    plan = load_plan(run_dir / "plan.yaml")
    rm.plot_head_maps([("a", plan), ("b", plan)], tmp_path / "h.png")
    fig = figs["h.png"]
    leg = fig.legends[0].get_window_extent()
    assert not any(leg.overlaps(ax.get_window_extent()) for ax in fig.axes), "legend covers head-map cells"
    res["grid"] = [{"task": "passkey", "length": n, "depth": d, "samples": 1, "acc": {"dense": 1, "headplan": 0}}
                   for n in (384, 512) for d in (0.2, 0.8)]
    rm.plot_heatmaps(res, "passkey", tmp_path / "p.png", "passkey accuracy (length x depth)")
    fig = figs["p.png"]
    sup = fig._suptitle.get_window_extent()
    assert not any(sup.overlaps(ax.title.get_window_extent()) for ax in fig.axes if ax.get_title())
    other = json.loads(json.dumps(res))
    other["texts"] = [{"source": "mine.txt", "sha256": "x"}]
    pts = rm.method_points(res)
    nm = len(res["methods"])  # the plan, and the MoA-style baseline `run` evaluates beside it
    assert [p["density_budget"] for p in pts] == [1.0] + [0.4] * nm  # the budget, not the mean over eval lengths
    rm.plot_quality_vs_density([(".", pts), ("b", rm.method_points(other))], tmp_path / "q.png")
    ax = figs["q.png"].axes[0]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("dense")]
    assert len(lines) == 2 * nm and {tuple(ln.get_xdata()) for ln in lines} == {(0.4,)}  # per method and text
    assert "budget" in ax.get_xlabel()
    q = figs["q.png"]
    leg = q.legends[0].get_window_extent()
    assert not any(leg.overlaps(a.get_window_extent()) for a in q.axes)


def test_default_eval_spec_fits_the_model_answers_included():
    from headplan.data import load_task_file
    from headplan.eval import spec_for

    spec, note = spec_for(load_task_file(None, "eval"), 2048, given=False)
    assert spec["perplexity"]["lengths"] == [2048]
    assert spec["passkey"]["lengths"] == [1024]  # 2048 + the generated answer would pass 2048 positions
    assert "2048" in note and "\n" not in note
    assert spec_for(load_task_file(None, "eval"), 8192, given=False) == (load_task_file(None, "eval"), None)
