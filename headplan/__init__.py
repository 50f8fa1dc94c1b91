"""headplan: per-head sparse attention plans for transformers models.

Light at import: ``headplan.plan`` needs no torch. The heavier parts load on first use:

    import headplan
    plan = headplan.load_plan("plan.yaml")
    headplan.apply(model, plan)          # model now runs the plan (prefill and decode)
"""

__version__ = "0.1.0"

_LAZY = {
    "apply": ("headplan.runtime", "apply"),
    "dense": ("headplan.runtime", "dense"),
    "new_cache": ("headplan.runtime", "new_cache"),
    "save_patched": ("headplan.runtime", "save_patched"),
    "load_patched": ("headplan.runtime", "load_patched"),
    "kv_report": ("headplan.runtime", "kv_report"),
    "load_model": ("headplan.models", "load_model"),
    "profile_model": ("headplan.api", "do_profile"),
    "search_plan": ("headplan.api", "do_search"),
    "evaluate": ("headplan.api", "do_eval"),
    "run_pipeline": ("headplan.api", "do_run"),
    "check_plan": ("headplan.api", "do_check"),
    "load_profile": ("headplan.profile", "load_profile"),
    "Plan": ("headplan.plan", "Plan"),
    "load_plan": ("headplan.plan", "load_plan"),
    "save_plan": ("headplan.plan", "save_plan"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'headplan' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
