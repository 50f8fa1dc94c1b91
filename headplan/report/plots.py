"""The report's figures (matplotlib, Agg backend): retrieval heat maps, quality vs density, head maps,
the Pareto front. Each is written atomically as a PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path

from ..files import atomic_write
from ..plan import KINDS
from .read import _read_csv, method_points  # noqa: F401  (method_points: the points these figures draw)

KIND_COLOURS = {"full": "#1f3b73", "streaming": "#f2a541", "strided": "#9bc53d", "blocksparse": "#5bc0eb",
                "vslash": "#c3423f", "skip": "#dddddd", "select": "#7b3294"}

METHOD_COLOURS = {"headplan": "#c3423f", "streaming": "#1f77b4", "duo": "#ff7f0e", "moa": "#2ca02c",
                  "random": "#8c8c8c", "snapkv": "#9467bd", "pyramidkv": "#e377c2"}


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

