"""Search with a cost model: latency and memory budgets, pattern limits, Pareto, Optuna, speed."""
import time

import numpy as np
import pytest
import torch

from headplan.candidates import Candidate, blocksparse, candidate_set, full, streaming, vslash
from headplan.costmodel import CostTable, analytic, check_fits, load_cost_table
from headplan.errors import HeadplanError
from headplan.plan import ModelIdentity
from headplan.profile import Profile, profile
from headplan.search import SearchSettings, pareto, search, tune, write_pareto
from helpers import tiny

LM_ONLY = {"name": "lm", "seed": 0, "tasks": [{"task": "lm", "share": 1.0}]}


@pytest.fixture(scope="module")
def prof():
    return profile(tiny("llama"), [192, 256, 320], candidate_set("small"), LM_ONLY, samples=1, block=16)


@pytest.fixture(scope="module")
def cost():
    return analytic(head_dim=16, group=2)


def test_latency_budget_is_met_and_beats_density_only_plan(prof, cost):
    static = ("blocksparse", "vslash")  # tiny sizes: dynamic index building costs more than dense here
    dens_plan = search(prof, SearchSettings(density=0.5, exclude_kinds=static))
    n = 256
    budget = cost.plan_prefill_ms(dens_plan, n)
    lat_plan = search(prof, SearchSettings(latency_budget=(budget, n), exclude_kinds=static), cost=cost)
    assert cost.plan_prefill_ms(lat_plan, n) <= budget + 1e-9
    # the density-only plan is feasible under the same predicted latency, so the exact search is no worse
    assert lat_plan.budget.expected_loss <= dens_plan.budget.expected_loss + 1e-12
    assert lat_plan.provenance["search"]["predicted_prefill_ms"] <= budget + 1e-6


def test_latency_budget_out_of_range_names_the_range(prof, cost):
    with pytest.raises(HeadplanError, match=r"infeasible.*feasible range"):
        search(prof, SearchSettings(latency_budget=(1e-9, 256)), cost=cost)
    with pytest.raises(HeadplanError, match=r"above the dense plan"):
        search(prof, SearchSettings(latency_budget=(1e9, 256)), cost=cost)


def test_memory_budget_and_pattern_limit(prof, cost):
    plan = search(prof, SearchSettings(memory_budget=(1.5e-4, 4, 320), max_patterns_per_layer=1), cost=cost)
    gb = sum(cost.head_kv_bytes(e.pattern, 320) * 4 for layer in plan.layers for e in layer) / 1e9
    assert gb <= 1.5e-4 + 1e-12
    for layer in plan.layers:
        assert len({e.candidate for e in layer}) == 1
    with pytest.raises(HeadplanError, match="memory budget .* infeasible"):
        search(prof, SearchSettings(memory_budget=(1e-7, 4, 320)), cost=cost)


def test_cost_table_from_another_shape_is_refused(tmp_path):
    t = analytic(head_dim=128, group=4)
    t.save(tmp_path / "c.yaml")
    loaded = load_cost_table(tmp_path / "c.yaml")
    assert loaded == t
    with pytest.raises(HeadplanError, match="head_dim 128"):
        check_fits(loaded, 64, 4)


def test_validation_lengths_pareto_and_tuning(prof, cost, tmp_path):
    s = SearchSettings(density=0.6, lengths=(192, 256), validate_lengths=(320,))
    plan = search(prof, s)
    assert "320" in plan.provenance["search"]["validation_loss"]
    rows = pareto(prof, s, points=4)
    assert len(rows) >= 2 and "val_loss@320" in rows[0]
    write_pareto(rows, tmp_path / "p.csv", tmp_path / "p.png")
    assert (tmp_path / "p.csv").read_text().startswith("budget,")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    best, trials = tune(prof, s, trials=3, storage=storage)
    _, trials2 = tune(prof, s, trials=2, storage=storage)  # resumes the same study
    assert len(trials2) == len(trials) + 2
    assert all(d <= 0.6 + 1e-9 for d in best.budget.achieved_density)


def _synthetic(layers=32, kv=8, ncand=60, lengths=(2048, 4096, 8192), seed=0):
    rng = np.random.default_rng(seed)
    cands = [full()] + [streaming(64, 32 * (i + 1)) for i in range(40)] + \
        [streaming(64, 64, b / 64) for b in range(1, 11)] + [blocksparse(k) for k in range(1, 5)] + \
        [vslash(64 * k, 128 * k) for k in range(1, 6)]
    cands = cands[:ncand]
    C = len(cands)
    dens = np.sort(rng.uniform(0.02, 1.0, size=(C, len(lengths))), axis=0)[::-1].copy()
    dens[0] = 1.0
    loss = rng.uniform(0, 1, size=(layers, kv, C, len(lengths))) * (1 - dens.mean(1))[None, None, :, None]
    ident = ModelIdentity("LlamaForCausalLM", layers, kv * 4, kv, 128, 8192, "sha256:synthetic")
    return Profile(model=ident, model_spec="synthetic", method="recall", lengths=tuple(lengths),
                   candidates=tuple(cands), block_size=64, data={}, samples=1,
                   loss=torch.tensor(loss, dtype=torch.float32), density=torch.tensor(dens),
                   kv=torch.tensor(dens), versions={})


