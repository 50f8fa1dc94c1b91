"""Hardware cost model: what a plan costs on a GPU, measured once per device.

A cost table (YAML) holds rates fitted from kernel timings on the target GPU:

- prefill, one layer call of ``kernels.prefill.sparse_prefill`` at length N:
  ``t = launch + sum_heads per_pair[kind] * pairs(head, N) * G + [any dynamic head] * dyn_per_token * N``
  (all heads of a layer share one launch, so the fixed cost is paid once per layer);
- decode, one step of ``kernels.decode.sparse_decode``: ``t = launch + bytes_read / bandwidth``;
- KV bytes: exact from the plan (no measurement needed).

``analytic()`` gives a table from nominal rates (no GPU): FLOPs at a sustained TFLOP/s and bytes at a
sustained TB/s. ``measure()`` runs the kernels over a grid (pattern × parameters × length) on the GPU
that is present and fits the rates; ``validate()`` compares predictions with measurements on random
plans.
"""

from .check import random_layer, summary, validate
from .measure import measure
from .table import (SCHEMA, CostTable, analytic, check_fits, fit_prefill, fit_route, kv_coefficients,
                    load_cost_table, prefill_coefficients, refit, shipped_tables)

__all__ = ["SCHEMA", "CostTable", "analytic", "check_fits", "fit_prefill", "fit_route", "kv_coefficients",
           "load_cost_table", "measure", "prefill_coefficients", "random_layer", "refit", "shipped_tables", "summary",
           "validate"]
