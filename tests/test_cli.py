"""The CLI: the whole pipeline on a tiny model, and the bad-input matrix (one line, exit 2)."""
import subprocess
import sys

import pytest

from helpers import SMALL_RUN, invoke, tiny_run

SMALL = SMALL_RUN


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run") / "out")


def test_run_writes_everything(run_dir):
    for f in ("profile.safetensors", "plan.yaml", "eval.json", "summary.json"):
        assert (run_dir / f).is_file(), f


def test_check_passes_then_detects_drift(run_dir, tmp_path):
    r = invoke("check", run_dir / "plan.yaml")
    assert r.exit_code == 0, r.output
    text = (run_dir / "plan.yaml").read_text()
    drifted = tmp_path / "plan.yaml"
    import shutil
    shutil.copy(run_dir / "profile.safetensors", tmp_path / "profile.safetensors")
    lines = text.splitlines(True)
    i = next(i for i, line in enumerate(lines) if "candidate:" in line)
    lines[i] = lines[i].replace("candidate:", "candidate: x") 
    drifted.write_text("".join(lines))
    r = invoke("check", drifted)
    assert r.exit_code == 1
    assert "regenerated" in r.output


def test_search_cli_and_apply_generate_and_save(run_dir, tmp_path):
    plan = tmp_path / "p.yaml"
    r = invoke("search", run_dir / "profile.safetensors", "--out", plan, "--density", "0.5")
    assert r.exit_code == 0, r.output
    r = invoke("apply", "random:llama", plan, "--prompt", "hello there", "--max-new-tokens", "5",
               "--out", tmp_path / "patched")
    assert r.exit_code == 0, r.output
    assert "plan :" in r.output
    import headplan
    lm = headplan.load_patched(tmp_path / "patched")
    assert lm.model.config._attn_implementation == "headplan"
    r = invoke("eval", "random:llama", "--plan", plan, "--data", "eval-small", "--json")
    assert r.exit_code == 0, r.output
    assert '"ppl_plan"' in r.output


def _bad_plan(run_dir, tmp_path, edit):
    p = tmp_path / "bad.yaml"
    p.write_text(edit((run_dir / "plan.yaml").read_text()))
    return p


@pytest.mark.parametrize("case", [
    "missing_model", "missing_plan", "not_gguf", "malformed_yaml", "unknown_pattern", "missing_field",
    "wrong_model", "infeasible_density", "length_beyond_positions", "empty_text", "missing_profile",
    "bad_out_suffix", "bad_lengths",
])
def test_bad_input_matrix(case, run_dir, tmp_path):
    plan = run_dir / "plan.yaml"
    prof = run_dir / "profile.safetensors"
    out_plan = tmp_path / "new.yaml"
    if case == "missing_model":
        args, msg = ["apply", tmp_path / "nope", plan], "model not found"
    elif case == "missing_plan":
        args, msg = ["apply", "random:llama", tmp_path / "nope.yaml"], "plan file not found"
    elif case == "not_gguf":
        f = tmp_path / "m.gguf"
        f.write_bytes(b"NOTGGUF" * 10)
        args, msg = ["eval", f, "--plan", plan], "not a GGUF file"
    elif case == "malformed_yaml":
        args, msg = ["apply", "random:llama", _bad_plan(run_dir, tmp_path, lambda t: t + "\n  - : [\n")], "malformed YAML"
    elif case == "unknown_pattern":
        args, msg = ["apply", "random:llama", _bad_plan(run_dir, tmp_path, lambda t: t.replace("pattern: streaming", "pattern: zigzag", 1))], "unknown pattern 'zigzag'"
    elif case == "missing_field":
        args, msg = ["apply", "random:llama", _bad_plan(run_dir, tmp_path, lambda t: t.replace("  num_kv_heads: 2\n", "", 1))], "model.num_kv_heads: missing"
    elif case == "wrong_model":
        args, msg = ["apply", "random:qwen2", plan], "plan is for another model"
    elif case == "infeasible_density":
        args, msg = ["search", prof, "--out", out_plan, "--density", "0.01"], "infeasible"
    elif case == "length_beyond_positions":
        args, msg = ["profile", "random:llama", "--out", tmp_path / "p.safetensors", "--lengths", "9000"], "exceeds the model's 8192 positions"
    elif case == "empty_text":
        t = tmp_path / "empty.txt"
        t.write_text("   \n")
        args, msg = ["profile", "random:llama", "--out", tmp_path / "p.safetensors", "--lengths", "512", "--text", t], "text file is empty"
    elif case == "missing_profile":
        args, msg = ["search", tmp_path / "none.safetensors", "--out", out_plan], "profile not found"
    elif case == "bad_out_suffix":
        args, msg = ["search", prof, "--out", tmp_path / "plan.json"], "must end with .yaml"
    elif case == "bad_lengths":
        args, msg = ["profile", "random:llama", "--lengths", "abc"], "not a length"
    r = invoke(*args)
    assert r.exit_code == 2, (case, r.output)
    err = r.stderr
    assert msg in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out_plan.exists() and not (tmp_path / "p.safetensors").exists()


