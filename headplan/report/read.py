"""Reading a run directory: every eval.json (older ones brought to today's shape), the plans they name,
pareto CSVs, and the per-method points the figures and tables use."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..errors import HeadplanError
from ..plan import load_plan


def _load_eval(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HeadplanError(f"{path}: not a readable eval.json ({e})") from None
    if not isinstance(res, dict) or "perplexity" not in res or "retrieval" not in res:
        raise HeadplanError(f"{path}: not an eval.json written by headplan eval")
    if not res.get("methods"):  # an eval written before baselines: one method, the plan
        res["methods"] = [{"name": "headplan", "base": "headplan", "budget": res.get("budget", []),
                           "counts": res.get("plan_counts", {}), "plan_file": res.get("plan")}]
        res["primary"] = "headplan"
        for r in res["perplexity"]:
            r.setdefault("methods", {"headplan": {"ppl": r["ppl_plan"], "kl": r["kl"], "top1_agree": r["top1_agree"]}})
        for r in res["retrieval"]:
            r.setdefault("acc", {"dense": r["acc_dense"], "headplan": r["acc_plan"]})
    if not res.get("grid"):  # rebuild the length x depth grid from the cases
        grid: dict = {}
        for r in res["retrieval"]:
            for c in r.get("cases", []):
                d = c.get("depth")
                cell = grid.setdefault((r["task"], r["length"], d), {"n": 0})
                cell["n"] += 1
                outs = {"dense": c.get("dense", ""), **(c.get("methods") or {res["primary"]: c.get("plan", "")})}
                for m, v in outs.items():
                    cell[m] = cell.get(m, 0) + (c["answer"] in v)
        res["grid"] = [{"task": t, "length": n, "depth": d, "samples": c["n"],
                        "acc": {m: v / c["n"] for m, v in c.items() if m != "n"}}
                       for (t, n, d), c in sorted(grid.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0))]
    return res


def find_evals(run_dir: Path) -> list[tuple[Path, dict]]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise HeadplanError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise HeadplanError(f"not a directory: {run_dir} (give the folder that holds eval.json)")
    paths = sorted({*run_dir.glob("eval.json"), *run_dir.glob("*/eval.json"), *run_dir.glob("*/*/eval.json")})
    if not paths:
        raise HeadplanError(f"no eval.json in {run_dir} (run `headplan run` or `headplan eval --out {run_dir}`)")
    return [(p, _load_eval(p)) for p in paths]


def _plan_for(path_str: str | None, eval_path: Path, run_dir: Path, refused: list | None = None):
    """The plan an eval.json's ``plan_file`` names, relative to the eval.json's folder (an absolute one as
    recorded; a missing one also tried by its name there). Read only when it lies inside ``run_dir``
    (links resolved): one outside is not read, its path appended to ``refused``. None when not read."""
    if not path_str or not isinstance(path_str, str):
        return None
    root = Path(run_dir).resolve()
    try:
        p = (eval_path.parent / path_str).resolve()
        if not p.is_relative_to(root):
            if refused is not None:
                refused.append(path_str)
            return None
        for q in (p, (eval_path.parent / Path(path_str).name).resolve()):
            if q.is_relative_to(root) and q.is_file():
                return load_plan(q)
    except (HeadplanError, OSError, ValueError):  # unreadable, not a plan, a NUL byte in the path
        pass
    return None


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _label(res: dict, path: Path, run_dir: Path) -> str:
    rel = path.parent.relative_to(run_dir)
    return "." if str(rel) == "." else str(rel)


def data_source(res: dict) -> str:
    """Which samples an evaluation ran on: its haystack text(s) and eval spec (results on other data are
    not points of one curve)."""
    texts = ", ".join(f"{t.get('source')}" for t in res.get("texts") or []) or "?"
    spec = (res.get("eval_spec") or {}).get("name")
    return texts + (f" / {spec}" if spec else "")


def method_points(res: dict) -> list[dict]:
    """Per method: mean density and KV share over the evaluated lengths, the plan's density budget (what
    quality vs density plots: the density it was searched to, not the mean over eval lengths), perplexity
    ratio, retrieval, and the data source."""
    pts = []
    for m in res["methods"]:
        name = m["name"]
        ppl = [r["methods"][name]["ppl"] / r["ppl_dense"] for r in res["perplexity"] if name in r.get("methods", {})]
        acc = [c["acc"][name] for c in res["grid"] if name in c["acc"]]
        pts.append({"name": name, "base": m.get("base", name.split("@")[0]),
                    "density": _mean([b["density"] for b in m.get("budget", [])]),
                    "kv": _mean([b["kv_share"] for b in m.get("budget", [])]),
                    "density_budget": m.get("density_budget"), "ppl_ratio": _mean(ppl), "acc": _mean(acc)})
    dacc = _mean([c["acc"]["dense"] for c in res["grid"] if "dense" in c["acc"]])
    pts.insert(0, {"name": "dense", "base": "dense", "density": 1.0, "kv": 1.0, "density_budget": 1.0,
                   "ppl_ratio": 1.0, "acc": dacc})
    for p in pts:
        p["source"] = data_source(res)
    return pts


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        raise HeadplanError(f"{path}: unreadable CSV ({e})") from None
    cols = list(rows[0].keys()) if rows else []
    return cols, rows
