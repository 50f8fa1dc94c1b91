"""Run a plan inside a transformers model: attention function, per-head KV cache, apply/unapply, save/load."""

from .apply import (applied, apply, attention_modules, causal_padding_mask, check_plan_fits, compile_tables,
                    dense, register, unapply)
from .attention import NAME, LayerRuntime, headplan_attention
from .cache import HeadplanCache, HeadplanLayer
from .generate import cache_kwarg, new_cache, prefill_chunked
from .graphs import DecodeStep, release as release_decode
from .kv import P_FULL, kv_report
from .persist import check_patched_out, load_patched, save_patched
from .state import PlanState, state_of

__all__ = ["apply", "unapply", "applied", "dense", "compile_tables", "HeadplanCache", "HeadplanLayer",
           "save_patched", "load_patched", "register", "new_cache", "kv_report", "prefill_chunked",
           "check_plan_fits", "check_patched_out", "cache_kwarg", "PlanState", "state_of", "NAME",
           "LayerRuntime", "headplan_attention", "attention_modules", "causal_padding_mask", "P_FULL",
           "DecodeStep", "release_decode"]
