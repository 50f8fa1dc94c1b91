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
    from headplan.api import parse_length, parse_lengths
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
