"""`headplan report RUN_DIR --out DIR`: a Markdown and an HTML report with PNGs.

Reads every ``eval.json`` in RUN_DIR (and in its sub-folders, one per budget), the plans they name
(``plan.yaml``, ``baselines/*.yaml``) and any ``*pareto*.csv``, and draws:

- retrieval heat maps (length x depth), one panel per method (dense first);
- quality vs density: perplexity relative to dense and mean retrieval accuracy, one line per method
  over the budgets found (one point each when there is one budget);
- the plan's head map (layers x KV heads coloured by pattern kind), beside its baselines';
- the Pareto front when a pareto CSV exists.

Library code: no printing; matplotlib with the Agg backend. (The progress bar is ``headplan.progress``.)
"""

from .document import results_table, write_report
from .plots import (KIND_COLOURS, METHOD_COLOURS, plot_head_maps, plot_heatmaps, plot_pareto,
                    plot_quality_vs_density)
from .read import data_source, find_evals, method_points

__all__ = ["KIND_COLOURS", "METHOD_COLOURS", "data_source", "find_evals", "method_points", "plot_head_maps",
           "plot_heatmaps", "plot_pareto", "plot_quality_vs_density", "results_table", "write_report"]
