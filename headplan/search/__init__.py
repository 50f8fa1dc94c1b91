"""Search: choose one candidate per KV head to lose the least, under budgets at every length.

A multiple-choice knapsack solved exactly as a 0/1 integer program with HiGHS
(scipy.optimize.milp; no licensed solver). Budgets, any combination:

- ``density``: average attention density <= D at every searched length;
- ``kv_budget``: average KV share kept <= K at every searched length;
- ``latency_budget`` (ms, length): predicted prefill latency of the whole model at that length,
  from a cost table (``headplan.costmodel``), with the per-layer launch cost and the per-layer
  index-building cost of dynamic heads (one binary per layer: paid once if any head is dynamic);
- ``memory_budget`` (GB, batch, length): KV cache bytes at that batch and length;
- ``max_patterns_per_layer``: at most that many distinct candidates in a layer (fewer kernels
  variants per launch).

ε-constraints across lengths (each length its own budget row); ``pareto()`` sweeps one budget and
writes the front; ``tune()`` runs Optuna over global knobs. Deterministic: the same profile and
settings give the same plan, byte for byte.

``refine()`` (plan in the loop, ``refine.py``) re-measures every head with the current plan applied and
re-solves; ``replay()`` regenerates a refined plan from the worths it recorded, with no model.
"""

from .assemble import profile_ref, search
from .baselines import BASELINES, build_baselines, regenerate
from .refine import refine, replay
from .family import FULL_STEPS, QUALITY_GRID, build_family, cheapest, choose, family, meets
from .settings import SearchSettings, parse_latency, parse_memory
from .solve import TIE, profile_loss
from .sweep import pareto, tune, write_pareto

__all__ = ["BASELINES", "FULL_STEPS", "QUALITY_GRID", "TIE", "cheapest", "meets", "SearchSettings", "build_baselines", "build_family", "choose",
           "family", "pareto", "parse_latency", "parse_memory", "profile_loss", "profile_ref",
           "refine", "regenerate", "replay", "search", "tune", "write_pareto"]
