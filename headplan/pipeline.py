"""What ``headplan run`` decides before any work: its default budget and baselines, and the checks of its
arguments (so a bad one fails before the model loads)."""

from __future__ import annotations

from .candidates import candidate_set
from .errors import HeadplanError
from .lengths import DEFAULT_LENGTHS, parse_lengths
from .plan import pattern_kinds
from .search.baselines import baseline_names
from .search.settings import whole_number

# `headplan run` with no budget given: a quarter of the KV cache, no bound on prefill density (select heads, which
# keep retrieval, prefill in full); its default baselines: the MoA-style windows and SnapKV at the same budget
DEFAULT_RUN_KV = 0.25
DEFAULT_RUN_BASELINES = "default"  # moa, and snapkv where no density bound forbids its full prefill


def run_baselines(baselines, density):
    """``run``'s baselines: ``"default"`` is the MoA-style windows plus SnapKV, or MoA alone under a density bound
    below 1 (SnapKV's heads prefill in full); anything else as given."""
    if baselines != DEFAULT_RUN_BASELINES:
        return baselines
    return "moa,snapkv" if density is None or density >= 1 else "moa"


def run_inputs(data, eval_data, baselines, refine, select, exclude_kinds, granularity, format_windows,
              candidates, lengths):
    """``run``'s checks of its arguments before any work: (excluded kinds, allowed candidates, granularity,
    format_windows)."""
    from .data import load_task_file
    from .search.settings import check_granularity

    load_task_file(data, "profile")
    load_task_file(eval_data, "eval")
    baseline_names(baselines)  # a bad name fails before any work
    whole_number("--refine", refine)
    kinds = pattern_kinds(None if str(exclude_kinds).strip().lower() == "none" else exclude_kinds)
    granularity, format_windows = check_granularity(granularity, format_windows)
    if refine and not select:  # plan in the loop needs answered calibration samples: fail before profiling
        from .profile.runner import gate_options

        gate_options(load_task_file(data, "profile"), parse_lengths(lengths or DEFAULT_LENGTHS))
    allowed = [c for c in candidate_set(candidates) if c.pattern.kind not in kinds]
    if not allowed:
        raise HeadplanError(f"--exclude-kinds leaves no candidate of the {candidates!r} set")
    return kinds, allowed, granularity, format_windows
