"""Issue 28 part 1: `--granularity layer` (one pattern for every KV head of a layer, same budgets) and
`--format-windows F` (only what export format F can express)."""
import itertools

import numpy as np
import pytest
import yaml

from headplan.candidates import candidate_set, plan_shares
from headplan.errors import HeadplanError, PlanError
from headplan.export import refusal
from headplan.plan import load_plan, plan_from_dict, save_plan
from headplan.profile import load_profile, profile, save_profile
from headplan.search import SearchSettings, search
from helpers import SMALL_RUN, invoke, tiny

LM_ONLY = {"name": "lm", "seed": 0, "tasks": [{"task": "lm", "share": 1.0}]}


@pytest.fixture(scope="module")
def prof_file(tmp_path_factory):
    prof = profile(tiny("llama"), [192, 256], candidate_set("small"), LM_ONLY, samples=2, block=16)
    path = tmp_path_factory.mktemp("g") / "p.safetensors"
    save_profile(prof, path)
    return path


def _uniform(plan):
    return all(len({e.pattern for e in layer}) == 1 for layer in plan.layers)


def _shares(plan, n):
    return plan_shares(plan.model, [[e.pattern for e in layer] for layer in plan.layers], n, plan.block_size)


def test_layer_plan_meets_the_budget_at_every_length_with_one_pattern_per_layer(prof_file):
    prof = load_profile(prof_file)
    st = SearchSettings(density=0.5, kv_budget=0.6, max_length=1024, granularity="layer")
    plan = search(prof, st)
    assert plan.granularity == "layer" and _uniform(plan)
    assert plan.budget.lengths == (192, 256, 512, 1024)
    for n, d, k in zip(plan.budget.lengths, plan.budget.achieved_density, plan.budget.achieved_kv):
        dd, kk = _shares(plan, n)  # recomputed from the plan's patterns, not taken from the search
        assert abs(dd - d) < 1e-9 and abs(kk - k) < 1e-9
        assert d <= 0.5 + 1e-9 and k <= 0.6 + 1e-9, n
    assert plan.provenance["search"]["granularity"] == "layer"
    assert search(load_profile(prof_file), st).to_yaml() == plan.to_yaml()  # deterministic, byte for byte


def test_layer_plan_is_the_exact_optimum_and_never_beats_the_per_head_plan(prof_file):
    """Brute force over every assignment of one candidate per layer; the per-head plan (a superset of choices)
    can only do as well or better on the profile's own loss."""
    prof = load_profile(prof_file)
    m = prof.model
    loss = prof.loss.double().numpy().mean(axis=3)  # (layers, kv heads, C)
    dens = prof.density.numpy()  # (C, lengths): a model without sliding layers
    gaps = []
    for bound in (0.35, 0.5, 0.7):
        layer = search(prof, SearchSettings(density=bound, granularity="layer"))
        head = search(prof, SearchSettings(density=bound))
        assert head.granularity == "kv_head"
        best = min(loss[np.arange(m.num_layers), :, list(c)].mean()
                   for c in itertools.product(range(loss.shape[2]), repeat=m.num_layers)
                   if all(dens[list(c), j].mean() <= bound + 1e-9 for j in range(dens.shape[1])))
        assert abs(layer.budget.expected_loss - best) < 1e-6, bound
        assert layer.budget.expected_loss >= head.budget.expected_loss - 1e-6, bound
        gaps.append(layer.budget.expected_loss - head.budget.expected_loss)
    assert max(gaps) > 1e-6  # the constraint binds somewhere: the layer search is not the per-head one renamed


def test_full_heads_come_in_whole_layers(prof_file):
    prof = load_profile(prof_file)
    g = prof.model.num_kv_heads
    plan = search(prof, SearchSettings(density=0.8, granularity="layer", full_heads=g))
    assert plan.counts().get("full") == g and _uniform(plan)
    with pytest.raises(HeadplanError, match="layer granularity"):
        search(prof, SearchSettings(density=0.8, granularity="layer", full_heads=1))


