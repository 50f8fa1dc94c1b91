"""Sweeps over searches: the Pareto front of one budget, and Optuna tuning of the global knobs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..errors import HeadplanError
from ..plan import DYNAMIC_KINDS, Plan, atomic_write
from ..profile import Profile
from .assemble import search
from .settings import SearchSettings


def pareto(prof: Profile, base: SearchSettings, points: int = 8, cost=None) -> list[dict]:
    """Sweep the density budget (or the latency budget when one is set) and solve each point."""
    rows = []
    if base.latency_budget is not None:
        ms, n = base.latency_budget
        grid = [ms * f for f in np.linspace(0.4, 1.0, points)]
        make = lambda v: SearchSettings(**{**base.__dict__, "latency_budget": (float(v), n)})  # noqa: E731
    else:
        top = base.density or 1.0
        grid = list(np.linspace(top / 4, top, points))
        make = lambda v: SearchSettings(**{**base.__dict__, "density": float(round(v, 6))})  # noqa: E731
    for v in grid:
        try:
            plan = search(prof, make(v), cost=cost)
        except HeadplanError:
            continue
        row = {"budget": float(round(v, 6)), "expected_loss": plan.budget.expected_loss,
               **{f"density@{n}": d for n, d in zip(plan.budget.lengths, plan.budget.achieved_density)},
               **{f"kv@{n}": k for n, k in zip(plan.budget.lengths, plan.budget.achieved_kv)}}
        if cost is not None:
            for n in plan.budget.lengths:
                row[f"pred_prefill_ms@{n}"] = cost.plan_prefill_ms(plan, n)
        if "validation_loss" in plan.provenance["search"]:
            for n, v2 in plan.provenance["search"]["validation_loss"].items():
                row[f"val_loss@{n}"] = v2
        rows.append(row)
    return rows


def write_pareto(rows: list[dict], csv_path: Path, png_path: Path | None = None) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(csv_path, buf.getvalue())
    if png_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xkey = next((k for k in keys if k.startswith("pred_prefill_ms@")), None) or \
            next(k for k in keys if k.startswith("density@"))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r[xkey] for r in rows], [r["expected_loss"] for r in rows], "o-")
        ax.set_xlabel(xkey)
        ax.set_ylabel("expected profiled loss")
        ax.set_title("Pareto front")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf2 = io.BytesIO()
        fig.savefig(buf2, format="png", dpi=120)
        plt.close(fig)
        atomic_write(png_path, buf2.getvalue())


def tune(prof: Profile, base: SearchSettings, trials: int = 20, storage: str | None = None, seed: int = 0,
         cost=None) -> tuple[Plan, list[dict]]:
    """Optuna over global knobs (max distinct patterns per layer, whether dynamic kinds are allowed),
    two objectives: loss at the searched lengths and, when the profile has longer lengths than the
    searched ones (``validate_lengths``), loss there; returns the best-validated plan."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler, storage=storage,
                                study_name="headplan-search", load_if_exists=storage is not None)
    plans: dict = {}

    def settings_of(t) -> SearchSettings:
        k = t.suggest_int("max_patterns_per_layer", 1, 4)
        dyn = t.suggest_categorical("dynamic", [True, False])
        return SearchSettings(**{**base.__dict__, "max_patterns_per_layer": k,
                                 "exclude_kinds": () if dyn else DYNAMIC_KINDS})

    def objective(t):
        s = settings_of(t)
        try:
            plan = search(prof, s, cost=cost)
        except HeadplanError:
            return float("inf"), float("inf")
        plans[t.number] = plan
        val = plan.provenance["search"].get("validation_loss")
        vloss = float(np.mean(list(val.values()))) if val else plan.budget.expected_loss
        pred = cost.plan_prefill_ms(plan, base.latency_budget[1]) if (cost and base.latency_budget) else \
            float(np.mean(plan.budget.achieved_density))
        t.set_user_attr("validation_loss", vloss)
        return vloss, pred

    study.optimize(objective, n_trials=trials)
    trials_out = [{"trial": t.number, **t.params, "objectives": t.values} for t in study.trials if t.values]
    best = min((t for t in study.trials if t.values and np.isfinite(t.values[0])),
               key=lambda t: (t.values[0], t.values[1], t.number), default=None)
    if best is None:
        raise HeadplanError("no tuning trial met the budgets")
    plan = plans.get(best.number) or search(prof, settings_of(optuna.trial.FixedTrial(best.params)), cost=cost)
    return plan, trials_out
