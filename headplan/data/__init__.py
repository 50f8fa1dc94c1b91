"""Calibration and evaluation samples: seeded, built offline from a haystack text.

sources.py: the haystack text and the task mixture YAML files (``calibration_data/``) ·
samples.py: the tasks, mixtures and answer options.
"""

from .samples import (ANSWER_SOURCES, ANSWER_TASKS, NEEDLE_PLACES, NEEDLE_THINGS, TASKS, Haystack, Sample,
                      _insert, answer_options, make_sample, mixture_counts, mixture_samples)
from .sources import _check_spec, load_task_file, load_texts, pydoc_text

__all__ = [
    "ANSWER_SOURCES", "ANSWER_TASKS", "NEEDLE_PLACES", "NEEDLE_THINGS", "TASKS", "Haystack", "Sample",
    "answer_options", "load_task_file", "load_texts", "make_sample", "mixture_counts", "mixture_samples",
    "pydoc_text", "_check_spec", "_insert",
]
