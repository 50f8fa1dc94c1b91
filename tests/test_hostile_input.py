"""Issue 13: no data loss, no hostile-input holes. Bad input anywhere: one line on stderr naming the
field or flag, exit 2, no traceback, nothing half-written."""
import os
import subprocess
import sys

import pytest
import yaml

from helpers import invoke

PROFILE_ARGS = ["--lengths", "256,384", "--samples", "1", "--candidates", "small"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny profile and a plan searched from it, in one folder."""
    d = tmp_path_factory.mktemp("made")
    r = invoke("profile", "random:llama", "--out", d / "p.safetensors", *PROFILE_ARGS)
    assert r.exit_code == 0, r.output
    r = invoke("search", d / "p.safetensors", "--out", d / "plan.yaml", "--density", "0.5")
    assert r.exit_code == 0, r.output
    return d


def one_line_exit2(r, *needles):
    """The CLI rule for bad input: exit 2, one stderr line containing every needle, no traceback."""
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def plan_dict(made):
    return yaml.safe_load((made / "plan.yaml").read_text())


def write_plan(path, d):
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# -- 2: aliases, duplicate keys, unknown fields -------------------------------------------------------

def test_plan_with_yaml_aliases_is_refused(made, tmp_path):
    text = (made / "plan.yaml").read_text()
    bomb = "".join(f"  x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9 if i else ["lol"] * 9) + "]\n"
                   for i in range(9))
    p = tmp_path / "plan.yaml"
    p.write_text(text.replace("provenance:\n", "provenance:\n" + bomb, 1))
    (tmp_path / "p.safetensors").write_bytes((made / "p.safetensors").read_bytes())
    one_line_exit2(invoke("check", p), "YAML anchors are not allowed")
    one_line_exit2(invoke("apply", "random:llama", p, "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_plan_alias_alone_is_refused(made, tmp_path):
    text = (made / "plan.yaml").read_text().replace("solver: milp-highs", "solver: *x", 1)
    p = tmp_path / "a.yaml"
    p.write_text(text)
    one_line_exit2(invoke("apply", "random:llama", p), "aliases are not allowed")


def test_plan_duplicate_key_is_refused(made, tmp_path):
    text = (made / "plan.yaml").read_text().replace("  num_layers: 2\n", "  num_layers: 2\n  num_layers: 2\n", 1)
    p = tmp_path / "d.yaml"
    p.write_text(text)
    one_line_exit2(invoke("apply", "random:llama", p), "duplicate key 'num_layers'")


@pytest.mark.parametrize("where", ["top", "model", "budget", "layer", "window"])
def test_plan_unknown_field_is_refused(made, tmp_path, where):
    d = plan_dict(made)
    if where == "top":
        d["extra"], field = 1, "plan.yaml.extra"
    elif where == "model":
        d["model"]["colour"], field = "red", "model.colour"
    elif where == "budget":
        d["budget"]["gamma"], field = 1, "budget.gamma"
    elif where == "layer":
        d["layers"][0]["gamma"], field = 1, "layers[0].gamma"
    else:
        h = next(h for layer in d["layers"] for h in layer["heads"] if "window" in h)
        h["window"]["gamma"], field = 1, "window.gamma"
    one_line_exit2(invoke("apply", "random:llama", write_plan(tmp_path / "plan.yaml", d)), field, "unknown field")


# -- 4: out-of-range and mistyped plan fields -----------------------------------------------------------

def _edit_head(d, key, value):
    for layer in d["layers"]:
        for h in layer["heads"]:
            if key in h or (key == "alpha" and "window" in h):
                if key == "alpha":
                    h["window"]["alpha"] = value
                else:
                    h[key] = value
                return d
    raise AssertionError(f"no head with {key}")


@pytest.mark.parametrize("case", ["sink", "alpha", "block_size", "achieved_scalar", "achieved_big",
                                  "search_density", "search_lengths", "search_cost", "profile_path",
                                  "architecture"])
def test_plan_field_out_of_range_or_mistyped(made, tmp_path, case):
    d = plan_dict(made)
    if case == "sink":
        _edit_head(d, "sink", 2**31)
        field = "sink: must be <="
    elif case == "alpha":
        _edit_head(d, "alpha", 2**40)
        field = "window.alpha: must be <="
    elif case == "block_size":
        d["block_size"], field = 2**100, "block_size"
    elif case == "achieved_scalar":
        d["budget"]["achieved_density"], field = 5, "budget.achieved_density: expected a list"
    elif case == "achieved_big":
        d["budget"]["achieved_density"], field = [5, 0.1], "budget.achieved_density[0]"
    elif case == "search_density":
        d["provenance"]["search"]["density"], field = "half", "provenance.search.density"
    elif case == "search_lengths":
        d["provenance"]["search"]["lengths"], field = 256, "provenance.search.lengths"
    elif case == "search_cost":
        d["provenance"]["search"]["cost_table"], field = "x.yaml", "provenance.search.cost_table"
    elif case == "architecture":
        d["model"]["architecture"], field = ["LlamaForCausalLM"], "model.architecture: expected a string"
    else:
        d["provenance"]["profile"]["path"], field = 5, "provenance.profile.path"
    p = write_plan(tmp_path / "plan.yaml", d)
    for args in (["check", p], ["apply", "random:llama", p]):
        one_line_exit2(invoke(*args), field)


# -- 1: apply --out never deletes what headplan did not write --------------------------------------------

def test_apply_out_refuses_foreign_nonempty_dir(made, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (tmp_path / "mine.tmp").mkdir()
    (tmp_path / "mine.tmp" / "keep.txt").write_text("unrelated")
    one_line_exit2(invoke("apply", "random:llama", made / "plan.yaml", "--out", out), "--force")
    assert (out / "notes.txt").read_text() == "precious"
    assert (tmp_path / "mine.tmp" / "keep.txt").read_text() == "unrelated"
    # --out .. (the parent of the working folder) is refused the same way, nothing removed
    sub = tmp_path / "work"
    sub.mkdir()
    r = subprocess.run([sys.executable, "-m", "headplan.cli", "apply", "random:llama", str(made / "plan.yaml"),
                        "--out", ".."], cwd=sub, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (out / "notes.txt").exists() and sub.exists()
    # with --force the files are added and nothing else is removed; the unrelated DIR.tmp survives
    r = invoke("apply", "random:llama", made / "plan.yaml", "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "precious" and (out / "plan.yaml").is_file()
    assert (tmp_path / "mine.tmp" / "keep.txt").read_text() == "unrelated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mine.tmp", "work"]


def test_apply_out_replaces_a_headplan_output(made, tmp_path):
    out = tmp_path / "patched"
    assert invoke("apply", "random:llama", made / "plan.yaml", "--out", out).exit_code == 0
    assert oct((out / "plan.yaml").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    (out / "notes.txt").write_text("mine")
    r = invoke("apply", "random:llama", made / "plan.yaml", "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "plan.yaml").is_file() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patched"]  # no temporary left behind


def test_apply_out_refuses_a_working_folder_with_a_plan(made, tmp_path):
    """A folder holding a searched plan.yaml (and its profile) is not an `apply --out` directory."""
    work = tmp_path / "work"
    work.mkdir()
    for f in ("plan.yaml", "p.safetensors"):
        (work / f).write_bytes((made / f).read_bytes())
    one_line_exit2(invoke("apply", "random:llama", work / "plan.yaml", "--out", work), "--force")
    r = subprocess.run([sys.executable, "-m", "headplan.cli", "apply", "random:llama", "plan.yaml", "--out", "."],
                       cwd=work, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["p.safetensors", "plan.yaml"]
    r = invoke("apply", "random:llama", work / "plan.yaml", "--out", work, "--force")
    assert r.exit_code == 0, r.output
    assert (work / "p.safetensors").read_bytes() == (made / "p.safetensors").read_bytes()
    assert (work / "config.json").is_file() and not [p for p in work.iterdir() if p.name.startswith(".")]


def test_apply_out_onto_a_file(made, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_exit2(invoke("apply", "random:llama", made / "plan.yaml", "--out", f), "not a directory")
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# -- 4: flags checked before any work; unusable --out for every command that writes ----------------------

def test_search_bad_pareto_writes_nothing(made, tmp_path):
    out = tmp_path / "plan.yaml"
    one_line_exit2(invoke("search", made / "p.safetensors", "--out", out, "--pareto", "-3"), "--pareto")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _writers(made, out_file, out_dir):
    plan, prof = made / "plan.yaml", made / "p.safetensors"
    return {
        "profile": ["profile", "random:llama", "--out", out_file("p.safetensors"), *PROFILE_ARGS],
        "search": ["search", prof, "--out", out_file("x.yaml")],
        "select": ["select", "random:llama", "--profile", prof, "--out", out_file("x.yaml")],
        "costmodel": ["costmodel", "measure", "--out", out_file("c.yaml")],
        "apply": ["apply", "random:llama", plan, "--out", out_dir()],
        "eval": ["eval", "random:llama", "--plan", plan, "--out", out_dir()],
        "baselines": ["baselines", plan, "--out", out_dir()],
        "report": ["report", made, "--out", out_dir()],
        "run": ["run", "random:llama", "--out", out_dir(), "--lengths", "256", "--samples", "1"],
    }


@pytest.mark.parametrize("cmd", ["profile", "search", "select", "costmodel", "apply", "eval", "baselines",
                                 "report", "run"])
def test_unusable_out_parent_is_a_file(made, tmp_path, cmd):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    args = _writers(made, lambda n: blocker / n, lambda: blocker / "d")[cmd]
    one_line_exit2(invoke(*args), "--out", "not a directory")
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("cmd", ["profile", "search", "apply", "eval", "baselines", "report", "run"])
def test_unusable_out_read_only_dir(made, tmp_path, cmd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        args = _writers(made, lambda n: ro / n, lambda: ro / "d")[cmd]
        one_line_exit2(invoke(*args), "--out", "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_write_failure_is_one_line(tmp_path, monkeypatch):
    """A write that fails anyway (disk full, read-only file system) is one line, not a traceback."""
    from headplan.errors import HeadplanError
    from headplan.plan import atomic_write

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(HeadplanError, match="cannot write .*No space left"):
        atomic_write(tmp_path / "f.yaml", "x")
    assert list(tmp_path.iterdir()) == []


# -- 3: provenance paths stay inside the plan's folder; no file contents in messages ----------------------

SECRET = "TOPSECRET-line-of-another-file"


@pytest.mark.parametrize("field", ["profile", "cost_table"])
@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_check_refuses_provenance_paths_outside_the_plan_folder(made, tmp_path, field, how):
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{SECRET}: [\n")
    folder = tmp_path / "plans"
    folder.mkdir()
    d = plan_dict(made)
    target = str(secret) if how == "absolute" else "../secret.txt"
    if field == "profile":
        d["provenance"]["profile"]["path"] = target
        (folder / "p.safetensors").write_bytes((made / "p.safetensors").read_bytes())
        name = "provenance.profile.path"
    else:
        d["provenance"]["profile"]["path"] = "p.safetensors"
        (folder / "p.safetensors").write_bytes((made / "p.safetensors").read_bytes())
        d["provenance"]["search"]["cost_table"] = {"source": "analytic", "device": "x", "path": target}
        name = "provenance.search.cost_table.path"
    p = write_plan(folder / "plan.yaml", d)
    r = invoke("check", p)
    line = one_line_exit2(r, name, "outside the plan's folder")
    assert SECRET not in r.output
    if field == "profile":  # the same file given on the command line is read (and is no profile)
        line = one_line_exit2(invoke("check", p, "--profile", secret), "not a safetensors profile")
        assert SECRET not in line
    # --root widens the folder to a repository, never beyond it: a path leaving the root is still refused,
    # and a root that does not hold the plan is an error
    if how != "absolute":
        line = one_line_exit2(invoke("check", p, "--root", folder), name, "outside --root")
        assert SECRET not in r.output
        (folder / "sub").mkdir()
        line = one_line_exit2(invoke("check", p, "--root", folder / "sub"), "--root", "not inside it")


def test_cost_table_errors_do_not_echo_the_file(made, tmp_path):
    d = plan_dict(made)
    bad = tmp_path / "cost.yaml"
    bad.write_text(f"{SECRET}: [\n")
    d["provenance"]["search"]["cost_table"] = {"source": "analytic", "device": "x", "path": "cost.yaml"}
    (tmp_path / "p.safetensors").write_bytes((made / "p.safetensors").read_bytes())
    r = invoke("check", write_plan(tmp_path / "plan.yaml", d))
    one_line_exit2(r, "cost.yaml", "malformed YAML")
    assert SECRET not in r.output


@pytest.mark.parametrize("extra", ["unknown_key", "bad_rate"])
def test_cost_table_fields_are_checked_without_echo(tmp_path, extra):
    from headplan.costmodel import SCHEMA, analytic, load_cost_table
    from headplan.errors import HeadplanError

    d = {**analytic(16, 2).to_dict(), "schema_version": SCHEMA}
    if extra == "unknown_key":
        d[SECRET] = 1
    else:
        d["per_pair_ns"]["full"] = SECRET
    f = tmp_path / "cost.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(HeadplanError) as e:
        load_cost_table(f)
    assert SECRET not in str(e.value) and "cost.yaml" in str(e.value)
    good = tmp_path / "good.yaml"
    analytic(16, 2).save(good)
    assert load_cost_table(good).head_dim == 16


@pytest.mark.parametrize("field,value", [("prefill_launch_us", -3.0), ("decode_launch_us", float("nan")),
                                         ("decode_bytes_per_s", 0.0), ("dense_per_pair_ns", -1e-3),
                                         ("route_ns_per_token", float("inf")), ("head_dim", 0), ("group", -2)])
def test_cost_table_numbers_are_range_checked(tmp_path, field, value):
    """Negative, NaN or infinite rates (and a zero bandwidth or head size) are refused on load, naming the field."""
    from headplan.costmodel import SCHEMA, analytic, load_cost_table
    from headplan.errors import HeadplanError

    d = {**analytic(16, 2).to_dict(), "schema_version": SCHEMA, field: value}
    f = tmp_path / "cost.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(HeadplanError, match=f"cost.yaml.{field}: expected a finite number"):
        load_cost_table(f)


# -- 5: profiles are byte-identical across processes -------------------------------------------------------

def test_profile_bytes_do_not_depend_on_the_process(tmp_path):
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-m", "headplan.cli", "profile", "random:llama", "--out", str(out),
                        "--lengths", "256", "--samples", "1", "--candidates", "small"], env=env, check=True,
                       capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    from headplan.profile import load_profile

    load_profile(tmp_path / "p1.safetensors")  # still a valid profile


# -- 6: profile contents are validated on load ----------------------------------------------------------------

def _redigest(src, dst, edit_header=None, edit_tensors=None):
    """A profile whose header/tensors were changed and whose digest was recomputed (so only validation
    can catch it)."""
    import json

    from safetensors.torch import load, save

    from headplan.profile import _digest

    raw = src.read_bytes()
    tensors = load(raw)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["headplan"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    meta = {"headplan": json.dumps(header, sort_keys=True), "digest": _digest(header, tensors)}
    dst.write_bytes(save(tensors, metadata=meta))
    return dst


def _set(key, value):
    def f(h):
        h[key] = value
    return f


@pytest.mark.parametrize("case,field", [
    ("lengths_type", "header.lengths"), ("negative_length", "header.lengths[0]"),
    ("samples_type", "header.samples"), ("model_type", "header.model"),
    ("unknown_kind", "header.candidates[1].pattern"), ("candidate_type", "header.candidates[0]"),
    ("nan_loss", "tensor loss"), ("wrong_shape", "tensor loss"), ("density_range", "tensor density"),
    ("signals_type", "header.signals"),
])
def test_search_refuses_a_redigested_bad_profile(made, tmp_path, case, field):
    src = made / "p.safetensors"
    eh = et = None
    if case == "lengths_type":
        eh = _set("lengths", "256")
    elif case == "negative_length":
        eh = _set("lengths", [-256, 384])
    elif case == "samples_type":
        eh = _set("samples", "many")
    elif case == "model_type":
        eh = _set("model", ["x"])
    elif case == "unknown_kind":
        eh = lambda h: h["candidates"][1].update(kind="zigzag")  # noqa: E731
    elif case == "candidate_type":
        eh = lambda h: h["candidates"].__setitem__(0, 5)  # noqa: E731
    elif case == "nan_loss":
        et = lambda t: t["loss"].__setitem__((0, 0, 1, 0), float("nan"))  # noqa: E731
    elif case == "wrong_shape":
        et = lambda t: t.__setitem__("loss", t["loss"][:1].contiguous())  # noqa: E731
    elif case == "density_range":
        et = lambda t: t.__setitem__("density", t["density"] * 0 + 7)  # noqa: E731
    elif case == "signals_type":
        eh = _set("signals", {"recall": 5})
    bad = _redigest(src, tmp_path / "bad.safetensors", eh, et)
    out = tmp_path / "plan.yaml"
    one_line_exit2(invoke("search", bad, "--out", out, "--density", "0.5"), field)
    assert not out.exists()



# -- 4: calibration mixtures and the cost model ---------------------------------------------------------------

@pytest.mark.parametrize("case,needle", [
    ("binary", "NUL"), ("nan_share", "tasks[0].share"), ("tasks_int", "tasks: expected a list"),
    ("task_type", "tasks[0]: expected a mapping"), ("negative_share", "tasks[1].share"),
    ("samples_type", "samples_per_length"),
])
def test_profile_refuses_a_bad_data_spec(tmp_path, case, needle):
    f = tmp_path / "mix.yaml"
    if case == "binary":
        f.write_bytes(b"\x00\x01\x02\xff" * 50)
    elif case == "nan_share":
        f.write_text("tasks:\n  - {task: lm, share: .nan}\n")
    elif case == "tasks_int":
        f.write_text("tasks: 5\n")
    elif case == "task_type":
        f.write_text("tasks: [lm]\n")
    elif case == "negative_share":
        f.write_text("tasks:\n  - {task: lm, share: 1}\n  - {task: passkey, share: -1}\n")
    else:
        f.write_text("samples_per_length: many\ntasks:\n  - {task: lm}\n")
    out = tmp_path / "p.safetensors"
    one_line_exit2(invoke("profile", "random:llama", "--out", out, "--data", f, *PROFILE_ARGS), needle)
    assert not out.exists()


def test_costmodel_validate_without_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    one_line_exit2(invoke("costmodel", "validate", "--table", "analytic", "--plans", "1"), "CUDA GPU")


# -- 7: the plan's model fields, binary text, output modes, non-regular inputs ------------------------------------

@pytest.mark.parametrize("field,value", [("architecture", "MistralForCausalLM"), ("max_positions", 4096)])
def test_apply_compares_model_fields_not_just_the_fingerprint(made, tmp_path, field, value):
    d = plan_dict(made)
    d["model"][field] = value
    p = write_plan(tmp_path / "plan.yaml", d)
    one_line_exit2(invoke("apply", "random:llama", p), f"model.{field}")


def test_binary_text_is_refused(tmp_path):
    t = tmp_path / "t.txt"
    t.write_bytes(b"hello\x00world" * 100)
    one_line_exit2(invoke("profile", "random:llama", "--out", tmp_path / "p.safetensors", "--text", t,
                          *PROFILE_ARGS), "text file", "NUL")
    t.write_bytes(b"caf\xe9 " * 100)
    one_line_exit2(invoke("profile", "random:llama", "--out", tmp_path / "p.safetensors", "--text", t,
                          *PROFILE_ARGS), "text file", "not UTF-8")
    assert not (tmp_path / "p.safetensors").exists()


def test_outputs_follow_the_umask(made, tmp_path):
    old = os.umask(0o002)
    try:
        r = invoke("search", made / "p.safetensors", "--out", tmp_path / "plan.yaml", "--density", "0.5")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plan.yaml").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize("what", ["plan", "profile", "text", "data"])
@pytest.mark.parametrize("special", ["devzero", "fifo"])
def test_non_regular_inputs_are_named_so(made, tmp_path, what, special):
    if special == "devzero":
        path = "/dev/zero"
    else:
        path = tmp_path / "fifo"
        os.mkfifo(path)
    out = tmp_path / "o.safetensors"
    args = {"plan": ["apply", "random:llama", path],
            "profile": ["search", path, "--out", tmp_path / "x.yaml"],
            "text": ["profile", "random:llama", "--out", out, "--text", path, *PROFILE_ARGS],
            "data": ["profile", "random:llama", "--out", out, "--data", path, *PROFILE_ARGS]}[what]
    one_line_exit2(invoke(*args), "not a regular file", str(path))