def test_real_process_exit_code_and_single_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "headplan.cli", "search", str(tmp_path / "x.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"headplan: error: profile not found: {tmp_path / 'x.safetensors'}"]


def test_run_with_another_profiling_method(tmp_path):
    import json

    r = invoke("run", "random:llama", "--out", tmp_path / "g", "--density", "0.4", "--method", "gradient,recall",
               *SMALL_RUN)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert s["method"] == "gradient+recall" and "gradient+recall" in r.output
    from headplan.profile import load_profile

    assert set(load_profile(tmp_path / "g" / "profile.safetensors").parts) == {"gradient", "recall", "gradient.lm", "gradient.answer"}
    r = invoke("run", "random:llama", "--out", tmp_path / "h", "--method", "attention", *SMALL_RUN)
    assert r.exit_code == 2 and "unknown profiling method" in r.stderr and not (tmp_path / "h").exists()


def test_run_shows_the_moa_baseline_beside_the_plan_by_default(run_dir):
    import json

    res = json.loads((run_dir / "eval.json").read_text())
    assert [m["name"] for m in res["methods"]] == ["headplan", "moa"]
    assert res["methods"][1]["budget"]  # the same budget as the plan
    r = invoke("run", "random:llama", "--out", run_dir.parent / "nob", "--baselines", "nope", *SMALL_RUN)
    assert r.exit_code == 2 and "unknown baseline" in r.output


def test_run_defaults_to_plan_in_the_loop_without_dynamic_kinds(run_dir, tmp_path):
    """The default run refines its plan (recorded, checkable) and leaves the dynamic kinds out; a bad kind
    is refused before any work."""
    import json

    from headplan.plan import DYNAMIC_KINDS, load_plan

    plan = load_plan(run_dir / "plan.yaml")
    info = plan.provenance["search"]["refine"]
    assert info["rounds"] == 2 and info["kept"] in ("round0", "round1w", "round2w") and info["windows"] is True
    assert not any(e.pattern.kind in DYNAMIC_KINDS for layer in plan.layers for e in layer)
    assert json.loads((run_dir / "summary.json").read_text())["refine_rounds"] == 2
    r = invoke("run", "random:llama", "--out", tmp_path / "x", "--exclude-kinds", "nope", *SMALL_RUN)
    assert r.exit_code == 2 and "unknown pattern kind 'nope'" in r.stderr and not (tmp_path / "x").exists()


def test_the_validation_table_marks_the_kept_round():
    """run prints plan in the loop's rounds; a kept ``round{r}w`` (not measured itself) marks round r and says why."""
    from rich.console import Console

    from headplan.cli import _validation_table

    rows = {"round0": {"ppl_vs_dense": 1.2, "answer_nll": 4.0, "lm_nll": 2.0, "counts": {"full": 3}},
            "round1": {"ppl_vs_dense": 1.1, "answer_nll": 0.9, "lm_nll": 2.1, "counts": {"full": 8}},
            "round1w": {"counts": {"full": 8, "streaming": 82}}}
    con = Console(width=200, record=True)
    con.print(_validation_table(rows, "round1w", "t"))
    out = con.export_text()
    assert "* round1 " in out and "* round0" not in out and "round1w" in out and "+10.0%" in out
    con = Console(width=200, record=True)
    con.print(_validation_table(rows, "round0", "t"))
    out = con.export_text()
    assert "* round0" in out and "kept" not in out


def test_run_with_no_budget_keeps_a_quarter_of_the_kv_beside_moa_and_snapkv(tmp_path):
    """No --density and no --kv-budget: KV budget 0.25 with prefill unbounded, baselines moa and snapkv, and the
    dynamic kinds (left out of the plan) not profiled."""
    import json

    from headplan.pipeline import run_baselines
    from headplan.profile import load_profile

    r = invoke("run", "random:llama", "--out", tmp_path / "r", *SMALL_RUN)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["kv_budget"] == 0.25 and s["density_budget"] is None and "KV 0.25" in r.output
    res = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert [m["name"] for m in res["methods"]] == ["headplan", "moa", "snapkv"]
    kinds = {c.pattern.kind for c in load_profile(tmp_path / "r" / "profile.safetensors").candidates}
    assert "select" in kinds and not kinds & {"vslash", "blocksparse"}
    assert run_baselines("default", 0.4) == "moa" and run_baselines("default", None) == "moa,snapkv"
    assert run_baselines("duo", None) == "duo"
