"""headplan: per-head sparse attention plans for transformers models.

Light at import: ``headplan.plan`` needs no torch. The heavier parts load on first use:

    import headplan
    plan = headplan.load_plan("plan.yaml")
    headplan.apply(model, plan)          # model now runs the plan (prefill and decode)
    with headplan.applied(model, plan):  # ... or only inside the block
        ...

Names: one per CLI verb, ``<verb>_<what>`` -> ``headplan.api.do_<verb>`` (paths first, then keywords):
profile_model, search_plan, select_plan, apply_plan, evaluate_plan, make_baselines, write_report,
run_pipeline, check_plan. The model-level runtime calls (apply, applied, unapply, dense, new_cache,
save_patched, load_patched, kv_report) take a loaded model. ``evaluate`` is the older name of
``evaluate_plan`` (the README's).
"""

__version__ = "0.1.0"

_LAZY = {
    # one name per verb: headplan.api.do_*
    "profile_model": ("headplan.api", "do_profile"),
    "search_plan": ("headplan.api", "do_search"),
    "select_plan": ("headplan.api", "do_select"),
    "apply_plan": ("headplan.api", "do_apply"),
    "evaluate_plan": ("headplan.api", "do_eval"),
    "evaluate": ("headplan.api", "do_eval"),  # alias of evaluate_plan (README)
    "make_baselines": ("headplan.api", "do_baselines"),
    "write_report": ("headplan.api", "do_report"),
    "run_pipeline": ("headplan.api", "do_run"),
    "check_plan": ("headplan.api", "do_check"),
    # on a loaded model
    "apply": ("headplan.runtime", "apply"),
    "applied": ("headplan.runtime", "applied"),
    "unapply": ("headplan.runtime", "unapply"),
    "dense": ("headplan.runtime", "dense"),
    "new_cache": ("headplan.runtime", "new_cache"),
    "save_patched": ("headplan.runtime", "save_patched"),
    "load_patched": ("headplan.runtime", "load_patched"),
    "kv_report": ("headplan.runtime", "kv_report"),
    # files and models
    "load_model": ("headplan.models", "load_model"),
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
