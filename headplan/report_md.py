"""`headplan report RUN_DIR --out DIR`: a Markdown and an HTML report with PNGs.

Reads every ``eval.json`` in RUN_DIR (and in its sub-folders, one per budget), the plans they name
(``plan.yaml``, ``baselines/*.yaml``) and any ``*pareto*.csv``, and draws:

- retrieval heat maps (length x depth), one panel per method (dense first);
- quality vs density: perplexity relative to dense and mean retrieval accuracy, one line per method
  over the budgets found (one point each when there is one budget);
- the plan's head map (layers x KV heads coloured by pattern kind), beside its baselines';
- the Pareto front when a pareto CSV exists.

Library code: no printing; matplotlib with the Agg backend. (``headplan.report`` is the progress
Reporter; this module is the written report.)
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from .errors import HeadplanError
from .plan import KINDS, atomic_write, load_plan

KIND_COLOURS = {"full": "#1f3b73", "streaming": "#f2a541", "strided": "#9bc53d", "blocksparse": "#5bc0eb",
                "vslash": "#c3423f", "skip": "#dddddd"}

METHOD_COLOURS = {"headplan": "#c3423f", "streaming": "#1f77b4", "duo": "#ff7f0e", "moa": "#2ca02c",
                  "random": "#8c8c8c"}


# ------------------------------------------------------------------------------------------------
# reading a run directory
# ------------------------------------------------------------------------------------------------

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


def _plan_for(path_str: str | None, eval_path: Path):
    if not path_str:
        return None
    for p in (Path(path_str), eval_path.parent / path_str, eval_path.parent / Path(path_str).name):
        if p.is_file():
            try:
                return load_plan(p)
            except HeadplanError:
                return None
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


# ------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # legends placed outside the axes stay in
    _plt().close(fig)
    atomic_write(path, buf.getvalue())
    return path


def plot_heatmaps(res: dict, task: str, path: Path, title: str) -> Path | None:
    cells = [c for c in res["grid"] if c["task"] == task]
    if not cells:
        return None
    plt = _plt()
    names = ["dense"] + [m["name"] for m in res["methods"]]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells}, key=lambda d: (d is None, d or 0))
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.2, 0.45 * len(lengths) * rows + 1.3 * rows + 0.4),
                             dpi=110, squeeze=False, layout="constrained")  # room for the suptitle
    im = None
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        import numpy as np

        z = np.full((len(lengths), len(depths)), np.nan)
        for c in cells:
            if name in c["acc"]:
                z[lengths.index(c["length"]), depths.index(c["depth"])] = c["acc"][name]
        im = ax.imshow(z, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", interpolation="nearest")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(z[i, j]):
                    ax.text(j, i, f"{z[i, j]:.2f}".rstrip("0").rstrip(".") if z[i, j] not in (0, 1) else f"{z[i, j]:.0f}",
                            ha="center", va="center", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(depths)))
        ax.set_xticklabels(["rand" if d is None else f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)))
        ax.set_yticklabels([str(n) for n in lengths], fontsize=7)
        if k % cols == 0:
            ax.set_ylabel("length", fontsize=7)
        if k // cols == rows - 1:
            ax.set_xlabel("depth", fontsize=7)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    return _save(fig, path)


def _x(p: dict):
    """Quality vs density's x: the plan's density budget; a plan searched without one (KV budget only) at its
    mean density over the eval lengths."""
    return p["density_budget"] if p.get("density_budget") is not None else p["density"]


def plot_quality_vs_density(groups: list[tuple[str, list[dict]]], path: Path) -> Path:
    """One line per method and data source (evaluations on other texts or specs are not joined)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=110, layout="constrained")
    by: dict[tuple[str, str], list[dict]] = {}
    for _, pts in groups:
        for p in pts:
            if _x(p) is not None:
                by.setdefault((p["base"], p.get("source", "")), []).append(p)
    sources = sorted({src for _, src in by})
    marks = "osv^<>pP"
    for ax, key, lab in ((axes[0], "ppl_ratio", "perplexity / dense perplexity"),
                         (axes[1], "acc", "retrieval accuracy (mean over grid)")):
        for (base, src), pts in by.items():
            pts = sorted([p for p in pts if p[key] is not None], key=_x)
            if not pts:
                continue
            style = dict(marker=marks[sources.index(src) % len(marks)], color=METHOD_COLOURS.get(base),
                         linestyle=("-", "--", ":", "-.")[sources.index(src) % 4])
            if base == "dense":
                style.update(marker="*", markersize=12, color="black")
            elif base == "headplan":
                style.update(linewidth=2.2, color=METHOD_COLOURS["headplan"])
            ax.plot([_x(p) for p in pts], [p[key] for p in pts],
                    label=base if len(sources) == 1 else f"{base} ({src})", **style)
        ax.set_xlabel("density budget")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.05, 1.05)
    h, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    seen = dict(zip(labels, h))
    seen.update({k: v for k, v in zip(l2, h2) if k not in seen})
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="outside right center")
    fig.supxlabel("x: the plan's density budget (--density it was searched to meet at its lengths); a plan with "
                  "only a KV budget: its mean density over the eval lengths", fontsize=7)
    return _save(fig, path)


