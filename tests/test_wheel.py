"""The wheel carries the whole package: every sub-package, the kernels (kernels/ is headplan.kernels), the
calibration data, the device cost tables and the ``headplan`` console script.

Built offline with setuptools' own backend (``build_meta.build_wheel``, what ``pip wheel --no-build-isolation``
calls) from a copy of the sources in tmp_path: setuptools writes build/ and *.egg-info beside the sources it
builds, and the repository must stay untouched.
"""
import configparser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools")

ROOT = Path(__file__).resolve().parents[1]
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def copy_sources(dest: Path) -> None:
    """pyproject.toml, the files it names (readme, license) and each folder of its package-dir, copied to dest."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    files = ["pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in"]
    for key in ("readme", "license"):
        v = project.get(key)
        files += [v] if isinstance(v, str) else [v["file"]] if isinstance(v, dict) and "file" in v else []
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    for folder in sorted(set(meta["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(ROOT / folder, dest / folder, ignore=JUNK)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    src.mkdir()
    out.mkdir()
    copy_sources(src)
    code = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_wheel(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"building the wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (name,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    with zipfile.ZipFile(name) as z:
        return name, set(z.namelist())


def expected_files() -> dict[str, str]:
    """Path inside the wheel -> what it is (for the failure message), from the repository's own folders."""
    want = {"headplan/__init__.py": "the package", "headplan/cli.py": "the CLI (the console script's target)"}
    pkg = ROOT / "headplan"
    for init in sorted(pkg.rglob("__init__.py")):
        if "__pycache__" not in init.parts:
            rel = init.parent.relative_to(ROOT).as_posix()
            want[f"{rel}/__init__.py"] = f"sub-package {rel.replace('/', '.')}"
    for py in sorted(pkg.rglob("*.py")):
        if "__pycache__" not in py.parts:
            want.setdefault(py.relative_to(ROOT).as_posix(), "module")
    kernels = sorted((ROOT / "kernels").glob("*.py"))
    yamls = sorted((ROOT / "calibration_data").glob("*.yaml"))
    devices = sorted((pkg / "costmodel" / "devices").glob("*.yaml"))
    assert kernels and yamls and devices, "the repository's kernels/, calibration_data/ or cost tables are gone"
    want.update({f"headplan/kernels/{p.name}": "kernel module (kernels/ -> headplan.kernels)" for p in kernels})
    want["headplan/kernels/__init__.py"] = "sub-package headplan.kernels (kernels/ in the repository)"
    want.update({f"headplan/calibration_data/{p.name}": "calibration data" for p in yamls})
    want["headplan/calibration_data/__init__.py"] = "sub-package headplan.calibration_data"
    want.update({f"headplan/costmodel/devices/{p.name}": "device cost table" for p in devices})
    return want


def test_the_wheel_holds_every_package_module_and_data_file(wheel):
    path, names = wheel
    missing = [f"{p} ({what})" for p, what in expected_files().items() if p not in names]
    assert not missing, f"{path.name} lacks {len(missing)} file(s):\n  " + "\n  ".join(missing)


def test_the_wheel_declares_the_console_script(wheel):
    path, names = wheel
    eps = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert eps, f"{path.name} has no entry_points.txt: the `headplan` console script is missing"
    cp = configparser.ConfigParser()
    with zipfile.ZipFile(path) as z:
        cp.read_string(z.read(eps[0]).decode())
    scripts = dict(cp["console_scripts"]) if cp.has_section("console_scripts") else {}
    assert scripts.get("headplan", "").replace(" ", "") == "headplan.cli:main", \
        f"{path.name}: console script `headplan = headplan.cli:main` missing from entry_points.txt (has {scripts})"
