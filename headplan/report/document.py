"""The written report: results tables and a document of headings, paragraphs, tables and images,
rendered as Markdown and HTML (``write_report``)."""

from __future__ import annotations

import html
from pathlib import Path

from ..errors import HeadplanError
from ..files import atomic_write
from ..plan import _short
from ..progress import Reporter
from .plots import plot_head_maps, plot_heatmaps, plot_pareto, plot_quality_vs_density
from .read import _label, _plan_for, find_evals, method_points


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
    for r in res.get("ruler", []):
        head.append(f"RULER {r['task']}@{r['length']} (%)")
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
        for r in res.get("ruler", []):
            v = r["score"].get(name)
            row.append("–" if v is None else f"{100 * v:.1f}")
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


def write_report(run_dir: str | Path, out: str | Path, reporter: Reporter | None = None) -> dict:
    """Write report.md, report.html and the PNGs into OUT. Plans an eval.json names outside RUN_DIR are
    not read (no head map; one line in the report and to ``reporter``)."""
    rep = reporter or Reporter()
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
        _evaluation_section(doc, k, path, res, lab, out, run_dir, rep, images)
    _summary_sections(doc, groups, run_dir, out, images)
    md = out / "report.md"
    ht = out / "report.html"
    atomic_write(md, doc.markdown())
    atomic_write(ht, doc.html(title))
    return {"markdown": md, "html": ht, "images": images, "evals": [str(p) for p, _ in evals]}


def _evaluation_section(doc, k, path, res, lab, out, run_dir, rep, images) -> None:
    """One evaluation's part of the report: its tables, heat maps, head maps, continuations and answers."""
    doc.h(2, f"Evaluation `{lab}`" if lab != "." else "Evaluation")
    lens = sorted({r["length"] for r in res["perplexity"] + res["retrieval"] + res.get("ruler", [])})
    secs = f"; eval wall time {res['seconds']:.0f} s" if isinstance(res.get("seconds"), (int, float)) else ""
    doc.p(f"Methods: {', '.join(m['name'] for m in res['methods'])}; lengths {', '.join(map(str, lens))}{secs}.")
    head, rows = results_table(res)
    doc.table(head, rows)
    if res.get("ruler"):
        rr = res["ruler"]
        doc.p(f"RULER: lm-eval {rr[0].get('lm_eval') or ''} tasks {', '.join(sorted({r['task'] for r in rr}))}, "
              f"its own synthetic samples ({', '.join(sorted({str(r['samples']) for r in rr}))} per task and "
              "length, the same for every method); score = lm-eval's string match (share of the reference "
              "answers found in the greedy output), in %.")
    for task in sorted({c["task"] for c in res["grid"]}):
        img = plot_heatmaps(res, task, out / f"heatmap_{k}_{task}.png",
                            f"{task} accuracy (length x depth){'' if lab == '.' else ' — ' + lab}")
        if img:
            images.append(img)
            doc.img(img.name, f"{task} heat map")
    _head_maps(doc, k, path, res, out, run_dir, rep, images)
    conts = res.get("continuations") or []
    if conts:
        doc.h(3, "Continuations (greedy, side by side)")
        for c in conts:
            doc.p(f"Prompt ({c['length']} tokens) ends: …{c['prompt_tail'][-160:]!r}")
            doc.table(["method", "continuation"], [["dense", repr(c["dense"])]]
                      + [[m["name"], repr(c["methods"].get(m["name"], ""))] for m in res["methods"]])
    _answer_tables(doc, res)


def _head_maps(doc, k, path, res, out, run_dir, rep, images) -> None:
    refused: list[str] = []
    plans = [(m["name"], _plan_for(m.get("plan_file"), path, run_dir, refused)) for m in res["methods"]]
    if not plans[0][1] and res["methods"][0].get("plan_file") not in refused:
        plans[0] = (plans[0][0], _plan_for("plan.yaml", path, run_dir, refused))
    if refused:
        note = f"{path}: plan file(s) outside {run_dir} not read (no head map): {', '.join(map(_short, refused))}"
        rep.log(note)
        doc.p(note)
    img = plot_head_maps(plans, out / f"headmap_{k}.png")
    if img:
        images.append(img)
        doc.h(3, "Head maps")
        doc.p("Layers × KV heads coloured by pattern kind; the number is the window α (+: elastic), k the "
              "top-k blocks, or the vertical count.")
        doc.img(img.name, "head map")


def _answer_tables(doc, res) -> None:
    """The first retrieval and RULER answers, each method beside dense."""
    cases = [(r["task"], r["length"], c) for r in res["retrieval"] for c in r.get("cases", [])][:6]
    if cases:
        doc.h(3, "Retrieval answers (first cases)")
        names = [m["name"] for m in res["methods"]]
        doc.table(["task", "length", "depth", "answer", "dense", *names],
                  [[t, n, "–" if c.get("depth") is None else f"{c['depth']:g}", c["answer"], c["dense"],
                    *[(c.get("methods") or {res['primary']: c.get('plan', '')}).get(m, "–") for m in names]]
                   for t, n, c in cases])

    rcases = [(r["task"], r["length"], c) for r in res.get("ruler", []) for c in r.get("cases", [])[:2]][:6]
    if rcases:
        doc.h(3, "RULER answers (first cases)")
        names = [m["name"] for m in res["methods"]]
        doc.table(["task", "length", "answer", "dense", *names],
                  [[t, n, ", ".join(map(str, c["answer"])) if isinstance(c["answer"], list) else str(c["answer"]),
                    c["dense"].strip()[:80], *[c["methods"].get(m, "–").strip()[:80] for m in names]]
                   for t, n, c in rcases])


def _summary_sections(doc, groups, run_dir, out, images) -> None:
    """Quality against density over every evaluation, and the Pareto fronts the run folder holds."""
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