def plot_head_maps(plans: list[tuple[str, object]], path: Path) -> Path | None:
    plans = [(n, p) for n, p in plans if p is not None]
    if not plans:
        return None
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _plt()
    L, H = plans[0][1].model.num_layers, plans[0][1].model.num_kv_heads
    cols = min(len(plans), 5)
    nrows = math.ceil(len(plans) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(2.2, 0.35 * H + 1.1) * cols + 1.5,
                                                   max(3.0, 0.9 + 0.2 * L) * nrows), dpi=110, squeeze=False)
    cmap = ListedColormap([KIND_COLOURS[k] for k in KINDS])
    used = set()
    flat = [a for row in axes for a in row]
    for ax in flat[len(plans):]:
        ax.axis("off")
    for ax, (name, plan) in zip(flat, plans):
        z = np.array([[KINDS.index(e.pattern.kind) for e in layer] for layer in plan.layers])
        used |= {KINDS[v] for v in z.flatten()}
        ax.imshow(z, cmap=cmap, vmin=-0.5, vmax=len(KINDS) - 0.5, aspect="auto", interpolation="nearest")
        for li, layer in enumerate(plan.layers):
            for h, e in enumerate(layer):
                p = e.pattern
                t = ""
                if p.window is not None:
                    t = str(p.window.alpha) + ("+" if p.window.beta else "")
                elif p.topk is not None:
                    t = f"k{p.topk}"
                elif p.vertical is not None:
                    t = f"{p.vertical}"
                if t and H <= 16 and L <= 48:
                    ax.text(h, li, t, ha="center", va="center", fontsize=5)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("KV head", fontsize=7)
        ax.set_xticks(range(H))
        ax.set_yticks(range(0, L, max(1, L // 16)))
        ax.tick_params(labelsize=6)
    for row in axes:
        row[0].set_ylabel("layer", fontsize=7)
    fig.tight_layout()
    fig.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in KINDS if k in used],
               loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)  # outside the axes: covers no cell
    return _save(fig, path)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        raise HeadplanError(f"{path}: unreadable CSV ({e})") from None
    cols = list(rows[0].keys()) if rows else []
    return cols, rows


def plot_pareto(path_csv: Path, path: Path) -> Path | None:
    cols, rows = _read_csv(path_csv)

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    numeric = [c for c in cols if rows and all(num(r[c]) is not None for r in rows)]
    if len(numeric) < 2:
        return None
    x = next((c for c in numeric if "density" in c.lower()), None) or \
        next((c for c in numeric if "kv" in c.lower()), numeric[0])
    y = next((c for c in numeric if c != x and "loss" in c.lower()), None) or next(c for c in numeric if c != x)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    pts = sorted((num(r[x]), num(r[y])) for r in rows)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#c3423f")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"Pareto front ({path_csv.name})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# the document: blocks rendered to Markdown and HTML
# ------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.3f}"):
    return "–" if x is None else fmt.format(x)


def results_table(res: dict) -> tuple[list[str], list[list[str]]]:
    """Rows: dense and every method; columns: budget, perplexity (Δ vs dense), KL, top-1, retrieval
    (correct/total, and the mean teacher-forced answer NLL when the eval recorded it)."""
    names = [m["name"] for m in res["methods"]]
    info = {m["name"]: m for m in res["methods"]}
    head = ["method", "density", "KV kept"]
    for r in res["perplexity"]:
        head += [f"ppl@{r['length']}", f"KL@{r['length']}", f"top-1@{r['length']}"]
    for r in res["retrieval"]:
        head.append(f"{r['task']}@{r['length']}")
    rows = []
    for name in ["dense", *names]:
        if name == "dense":
            row = ["dense", "1", "1"]
        else:
            b = info[name].get("budget", [])
            row = [name, " / ".join(f"{x['density']:.3f}" for x in b), " / ".join(f"{x['kv_share']:.3f}" for x in b)]
        for r in res["perplexity"]:
            if name == "dense":
                row += [f"{r['ppl_dense']:.2f}", "0", "1"]
            else:
                m = r["methods"].get(name, {})
                d = (m["ppl"] / r["ppl_dense"] - 1) * 100 if m else None
                row += [f"{m['ppl']:.2f} ({d:+.1f}%)" if m else "–", _f(m.get("kl"), "{:.4f}"),
                        _f(m.get("top1_agree"))]
        for r in res["retrieval"]:
            a = r["acc"].get(name)
            k = round(a * r["samples"]) if a is not None else None
            nll = (r.get("answer_nll") or {}).get(name)
            row.append(("–" if a is None else f"{k}/{r['samples']}") + (f", NLL {nll:.2f}" if nll is not None else ""))
        rows.append(row)
    return head, rows


def _md_table(head, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def _html_table(head, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


class _Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, head, rows):
        self.blocks.append(("table", head, rows))

    def img(self, rel, alt):
        self.blocks.append(("img", rel, alt))

    def pre(self, text):
        self.blocks.append(("pre", text))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append(_md_table(b[1], b[2]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
            elif b[0] == "pre":
                out.append("```\n" + b[1] + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                out.append(_html_table(b[1], b[2]))
            elif b[0] == "img":
                out.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
            elif b[0] == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
                 "padding:3px 6px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path) -> dict:
    run_dir = Path(run_dir)
    evals = find_evals(run_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HeadplanError(f"--out must be a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    doc = _Doc()
    images: list[Path] = []
    title = f"headplan report: {run_dir.resolve().name}"
    doc.h(1, title)
    first = evals[0][1]
    doc.p(f"Model `{first.get('model')}`. {len(evals)} evaluation(s) found in `{run_dir}`. Every figure is "
          "measured in the same run as the dense model, on the same samples; retrieval answers are greedy "
          "generations through each plan's per-head KV cache. Density and KV kept are means over heads at "
          "each evaluated length (listed in order).")

    groups = []
    for k, (path, res) in enumerate(evals):
        lab = _label(res, path, run_dir)
        groups.append((lab, method_points(res)))
        doc.h(2, f"Evaluation `{lab}`" if lab != "." else "Evaluation")
        lens = sorted({r["length"] for r in res["perplexity"] + res["retrieval"]})
        secs = f"; eval wall time {res['seconds']:.0f} s" if isinstance(res.get("seconds"), (int, float)) else ""
        doc.p(f"Methods: {', '.join(m['name'] for m in res['methods'])}; lengths {', '.join(map(str, lens))}{secs}.")
        head, rows = results_table(res)
        doc.table(head, rows)
        for task in sorted({c["task"] for c in res["grid"]}):
            img = plot_heatmaps(res, task, out / f"heatmap_{k}_{task}.png",
                                f"{task} accuracy (length x depth){'' if lab == '.' else ' — ' + lab}")
            if img:
                images.append(img)
                doc.img(img.name, f"{task} heat map")
        plans = []
        for m in res["methods"]:
            plans.append((m["name"], _plan_for(m.get("plan_file"), path)))
        if not plans[0][1] and (path.parent / "plan.yaml").is_file():
            plans[0] = (plans[0][0], load_plan(path.parent / "plan.yaml"))
        img = plot_head_maps(plans, out / f"headmap_{k}.png")
        if img:
            images.append(img)
            doc.h(3, "Head maps")
            doc.p("Layers × KV heads coloured by pattern kind; the number is the window α (+: elastic), k the "
                  "top-k blocks, or the vertical count.")
            doc.img(img.name, "head map")
        conts = res.get("continuations") or []
        if conts:
            doc.h(3, "Continuations (greedy, side by side)")
            for c in conts:
                doc.p(f"Prompt ({c['length']} tokens) ends: …{c['prompt_tail'][-160:]!r}")
                doc.table(["method", "continuation"], [["dense", repr(c["dense"])]]
                          + [[m["name"], repr(c["methods"].get(m["name"], ""))] for m in res["methods"]])
        cases = [(r["task"], r["length"], c) for r in res["retrieval"] for c in r.get("cases", [])][:6]
        if cases:
            doc.h(3, "Retrieval answers (first cases)")
            names = [m["name"] for m in res["methods"]]
            doc.table(["task", "length", "depth", "answer", "dense", *names],
                      [[t, n, "–" if c.get("depth") is None else f"{c['depth']:g}", c["answer"], c["dense"],
                        *[(c.get("methods") or {res['primary']: c.get('plan', '')}).get(m, "–") for m in names]]
                       for t, n, c in cases])

    doc.h(2, "Quality vs density")
    img = plot_quality_vs_density(groups, out / "quality_vs_density.png")
    images.append(img)
    doc.p("Perplexity relative to dense (mean over perplexity lengths) and retrieval accuracy (mean over every "
          "grid cell) against each plan's density budget (the density it was searched to meet; a plan with "
          "only a KV budget at its mean density over the eval lengths); one point per method per evaluation, "
          "one line per method and data source (haystack text / eval spec).")
    doc.img(img.name, "quality vs density")
    doc.table(["evaluation", "data", "method", "density budget", "density (mean)", "KV kept", "ppl / dense",
               "retrieval acc"],
              [[lab, p["source"], p["name"], _f(p["density_budget"]), _f(p["density"]), _f(p["kv"]),
                _f(p["ppl_ratio"]), _f(p["acc"])] for lab, pts in groups for p in pts])

    paretos = sorted({*run_dir.glob("*pareto*.csv"), *run_dir.glob("*/*pareto*.csv")})
    for i, pc in enumerate(paretos):
        img = plot_pareto(pc, out / f"pareto_{i}.png")
        if img:
            images.append(img)
            doc.h(2, f"Pareto front: {pc.relative_to(run_dir)}")
            doc.img(img.name, "pareto front")
    md = out / "report.md"
    ht = out / "report.html"
    atomic_write(md, doc.markdown())
    atomic_write(ht, doc.html(title))
    return {"markdown": md, "html": ht, "images": images, "evals": [str(p) for p, _ in evals]}
