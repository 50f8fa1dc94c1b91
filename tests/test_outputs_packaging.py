"""Issue 24: the wheel holds every sub-package; report reads only plans inside its run folder; --out
directories are written whole (staged beside, swapped in), so a failure leaves the old one as it was."""
import json
import os
import tomllib
import warnings
from pathlib import Path

import pytest

from helpers import invoke

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(density=0.4, lengths="384", samples=2, candidates="small", eval_data="eval-small", refine=0)


# -- 1: packaging --------------------------------------------------------------------------------
def test_package_discovery_covers_every_package_under_headplan(monkeypatch):
    """Every folder of headplan/ with an __init__.py is a package of the distribution (as setuptools
    configures it from pyproject.toml), and kernels/, calibration_data/ and the YAML data go along."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["headplan.kernels"] == "kernels"
    assert cfg["package-dir"]["headplan.calibration_data"] == "calibration_data"
    assert "*.yaml" in cfg["package-data"]["headplan.calibration_data"]
    assert "devices/*.yaml" in cfg["package-data"]["headplan.costmodel"]
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist = apply_configuration(Distribution(), "pyproject.toml")
        dist.set_defaults(name=False)  # setuptools' own package discovery, as a build runs it
    found = set(dist.packages)
    want = {".".join(("headplan", *p.parent.relative_to(ROOT / "headplan").parts))
            for p in (ROOT / "headplan").rglob("__init__.py") if "__pycache__" not in p.parts}
    assert "headplan.report" in want
    assert want <= found, sorted(want - found)
    assert {"headplan.kernels", "headplan.calibration_data"} <= found
    assert (dist.package_dir or {}).get("headplan.kernels") == "kernels"


# -- fixtures: one small run ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from headplan.api import do_run

    out = tmp_path_factory.mktemp("pkgrun") / "r"
    do_run("random:llama", out, **RUN)
    return out


def _tree(d: Path) -> dict:
    """{relative path: bytes} of every file under ``d`` (links as their target text)."""
    return {str(p.relative_to(d)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_file() or p.is_symlink()}


def _staged_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".stage-" in p.name or ".old-" in p.name]


class _Log:
    def __init__(self):
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)

    def task(self, description, total):
        import contextlib

        return contextlib.nullcontext(lambda n=1: None)


# -- 2: plan_file paths recorded relative to the run folder, followed only inside it ---------------
def test_run_records_plan_files_relative_and_a_moved_run_keeps_its_head_maps(run_dir, tmp_path):
    import shutil

    res = json.loads((run_dir / "eval.json").read_text())
    assert [m["plan_file"] for m in res["methods"]] == ["plan.yaml", "baselines/moa.yaml"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["files"]["plan"] == str(run_dir / "plan.yaml") and summary["eval"]["plan"] == str(run_dir / "plan.yaml")
    assert "path: ../profile.safetensors," in (run_dir / "baselines" / "moa.yaml").read_text()
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    from headplan.report.read import _plan_for

    assert _plan_for("plan.yaml", moved / "eval.json", moved) is not None
    assert _plan_for("baselines/moa.yaml", moved / "eval.json", moved) is not None
    assert _plan_for(str(moved / "plan.yaml"), moved / "eval.json", moved) is not None  # old: absolute inside


def test_eval_records_plan_inside_out_relative_and_outside_absolute(run_dir, tmp_path):
    import shutil

    from headplan.api import do_eval

    spec = tmp_path / "g.yaml"
    spec.write_text("passkey: {lengths: [384], depths: [0.5]}\n")
    ev = tmp_path / "ev"
    ev.mkdir()
    shutil.copy(run_dir / "plan.yaml", ev / "mine.yaml")
    res = do_eval("random:llama", [str(run_dir / "plan.yaml"), f"mine={ev / 'mine.yaml'}"], ev, data=str(spec))
    assert [m["plan_file"] for m in res["methods"]] == [str((run_dir / "plan.yaml").resolve()), "mine.yaml"]
    assert json.loads((ev / "eval.json").read_text())["methods"] == res["methods"]


def test_report_does_not_follow_plan_files_outside_the_run_folder(run_dir, tmp_path, monkeypatch):
    import shutil

    from headplan.api import do_report

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(run_dir / "plan.yaml", elsewhere / "plan.yaml")
    runs = tmp_path / "runs"
    for name, target in (("rel", "../../elsewhere/plan.yaml"), ("abs", str(elsewhere / "plan.yaml")),
                         ("link", "linked.yaml"), ("inside", "plan.yaml")):
        d = runs / name
        shutil.copytree(run_dir, d)
        res = json.loads((d / "eval.json").read_text())
        res["methods"] = res["methods"][:1]
        res["methods"][0]["plan_file"] = target
        (d / "eval.json").write_text(json.dumps(res))
        if name == "link":
            (d / "linked.yaml").symlink_to(elsewhere / "plan.yaml")
    import headplan.report.document as doc

    read = []  # per eval.json (in the order found): which methods' plans were read
    real = doc.plot_head_maps
    monkeypatch.setattr(doc, "plot_head_maps", lambda plans, path: read.append([p is not None for _, p in plans])
                        or real(plans, path))
    log = _Log()
    r = do_report(runs, tmp_path / "rep", reporter=log)
    found = dict(zip((Path(p).parent.name for p in r["evals"]), read))
    assert found == {"abs": [False], "inside": [True], "link": [False], "rel": [False]}
    assert len(log.lines) == 3 and all("not read" in line and "\n" not in line for line in log.lines)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("not read (no head map)") == 3 and r["markdown"] == tmp_path / "rep" / "report.md"
    assert all(Path(p).parent == tmp_path / "rep" and Path(p).is_file() for p in r["images"])
    # the CLI too: the report is written, exit 0
    r = invoke("report", runs, "--out", tmp_path / "rep2")
    assert r.exit_code == 0, r.output


# -- 3: --out written whole ----------------------------------------------------------------------
def test_staged_dir_new_existing_and_failure(tmp_path, monkeypatch):
    from headplan.files import atomic_write, staged_dir

    old = os.umask(0o027)
    try:
        with staged_dir(tmp_path / "new" / "d") as st:
            assert st.parent == tmp_path / "new" and st.name.startswith(".d.stage-")
            atomic_write(st / "a.txt", "a")
        assert (tmp_path / "new" / "d" / "a.txt").read_text() == "a"
        assert (tmp_path / "new" / "d").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "keep.txt").write_text("mine")
    (d / "sub" / "x.txt").write_text("old x")
    os.link(d / "sub" / "x.txt", tmp_path / "x.link")  # the original inode, seen from outside
    before = _tree(d)
    with pytest.raises(RuntimeError):
        with staged_dir(d) as st:
            atomic_write(st / "sub" / "x.txt", "new x")
            atomic_write(st / "y.txt", "y")
            raise RuntimeError("boom")
    assert _tree(d) == before and not _staged_leftovers(tmp_path)
    with staged_dir(d) as st:
        atomic_write(st / "sub" / "x.txt", "new x")
    assert (d / "sub" / "x.txt").read_text() == "new x" and (d / "keep.txt").read_text() == "mine"
    assert (tmp_path / "x.link").read_text() == "old x"  # never written through the hard link
    assert not _staged_leftovers(tmp_path)
    monkeypatch.chdir(d)
    from headplan.errors import HeadplanError

    with pytest.raises(HeadplanError, match="working directory"):
        with staged_dir("."):
            pass


def test_run_that_fails_midway_leaves_the_old_out_as_it_was_and_a_rerun_replaces_it(run_dir, tmp_path,
                                                                                      monkeypatch):
    import shutil

    import headplan.api as api
    from headplan.errors import HeadplanError

    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    (out / "notes.txt").write_text("mine")
    before = _tree(out)

    def boom(*a, **k):
        raise HeadplanError("eval failed")

    with monkeypatch.context() as m:  # profile and plan are written (into the stage), then eval fails
        m.setattr(api, "do_eval", boom)
        with pytest.raises(HeadplanError, match="eval failed"):
            api.do_run("random:llama", out, **RUN)
    assert _tree(out) == before and _staged_leftovers(tmp_path) == []
    # eval's own write fails after its baselines were staged
    real = api.atomic_write

    def fail_eval_json(path, data):
        if Path(path).name == "eval.json":
            raise HeadplanError(f"cannot write {path}")
        real(path, data)

    with monkeypatch.context() as m:
        m.setattr(api, "atomic_write", fail_eval_json)
        with pytest.raises(HeadplanError, match="cannot write"):
            api.do_eval("random:llama", out / "plan.yaml", out, data="eval-small", baselines="streaming")
    assert _tree(out) == before and _staged_leftovers(tmp_path) == []
    # a rerun replaces the files, keeps the user's file, and never writes through the old inodes
    os.link(out / "summary.json", tmp_path / "old-summary")
    summary = api.do_run("random:llama", out, **RUN)
    assert (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / "old-summary").read_bytes() == before["summary.json"]
    assert (out / "summary.json").read_bytes() != before["summary.json"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["files"]["eval"] == str(out / "eval.json")
    assert _staged_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-summary", "r"]


def test_baselines_and_report_into_an_existing_out(run_dir, tmp_path, monkeypatch):
    import headplan.report.document as doc
    from headplan.api import do_baselines, do_report
    from headplan.errors import HeadplanError

    b = tmp_path / "b"
    b.mkdir()
    (b / "notes.txt").write_text("mine")
    files = do_baselines(run_dir / "plan.yaml", b, names="streaming")
    assert files == {"streaming": b / "streaming.yaml"} and (b / "notes.txt").read_text() == "mine"
    import yaml

    rel = yaml.safe_load((b / "streaming.yaml").read_text())["provenance"]["profile"]["path"]
    assert (b / rel).resolve() == (run_dir / "profile.safetensors").resolve()  # relative to the final folder
    rep = tmp_path / "rep"
    do_report(run_dir, rep)
    before = _tree(rep)

    def boom(*a, **k):
        raise HeadplanError("plot failed")

    monkeypatch.setattr(doc, "plot_quality_vs_density", boom)
    with pytest.raises(HeadplanError):
        do_report(run_dir, rep)
    assert _tree(rep) == before and _staged_leftovers(tmp_path) == []
