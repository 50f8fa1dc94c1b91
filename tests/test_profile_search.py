import itertools
import math

import numpy as np
import pytest
import torch

from headplan.candidates import candidate_set
from headplan.data import load_task_file
from headplan.errors import HeadplanError, ProfileError
from headplan.kernels import patterns as P
from headplan.profile import _Collector, load_profile, profile, save_profile
from headplan.search import SearchSettings, search
from helpers import tiny

LM_ONLY = {"name": "lm", "seed": 0, "tasks": [{"task": "lm", "share": 1.0}]}


def test_recall_equals_brute_force_masks():
    torch.manual_seed(0)
    cands = candidate_set("small")
    G, N, D, block = 3, 150, 16, 16
    q, k = torch.randn(G, N, D), torch.randn(1, N, D)
    col = _Collector(cands, 1, 1, block)
    col.layer(0, q, k, 0.3)
    s = (q @ k[0].T) * 0.3
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    a = torch.softmax(s.masked_fill(j > i, -math.inf), -1)
    for ci, c in enumerate(cands):
        p = c.pattern
        if p.kind == "blocksparse":
            vis = P.dynamic_visible(i, j, P.BLOCKSPARSE, P.build_block_index(q, k[0], p.topk, block), block)
        elif p.kind == "vslash":
            vis = P.dynamic_visible(i, j, P.VSLASH, P.build_vslash_index(q, k[0], p.vertical, p.slash, 0.3), block)
        elif p.kind == "select":  # selected at ns from the 32 queries before; judged on the rows after ns
            E = min(64, N // 4)
            ns = N - E
            score = a[:, ns - 32:ns, :ns].mean(1).amax(0)
            score = torch.nn.functional.max_pool1d(score[None, None], 7, 1, 3)[0, 0]
            cand = torch.zeros(ns, dtype=torch.bool)
            cand[p.sink:ns - p.window.alpha] = True
            K = p.keep.alpha + int(p.keep.beta * ns)
            kept = torch.zeros(N, dtype=torch.bool)
            kept[score.masked_fill(~cand, -1).topk(K).indices] = True
            held = (j < p.sink) | (i - j < p.window.alpha) | kept[None, :]
            vis = (j <= i) & held
            brute = 1 - float((a[:, ns:] * vis[ns:]).sum()) / (G * E)
            assert abs(float(col.loss[0, 0, ci]) - brute) < 1e-5, c.name
            continue
        else:
            vis = P.static_visible(i, j, P.make_table([p.row()]), block)[0]
        brute = 1 - float((a * vis).sum()) / (G * N)
        assert abs(float(col.loss[0, 0, ci]) - brute) < 1e-5, c.name
    assert float(col.loss[0, 0, 0]) == 0.0  # full keeps everything
    assert all(float(col.loss[0, 0, ci]) > 0.01 for ci in range(1, len(cands)))


@pytest.fixture(scope="module")
def prof_file(tmp_path_factory):
    lm = tiny("llama")
    prof = profile(lm, [192, 256], candidate_set("small"), LM_ONLY, samples=2, block=16)
    path = tmp_path_factory.mktemp("p") / "p.safetensors"
    save_profile(prof, path)
    return path


def test_profile_round_trip_without_pickle(prof_file):
    prof = load_profile(prof_file)
    assert tuple(prof.loss.shape) == (2, 2, len(candidate_set("small")), 2)
    assert prof.lengths == (192, 256)
    raw = prof_file.read_bytes()
    assert b"pickle" not in raw and raw[:8] != b"\x80\x04\x95"


def test_tampered_header_is_rejected(prof_file, tmp_path):
    raw = prof_file.read_bytes()
    bad = raw.replace(b'\\"samples\\": 2', b'\\"samples\\": 9')
    assert bad != raw
    p = tmp_path / "bad.safetensors"
    p.write_bytes(bad)
    with pytest.raises(ProfileError, match="modified"):
        load_profile(p)


def test_not_a_profile(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(ProfileError):
        load_profile(p)


def test_two_searches_are_byte_identical(prof_file):
    prof = load_profile(prof_file)
    a = search(prof, SearchSettings(density=0.5)).to_yaml()
    b = search(load_profile(prof_file), SearchSettings(density=0.5)).to_yaml()
    assert a == b


def test_search_is_optimal_on_a_small_instance(prof_file):
    """Brute force over all assignments of a 4-head instance: the MILP finds the optimum."""
    prof = load_profile(prof_file)
    bound = 0.45
    plan = search(prof, SearchSettings(density=bound))
    loss = prof.loss.double().numpy().reshape(4, -1, 2).mean(axis=2)
    dens = prof.density.numpy()
    best = math.inf
    for combo in itertools.product(range(loss.shape[1]), repeat=4):
        if all(dens[list(combo), j].mean() <= bound + 1e-9 for j in range(2)):
            best = min(best, loss[np.arange(4), list(combo)].mean())
    assert abs(plan.budget.expected_loss - best) < 1e-6
    assert all(d <= bound + 1e-9 for d in plan.budget.achieved_density)


def test_infeasible_density_names_the_range(prof_file):
    with pytest.raises(HeadplanError, match=r"infeasible at length 192.*feasible range"):
        search(load_profile(prof_file), SearchSettings(density=0.01))


def test_kv_budget_is_respected(prof_file):
    plan = search(load_profile(prof_file), SearchSettings(kv_budget=0.5))
    assert all(k <= 0.5 + 1e-9 for k in plan.budget.achieved_kv)


def test_samples_are_seeded_and_exact_length():
    from headplan.data import Haystack, mixture_samples, pydoc_text

    lm = tiny("llama")
    hay = Haystack(lm.tokenizer, pydoc_text())
    spec = load_task_file(None, "profile")
    a = mixture_samples(hay, spec, 700, 4)
    b = mixture_samples(hay, spec, 700, 4)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert all(len(s.input_ids) == 700 for s in a)
    pk = [s for s in a if s.task == "passkey"]
    assert pk and all(s.answer in lm.tokenizer.decode(s.input_ids) for s in pk)


def test_a_tie_goes_to_the_exact_candidate():
    """Gemma 3 shape (sliding window 128 on five of six layers), profiled at 384 with every kind allowed: at
    density 1 every candidate that sees what the layer sees ties at zero loss, and the search must pick the
    exact one (full), not a dynamic kind whose zero loss holds only at the profiled length."""
    prof = profile(tiny("gemma3"), [384], candidate_set("default"), LM_ONLY, samples=2)
    plan = search(prof, SearchSettings(density=1.0))
    assert plan.counts() == {"full": prof.model.num_layers * prof.model.num_kv_heads}


def test_max_length_binds_the_budget_beyond_the_profiled_lengths(tmp_path):
    """Issue 25 item 4: a full head of a global layer keeps a share of the model's own cache that grows with the
    length (the sliding layers' windows stop growing), so a budget met at the profiled 192/256 is broken at 2K
    unless --max-length makes it bind there too."""
    import dataclasses

    from headplan.candidates import plan_shares
    from headplan.plan import load_plan, save_plan
    from headplan.search import build_baselines

    lm = tiny("gemma3")
    m = lm.identity
    assert any(m.layer_windows) and not all(m.layer_windows)
    prof = profile(lm, [192, 256], candidate_set("small"), LM_ONLY, samples=2, block=16)
    glob = [li for li, w in enumerate(m.layer_windows) if not w][0] * m.num_kv_heads
    kv = lambda p, n: plan_shares(m, [[e.pattern for e in layer] for layer in p.layers], n, 16)[1]  # noqa: E731
    forced = SearchSettings(kv_budget=0.5, density=1.0, full_set=tuple(range(glob, glob + m.num_kv_heads)))
    assert kv(search(prof, forced), 2048) > 0.5  # met where profiled only
    with pytest.raises(HeadplanError, match="infeasible at length 1024"):
        search(prof, dataclasses.replace(forced, max_length=2048))
    plan = search(prof, SearchSettings(kv_budget=0.5, density=1.0, max_length=2048))
    assert plan.budget.lengths == (192, 256, 512, 1024, 2048) and plan.budget.max_length == 2048
    for n in (192, 256, 300, 512, 777, 1024, 1500, 2048):
        assert kv(plan, n) <= 0.5 + 1e-3, n
    assert [round(kv(plan, n), 6) for n in plan.budget.lengths] == [round(x, 6) for x in plan.budget.achieved_kv]
    save_plan(plan, tmp_path / "p.yaml")
    assert load_plan(tmp_path / "p.yaml").budget.max_length == 2048
    for name, bp in build_baselines(prof, plan, ["streaming", "duo", "moa"]).items():
        assert bp.budget.lengths == plan.budget.lengths and bp.budget.max_length == 2048, name
        assert all(x <= 0.5 + 1e-9 for x in bp.budget.achieved_kv), name
    with pytest.raises(HeadplanError, match="max-length"):
        search(prof, SearchSettings(kv_budget=0.5, density=1.0, max_length=m.max_positions + 1))