def test_yaml_round_trip_keeps_granularity(prof_file, tmp_path):
    plan = search(load_profile(prof_file), SearchSettings(density=0.5, granularity="layer"))
    save_plan(plan, tmp_path / "p.yaml")
    back = load_plan(tmp_path / "p.yaml")
    assert back.granularity == "layer" and back.layers == plan.layers and back.to_yaml() == plan.to_yaml()
    assert "granularity: layer" in (tmp_path / "p.yaml").read_text()


def test_a_layer_plan_with_mixed_heads_is_refused_naming_the_layer(prof_file, tmp_path):
    plan = search(load_profile(prof_file), SearchSettings(density=0.5, granularity="layer"))
    d = yaml.safe_load(plan.to_yaml())
    d["layers"][1]["heads"][1] = {"kv_head": 1, "candidate": "full", "pattern": "full", "kv": "all"}
    assert d["layers"][1]["heads"][0]["pattern"] != "full"
    with pytest.raises(PlanError, match=r"layer 1 has different patterns"):
        plan_from_dict(d, "p.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    r = invoke("check", tmp_path / "bad.yaml", "--profile", prof_file)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "layer 1" in r.stderr, r.output
    d["granularity"] = "kv_head"  # the same heads as a per-head plan are fine
    assert plan_from_dict(d, "p.yaml").granularity == "kv_head"
    d["granularity"] = "query_head"
    with pytest.raises(PlanError, match="granularity"):
        plan_from_dict(d, "p.yaml")


def test_format_windows_search_only_what_the_format_expresses(prof_file):
    prof = load_profile(prof_file)
    for fmt, gran in (("trtllm", "layer"), ("duo-tsv", "layer"), ("duo-tsv", "kv_head")):
        plan = search(prof, SearchSettings(density=0.5, granularity=gran, format_windows=fmt))
        assert refusal(plan, fmt) is None, fmt
        assert all(d <= 0.5 + 1e-9 for d in plan.budget.achieved_density)
    # without the restriction the same budget takes what trtllm cannot state
    assert refusal(search(prof, SearchSettings(density=0.5, granularity="layer")), "trtllm") is not None
    # Llama has no sliding window in transformers: hf-layer-types states only full layers there
    full = search(prof, SearchSettings(density=1.0, granularity="layer", format_windows="hf-layer-types"))
    assert full.counts() == {"full": prof.model.num_layers * prof.model.num_kv_heads}
    with pytest.raises(HeadplanError, match="infeasible"):
        search(prof, SearchSettings(density=0.5, granularity="layer", format_windows="hf-layer-types"))
    with pytest.raises(HeadplanError, match="--granularity layer"):
        search(prof, SearchSettings(density=0.6, format_windows="trtllm"))


def test_cli_search_and_check(prof_file, tmp_path):
    out = tmp_path / "plan.yaml"
    r = invoke("search", prof_file, "--out", out, "--density", "0.5", "--granularity", "layer",
               "--format-windows", "trtllm")
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    assert plan.granularity == "layer" and _uniform(plan) and refusal(plan, "trtllm") is None
    assert invoke("check", out, "--profile", prof_file).exit_code == 0  # regenerated from its provenance
    for args, msg in ((("--granularity", "query_head"), "--granularity must be one of"),
                      (("--format-windows", "trtllm"), "--granularity layer"),
                      (("--granularity", "layer", "--format-windows", "onnx"), "--format-windows must be one of")):
        r = invoke("search", prof_file, "--out", tmp_path / "x.yaml", "--density", "0.5", *args)
        assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x.yaml").exists()


def test_cli_run_end_to_end_on_random_llama(tmp_path):
    out = tmp_path / "run"
    r = invoke("run", "random:llama", "--out", out, "--density", "0.5", "--granularity", "layer", "--refine", "0",
               "--baselines", "none", *SMALL_RUN)
    assert r.exit_code == 0, r.output
    plan = load_plan(out / "plan.yaml")
    assert plan.granularity == "layer" and _uniform(plan)
    assert all(d <= 0.5 + 1e-9 for d in plan.budget.achieved_density)
    r = invoke("run", "random:llama", "--out", tmp_path / "bad", "--granularity", "heads", *SMALL_RUN)
    assert r.exit_code == 2 and "--granularity" in r.stderr and not (tmp_path / "bad").exists()