def test_search_speed_and_determinism_at_llama8b_scale():
    """32 layers x 8 KV heads x 60 candidates x 3 lengths, exact, well under 30 s on 2 cores."""
    p = _synthetic()
    t = time.time()
    a = search(p, SearchSettings(density=0.3))
    dt = time.time() - t
    b = search(p, SearchSettings(density=0.3))
    assert a.to_yaml() == b.to_yaml()
    assert dt < 30, dt


def test_latency_budget_counts_fixed_index_building_cost(prof):
    import dataclasses

    base = analytic(head_dim=16, group=2)
    cost = dataclasses.replace(base, dyn_ns_per_token={"blocksparse": 0.0, "vslash": 0.0},
                               dyn_fixed_us={"blocksparse": 5.0, "vslash": 5.0})
    static = search(prof, SearchSettings(density=0.6, exclude_kinds=("blocksparse", "vslash")))
    budget = cost.plan_prefill_ms(static, 256)
    plan = search(prof, SearchSettings(latency_budget=(budget, 256)), cost=cost)
    assert cost.plan_prefill_ms(plan, 256) <= budget + 1e-9


def _routed_table(**kw):
    """A table with dense-library rates: the dense library 1.3x faster per pair than the sparse kernel's full
    heads, and a split layer paying a fixed and a per-token overhead (so splitting pays only at long prompts)."""
    import dataclasses

    base = analytic(head_dim=64, group=4)
    full_ns = base.per_pair_ns["full"]
    d = dict(dense_launch_us=15.0, dense_per_pair_ns=full_ns / 1.3, route_fixed_us=60.0, route_ns_per_token=0.4)
    d.update(kw)
    return dataclasses.replace(base, **d)


def test_routing_decision_follows_the_cost_table():
    from headplan.candidates import full, streaming

    cost = _routed_table()
    mixed = [full().pattern] * 2 + [streaming(64, 1024).pattern] * 6
    ns = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    dec = [cost.routes_full(mixed, n) for n in ns]
    assert dec[0] is False and dec[-1] is True
    assert dec == sorted(dec)  # one threshold: quadratic gain against a linear overhead
    for n in ns:  # the layer time is what the runtime runs: the faster of the two
        s, t = cost.sparse_layer_ms(mixed, n), cost.split_layer_ms(mixed, n)
        assert cost.layer_prefill_ms(mixed, n) == pytest.approx(min(s, t))
        assert cost.routes_full(mixed, n) == (t < s)
    # never split: no full head, a local layer, no dense rates, or a table without the fields
    assert cost.split_layer_ms([streaming(64, 1024).pattern] * 8, 65536) is None
    assert not cost.routes_full(mixed, 65536, lwin=4096)
    assert not analytic(head_dim=64, group=4).routes_full(mixed, 1 << 20)
    # an all-full layer is the dense library alone (what the runtime runs for it)
    assert cost.split_layer_ms([full().pattern] * 8, 4096) < cost.sparse_layer_ms([full().pattern] * 8, 4096)
    # a slower dense library is never picked
    assert not any(_routed_table(dense_per_pair_ns=cost.per_pair_ns["full"] * 1.2).routes_full(mixed, n) for n in ns)


def test_route_rates_are_fitted_from_samples_and_carried_to_other_shapes(tmp_path):
    from headplan.costmodel import fit_route, load_cost_table

    samples = [{"kind": "dense", "n": n, "pairs": n * (n + 1) / 2 * 32, "ms": 0.02 + n * (n + 1) / 2 * 32 * 1.7e-9}
               for n in (4096, 16384, 32768)]
    samples += [{"kind": "route", "n": n, "heads": 8, "pairs": 0.0, "ms": 0.05 + n * 8 * 5e-7}
                for n in (4096, 16384, 32768)]
    dl, dp, rf, rt = fit_route(samples)
    assert dl == pytest.approx(20.0, rel=1e-3) and dp == pytest.approx(1.7e-3, rel=1e-3)
    assert rf == pytest.approx(50.0, rel=1e-3) and rt == pytest.approx(0.5, rel=1e-3)
    assert fit_route([]) == (0.0, 0.0, 0.0, 0.0)
    cost = _routed_table()
    cost.save(tmp_path / "c.yaml")
    back = load_cost_table(tmp_path / "c.yaml")
    assert back.dense_per_pair_ns == cost.dense_per_pair_ns and back.route_ns_per_token == cost.route_ns_per_token
    other = cost.for_shape(128, 8)
    assert other.dense_per_pair_ns == pytest.approx(2 * cost.dense_per_pair_ns)
    assert other.per_pair_ns["full"] == pytest.approx(2 * cost.per_pair_ns["full"])
    assert other.route_ns_per_token == pytest.approx(cost.route_ns_per_token * 2 * 9 / 5)
    assert cost.for_shape(64, 4) is cost


def test_shipped_cost_tables_load_and_route():
    from headplan.candidates import full, streaming
    from headplan.costmodel import shipped_tables

    tabs = shipped_tables()
    assert tabs, "no cost table shipped with the package"
    for t in tabs:
        assert t.dense_per_pair_ns > 0 and t.device.get("name")
        mixed = [full().pattern] * 2 + [streaming(128, 2048).pattern] * 6
        assert not t.routes_full(mixed, 1024)  # a short prompt never pays the split
