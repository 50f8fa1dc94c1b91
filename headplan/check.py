"""`headplan check`: regenerate a plan from its recorded provenance and compare the two as data; and the
files a plan's provenance names (its profile, its cost table), resolved safely relative to the plan."""

from __future__ import annotations

import json
from pathlib import Path

from .costmodel.table import load_cost
from .errors import HeadplanError, PlanError
from .plan import Plan, load_plan, plan_from_dict


def provenance_file(plan_path: Path, rel: str, field: str, hint: str = "give the file on the command line",
                    root: str | Path | None = None) -> Path:
    """A file a plan's provenance names, relative to the plan's folder. It must lie inside the plan's
    folder, or inside ``root`` when one is given (e.g. the repository a CI job checks out); an absolute
    path or one leading out of that folder (``..``, a link) is refused: give such a file on the command
    line instead."""
    from .plan import _short

    here = Path(plan_path).resolve().parent
    base = Path(root).resolve() if root is not None else here
    if not here.is_relative_to(base):
        raise HeadplanError(f"--root {root}: the plan {plan_path} is not inside it")
    rp = Path(rel)
    where = "the plan's folder" if root is None else f"--root {root}"
    if rp.is_absolute() or (root is None and ".." in rp.parts) or not (here / rp).resolve().is_relative_to(base):
        raise PlanError(f"{Path(plan_path).name}.{field}: {_short(rel)} is outside {where}; {hint}")
    return here / rp


def plan_profile(path: Path, plan: Plan, profile: str | Path | None):
    """The profile a plan was searched from, and its path: ``profile`` if given, else its provenance path
    (relative to the plan's folder); refused when its digest differs from the one the plan records."""
    pref = (plan.provenance or {}).get("profile") or {}
    if profile is not None:
        pp = Path(profile)
    elif "path" in pref:
        pp = provenance_file(path, pref["path"], "provenance.profile.path", "pass --profile")
    else:
        raise HeadplanError(f"{path}: the plan records no profile path; pass --profile")
    if not pp.exists():
        raise HeadplanError(f"profile not found: {pp} (pass --profile)")
    return recorded_profile(pp, pref), pp


def recorded_profile(pp: Path, pref: dict):
    """The profile at ``pp``, refused when its digest differs from the one the plan records (``pref``)."""
    from .profile import load_profile

    prof = load_profile(pp)
    if pref.get("sha256") and pref["sha256"] != prof.sha256:
        raise HeadplanError(f"profile {pp} is not the one the plan was made from "
                            f"(sha256 {prof.sha256[:12]}…, plan records {pref['sha256'][:12]}…)")
    return prof


def _flat(d, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def plan_diff(old: Plan, new: Plan) -> list[str]:
    """What differs between two plans as data (formatting ignored): one line per KV head whose pattern
    changed (``layer 3 kv_head 1: sink64+win256 -> full``), then one per other changed field
    (``budget.achieved_density: [0.25] -> [0.24]``). [] when they are the same plan."""
    def label(e, other):
        name = e.candidate or e.pattern.kind
        if other is not None and name == (other.candidate or other.pattern.kind):
            name += " " + json.dumps(e.pattern.row(), sort_keys=True)  # same name, other parameters
        return name

    lines = []
    if len(old.layers) == len(new.layers) and all(len(a) == len(b) for a, b in zip(old.layers, new.layers)):
        for li, (la, lb) in enumerate(zip(old.layers, new.layers)):
            for a, b in zip(la, lb):
                if a != b:
                    lines.append(f"layer {li} kv_head {a.kv_head}: {label(a, b)} -> {label(b, a)}")
    else:
        lines.append(f"layers: {[len(x) for x in old.layers]} KV heads -> {[len(x) for x in new.layers]}")
    fa, fb = ({k: v for k, v in _flat(p.to_dict()).items() if k != "layers"} for p in (old, new))
    for k in list(fa) + [k for k in fb if k not in fa]:
        if fa.get(k, "(absent)") != fb.get(k, "(absent)"):
            show = [json.dumps(x.get(k), sort_keys=True, default=str) if k in x else "(absent)" for x in (fa, fb)]
            lines.append(f"{k}: {show[0]} -> {show[1]}")
    return lines


def check_plan(plan_path: str | Path, profile_path: str | Path | None = None, *,
             root: str | Path | None = None) -> tuple[bool, str]:
    """Regenerate a plan from its recorded provenance (a baseline plan, ``provenance.baseline``, as that
    baseline) and compare the two as data (parsed and validated: formatting, key order and comments do
    not count). (True, "") if they are the same plan, else (False, plan_diff's lines). Files the
    provenance names must lie in the plan's folder, or under ``root`` when given."""
    import yaml


    plan_path = Path(plan_path)
    plan = load_plan(plan_path)
    prov = plan.provenance or {}
    pref = prov.get("profile") or {}
    if profile_path is None:
        if "path" not in pref:
            raise PlanError(f"{plan_path.name}.provenance.profile.path: missing; pass --profile")
        profile_path = provenance_file(plan_path, pref["path"], "provenance.profile.path", "pass --profile", root)
    prof = recorded_profile(profile_path, pref)
    if (prov.get("search") or {}).get("refine"):
        from .search.refine import replay

        try:
            new = replay(prof, plan, pref or None)
        except HeadplanError as e:
            raise PlanError(f"{plan_path.name}: {e}") from None
    elif prov.get("baseline"):
        from .search.baselines import regenerate

        new = regenerate(prof, plan)
    else:
        new = regenerate_search(plan_path, plan, prof, pref, root)
    new = plan_from_dict(yaml.safe_load(new.to_yaml()), plan_path.name)  # the plan as save_plan would write it
    lines = plan_diff(plan, new)
    if not lines:
        return True, ""
    return False, "".join(f"{line}\n" for line in [f"{plan_path} (committed) -> regenerated:", *lines])


def regenerate_search(plan_path: Path, plan: Plan, prof, pref: dict, root=None) -> Plan:
    from .search import SearchSettings, search

    prov = plan.provenance or {}
    s = prov.get("search") or {}
    try:
        settings = SearchSettings.from_dict(s)
    except (TypeError, ValueError, KeyError):
        raise PlanError(f"{plan_path.name}.provenance.search: malformed search settings") from None
    cost = None
    if s.get("cost_table"):
        ct = s["cost_table"].get("path") or "analytic"
        m = prof.model
        cost = load_cost(ct if ct == "analytic" else
                         str(provenance_file(plan_path, ct, "provenance.search.cost_table.path", root=root)), m.head_dim,
                         m.num_query_heads // m.num_kv_heads)
    new = search(prof, settings, pref or None, cost)
    if s.get("cost_table", {}).get("path"):
        new.provenance["search"]["cost_table"]["path"] = s["cost_table"]["path"]
    if "selection" in prov:  # `headplan select`'s measurements need the model: kept as recorded, the plan is
        new.provenance["selection"] = prov["selection"]  # regenerated from the chosen candidate's settings
    return new
