"""Profiling: what each KV head would cost the model under each candidate pattern, at several lengths.

format.py: the profile file · signals.py: --method and combining · hook.py: the profiling attention ·
resume.py: per-sample state · gates.py: gate optimisation · runner.py: the profile() driver, torchrun · plot.py · stats.py.
"""

from .format import (FORMAT, FORMAT_VERSION, Profile, _checked_profile, _digest, _safetensors_bytes, load_profile,
                     retrieval_heads, save_profile, short_window, versions)
from .hook import _ATTN_NAME, _STATE, ROW_BLOCK, _Collector, _GradAttention, _profile_attention, _register, _sdpa
from .plot import plot_profile
from .resume import STATE_VERSION, _StateDir
from .runner import _dist_info, dist_env, profile
from .gates import gate_gradients, head_scaled_loss, reference_candidate, train_gates
from .signals import DERIVED, TRAINED, combine, method_name, parse_method
from .stats import SIGNALS, Stats

__all__ = [
    "DERIVED", "FORMAT", "TRAINED", "gate_gradients", "head_scaled_loss", "reference_candidate", "train_gates", "FORMAT_VERSION", "ROW_BLOCK", "SIGNALS", "STATE_VERSION", "Profile", "Stats", "combine",
    "dist_env", "load_profile", "method_name", "parse_method", "plot_profile", "profile", "retrieval_heads",
    "save_profile", "short_window", "versions",
    "_ATTN_NAME", "_STATE", "_Collector", "_GradAttention", "_StateDir", "_checked_profile", "_digest", "_dist_info",
    "_profile_attention", "_register", "_safetensors_bytes", "_sdpa",
]
