"""Searches that see head interactions (issue 15): gate optimisation and plan in the loop."""
import dataclasses

import pytest
import torch
from headplan.candidates import candidate_set, kv_share
from headplan.data import Haystack, pydoc_text
from headplan.errors import HeadplanError
from headplan.plan import plan_from_rows
from headplan.profile import gate_gradients, head_scaled_loss, profile, reference_candidate, train_gates
from headplan.profile.gates import _Gated
from headplan.profile.runner import gate_options, gate_sequences
from headplan.search import SearchSettings, search
from headplan.search.refine import _rounds, operating_point, plan_indices, refine, shrunk
from helpers import tiny

SPEC = {"name": "t", "seed": 0, "samples_per_length": 2,
        "tasks": [{"task": "lm", "share": 0.5}, {"task": "passkey", "share": 0.5, "depths": [0.5], "digits": 5}],
        "gates": {"length": 384, "samples": 2, "steps": 3}}


@pytest.fixture(scope="module")
def setup():
    lm = tiny("llama")
    hay = Haystack(lm.tokenizer, pydoc_text())
    seqs = gate_sequences(lm, hay, SPEC, 384, 2, torch.device("cpu"))
    return lm, seqs


def _rows(lm, row):
    i = lm.identity
    return [[row] * i.num_kv_heads for _ in range(i.num_layers)]


def test_gated_model_is_dense_at_one_and_the_sparse_side_at_zero(setup):
    """The gated attention is the mixture it claims: gates 1 give dense logits, gates 0 the plan's."""
    from headplan.runtime import applied

    lm, seqs = setup
    cands = candidate_set("small")
    row = cands[reference_candidate(cands, 384)].pattern.row()
    ids = torch.tensor([seqs[0].ids])
    with torch.no_grad():
        dense = lm.model(ids, use_cache=False).logits
        plan = plan_from_rows(lm.identity, _rows(lm, row))
        with applied(lm.model, plan):
            sparse = lm.model(ids, use_cache=False).logits
    i = lm.identity
    for value, want in ((1.0, dense), (0.0, sparse)):
        with _Gated(lm, seqs, _rows(lm, row), torch.full((i.num_layers, i.num_kv_heads), value)), torch.no_grad():
            got = lm.model(ids, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (dense - sparse).abs().max() > 1e-2  # the two sides differ, so the test can fail


def test_gate_gradients_match_finite_differences(setup):
    """-dL/dg at an operating point is the first-order loss a head saves by being dense."""
    lm, seqs = setup
    cands = candidate_set("small")
    rows = _rows(lm, cands[reference_candidate(cands, 384)].pattern.row())
    i = lm.identity
    at = torch.zeros(i.num_layers, i.num_kv_heads)
    at[0, 0] = 1.0
    worth = gate_gradients(lm, seqs, rows, at)
    assert worth.shape == at.shape and torch.isfinite(worth).all()

    def loss(g):
        with _Gated(lm, seqs, rows, g) as run, torch.no_grad():
            return sum(float(run.fit_loss(t)) for t in range(len(seqs))) / len(seqs)

    h = 0.05
    for (li, kh) in ((1, 0), (0, 1)):
        g = at.clone()
        g[li, kh] = h
        fd = (loss(at) - loss(g)) / h
        assert fd == pytest.approx(float(worth[li, kh]), rel=0.15, abs=1e-4)


def test_train_gates_is_deterministic_and_in_range(setup):
    lm, seqs = setup
    cands = candidate_set("small")
    rows = _rows(lm, cands[reference_candidate(cands, 384)].pattern.row())
    a, la = train_gates(lm, seqs, rows, 3)
    b, lb = train_gates(lm, seqs, rows, 3)
    assert torch.equal(a, b) and la == lb and len(la) == 3
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.mean()) < 1.0  # the penalty moved them
    assert all(p.requires_grad for p in lm.model.parameters())  # the weights' flags are restored


def test_head_scaled_loss():
    r = torch.tensor([[[[0.0], [0.5], [0.2]], [[0.0], [1e-9], [0.3]]]])  # (1 layer, 2 heads, 3 cands, 1 length)
    w = torch.tensor([[2.0, 1.0]])
    out = head_scaled_loss(w, r, torch.tensor([[1, 1]]))
    assert out[0, 0, 1, 0] == pytest.approx(2.0)  # the sparse side costs the weight
    assert out[0, 0, 2, 0] == pytest.approx(0.8)
    assert out[0, 0, 0, 0] == 0.0
    assert torch.isfinite(out).all() and out[0, 1, 2, 0] > 0  # a near-zero side is floored, not divided by 0


def test_gates_profile_and_search(tmp_path):
    """`--method gates`: the profile stores recall and the gate costs; the reference candidate costs its gate."""
    lm = tiny("llama")
    cands = candidate_set("small")
    p = profile(lm, [384], cands, SPEC, samples=2, block=16, method="gates")
    assert set(p.parts) == {"recall", "gates"} and p.method == "gates"
    info = p.data["gates"]
    assert info["steps"] == 3 and info["length"] == 384
    g = torch.tensor(info["values"])
    ref = [c.name for c in cands].index(info["reference"])
    rr = p.parts["recall"][:, :, ref, 0]
    big = rr > rr.mean() * 0.01
    torch.testing.assert_close(p.parts["gates"][:, :, ref, 0][big], g[big], atol=1e-4, rtol=1e-3)
    plan = search(p, SearchSettings(density=0.5))
    assert plan.budget.achieved_density[0] <= 0.5 + 1e-9


@pytest.mark.parametrize("bad, msg", [({"steps": 0}, "gates.steps must be positive"),
                                      ({"lr": "x"}, "gates.lr must be a number"),
                                      ({"stepz": 3}, "gates.stepz: unknown key")])
def test_gate_options_refused(bad, msg):
    with pytest.raises(HeadplanError, match=msg):
        gate_options({**SPEC, "gates": bad}, [512])
    with pytest.raises(HeadplanError, match="needs answered samples"):
        gate_options({"tasks": [{"task": "lm"}], "gates": {}}, [512])


def test_refine_rounds_measure_at_the_plan(setup):
    lm, seqs = setup
    cands = candidate_set("small")
    p = profile(lm, [384], cands, SPEC, samples=2, block=16)
    st = SearchSettings(density=0.5)
    ref = reference_candidate(cands, 384)
    plan, hist = refine(lm, p, st, seqs, 2, ref)
    assert [h["round"] for h in hist] == ["round0", "round1", "round2"]
    assert plan is hist[-1]["plan"] and plan.provenance["search"]["refine"]["kept"] == "round2"
    for h in hist:
        assert h["plan"].budget.achieved_density[0] <= 0.5 + 1e-9
    at, rows, low = operating_point(p, hist[0]["plan"], ref)
    idx = plan_indices(p, hist[0]["plan"])
    assert ((at == 1) == torch.tensor([[cands[int(c)].pattern.kind == "full" for c in r] for r in idx.tolist()])).all()
    assert (low[at == 0] == idx[at == 0]).all() and (low[at == 1] == ref).all()
    picked = refine(lm, p, st, seqs, 1, ref, score=lambda plans: {
        m: {"lm_nll": 1.0, "answer_nll": 0.0 if m == "round0" else 1.0} for m in plans})[0]
    assert picked.provenance["search"]["refine"]["kept"] == "round0"  # the measured best round is kept
    with pytest.raises(HeadplanError, match="rounds must be at least 1"):
        refine(lm, p, st, seqs, 0, ref)
    with pytest.raises(HeadplanError, match="needs the recall signal"):
        refine(lm, dataclasses.replace(p, method="mse", parts={}), st, seqs, 1, ref)


def test_worths_are_shrunk_toward_the_mean(setup):
    w = torch.tensor([[-0.2, 0.0, 0.1], [0.3, -0.01, 0.6]])
    s = shrunk(w)
    mean = w.clamp(min=0).mean()
    assert torch.allclose(s, w.double().clamp(min=0) + mean)
    assert (s >= mean - 1e-12).all() and s.argmax() == w.argmax()  # nobody free, the vital head stays on top
    # a re-solve on worths where most heads measure <= 0 does not starve those heads to the narrowest window
    lm, _ = setup
    cands = candidate_set("small")
    p = profile(lm, [384], cands, SPEC, samples=2, block=16)
    ref = reference_candidate(cands, 384)
    L, H = p.model.num_layers, p.model.num_kv_heads
    worth = torch.full((L, H), -0.01, dtype=torch.float64)
    worth[0, 0] = 1.0
    plans, _ = _rounds(p, SearchSettings(density=0.5), None, ref, 1, lambda r, at, rows: worth, shrink=True)
    narrow = min((c for c in cands if c.pattern.kind == "streaming"), key=lambda c: kv_share(c.pattern, 384)).name
    chosen = [e.candidate for layer in plans["round1"].layers for e in layer]
    assert chosen.count(narrow) < len(chosen) - 1


def test_refined_plan_is_checked_without_the_model(tmp_path):
    """`headplan check` regenerates a refined plan from its recorded worths; a changed worth is drift."""
    import yaml
    from headplan.api import do_check, do_refine
    from headplan.profile import save_profile

    lm = tiny("llama")
    p = profile(lm, [384], candidate_set("small"), SPEC, samples=2, block=16)
    save_profile(p, tmp_path / "p.safetensors")
    plan, hist = do_refine("random:llama", tmp_path / "p.safetensors", tmp_path / "plan.yaml", density=0.5,
                           rounds=2, data=None, lm=lm, profile_windows=False)
    info = plan.provenance["search"]["refine"]
    assert len(info["worths"]) == 2 and info["kept"] == "round2" and len(hist) == 3
    assert do_check(tmp_path / "plan.yaml") == (True, "")
    d = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    w = d["provenance"]["search"]["refine"]["worths"]
    sparse = [(li, h) for li, layer in enumerate(d["layers"]) for h, e in enumerate(layer["heads"])
              if e.get("pattern") != "full"]
    for r in range(2):  # make every sparse head of the kept plan priceless: the re-solve must change it
        for li, h in sparse:
            w[r][li][h] = 1e6
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    ok, diff = do_check(tmp_path / "bad.yaml", tmp_path / "p.safetensors")
    assert not ok and "kv_head" in diff
    # --shrink-worths is recorded, and the replay applies it (the same worths without it give another plan)
    shr, _ = do_refine("random:llama", tmp_path / "p.safetensors", tmp_path / "s.yaml", density=0.5, rounds=2,
                       lm=lm, shrink_worths=True, profile_windows=False)
    assert shr.provenance["search"]["refine"]["shrink"] is True and do_check(tmp_path / "s.yaml") == (True, "")
    d = yaml.safe_load((tmp_path / "s.yaml").read_text())
    d["provenance"]["search"]["refine"]["shrink"] = "yes"
    (tmp_path / "bad2.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(HeadplanError, match="refine.shrink"):
        do_check(tmp_path / "bad2.yaml", tmp_path / "p.safetensors")


def test_cli_refine_and_its_bad_input(tmp_path):
    from headplan.profile import save_profile
    from helpers import invoke

    lm = tiny("llama")
    p = profile(lm, [384], candidate_set("small"), SPEC, samples=2, block=16)
    save_profile(p, tmp_path / "p.safetensors")
    r = invoke("refine", "random:llama", tmp_path / "p.safetensors", "--density", "0.5", "--rounds", "1",
               "--samples", "2", "--no-validate", "--out", tmp_path / "plan.yaml")
    assert r.exit_code == 0, r.output
    assert "kept round1w of 3" in r.output and (tmp_path / "plan.yaml").exists()
    assert invoke("check", tmp_path / "plan.yaml").exit_code == 0
    for args, msg in ((["--rounds", "0"], "--rounds must be at least 1"),
                      (["--samples", "0"], "--samples must be at least 1"),
                      (["--density", "0.01"], "infeasible"),
                      (["--data", str(tmp_path / "nope.yaml")], "data spec not found")):
        r = invoke("refine", "random:llama", tmp_path / "p.safetensors", "--out", tmp_path / "x.yaml", *args)
        assert r.exit_code == 2 and msg in r.stderr and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "x.yaml").exists()
    r = invoke("refine", "random:qwen2", tmp_path / "p.safetensors", "--out", tmp_path / "x.yaml")
    assert r.exit_code == 2 and "another model" in r.stderr


def test_refine_validates_at_the_lengths_asked(tmp_path):
    """--validate-lengths scores the rounds at those lengths (here one longer than profiled)."""
    from headplan.profile import save_profile
    from helpers import invoke

    lm = tiny("llama")
    p = profile(lm, [384], candidate_set("small"), SPEC, samples=2, block=16)
    save_profile(p, tmp_path / "p.safetensors")
    r = invoke("refine", "random:llama", tmp_path / "p.safetensors", "--density", "0.5", "--rounds", "1",
               "--samples", "2", "--validate-lengths", "512", "--out", tmp_path / "plan.yaml")
    assert r.exit_code == 0, r.output
    from headplan.api import do_refine
    from headplan.plan import load_plan

    hist = load_plan(tmp_path / "plan.yaml").provenance["search"]["refine"]["history"]
    _, at_cal = do_refine("random:llama", tmp_path / "p.safetensors", tmp_path / "cal.yaml", density=0.5, rounds=1,
                          samples=2, validate=True, lm=lm)
    assert [h["round"] for h in hist] == ["round0", "round1", "round1w"]  # the rounds are scored, not round1w
    assert "lm_nll" not in hist[2] and "measured" not in at_cal[2]
    assert all(h["lm_nll"] != round(c["measured"]["lm_nll"], 6) for h, c in zip(hist[:2], at_cal[:2]))  # other samples
    for args, msg in ((["--validate-lengths", "512", "--no-validate"], "needs --validate"),
                      (["--validate-lengths", "99999"], "exceeds the model's")):
        r = invoke("refine", "random:llama", tmp_path / "p.safetensors", "--out", tmp_path / "x.yaml", *args)
        assert r.exit_code == 2 and msg in r.stderr, r.output


def test_profile_windows_members_keep_a_rounds_full_heads(setup, tmp_path):
    """--profile-windows: round r's full heads exactly, every other head re-chosen by the plain search on the
    profile's costs (so the same as the plain search restricted to those full heads), within the budget;
    recorded, replayed by check; a full set that names no KV head is refused with the field's name."""
    import yaml
    from headplan.api import do_check, do_refine
    from headplan.profile import save_profile
    from headplan.search.refine import full_heads_of

    lm, _ = setup
    cands = candidate_set("small")
    p = profile(lm, [384], cands, SPEC, samples=2, block=16)
    L, H = p.model.num_layers, p.model.num_kv_heads
    worth = torch.zeros((L, H), dtype=torch.float64)
    worth[0, 0], worth[1, 1] = 5.0, 3.0  # two vital heads: the round makes them full
    st = SearchSettings(density=0.5)
    ref = reference_candidate(cands, 384)
    plans, _ = _rounds(p, st, None, ref, 1, lambda r, at, rows: worth, windows=True)
    assert set(plans) == {"round0", "round1", "round1w"}
    f1 = full_heads_of(plans["round1"])
    assert f1 and full_heads_of(plans["round1w"]) == f1
    assert plans["round1w"].budget.achieved_density[0] <= 0.5 + 1e-9
    # the windows are the plain search's: a head outside the set takes the candidate the profile's costs pick
    direct = search(p, dataclasses.replace(st, full_set=f1))
    assert [e.candidate for layer in direct.layers for e in layer] == \
        [e.candidate for layer in plans["round1w"].layers for e in layer]
    assert [e.candidate for layer in plans["round1w"].layers for e in layer] != \
        [e.candidate for layer in plans["round1"].layers for e in layer]
    with pytest.raises(HeadplanError, match="search.full_set: head 99"):
        search(p, dataclasses.replace(st, full_set=(99,)))
    save_profile(p, tmp_path / "p.safetensors")
    plan, hist = do_refine("random:llama", tmp_path / "p.safetensors", tmp_path / "w.yaml", density=0.5, rounds=1,
                           lm=lm, profile_windows=True, validate=True, samples=2)
    assert plan.provenance["search"]["refine"]["windows"] is True
    assert {h["round"] for h in hist} >= {"round0", "round1"} and do_check(tmp_path / "w.yaml") == (True, "")
    d = yaml.safe_load((tmp_path / "w.yaml").read_text())
    d["provenance"]["search"]["refine"]["windows"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(HeadplanError, match="refine.windows"):
        do_check(tmp_path / "bad.yaml", tmp_path / "p.safetensors")


def test_calibration_length_may_reach_the_longest_profiled_length():
    assert gate_options({**SPEC, "gates": {"length": 4096}}, [2048, 4096])["length"] == 4096
    assert gate_options({**SPEC, "gates": {"length": 8000}}, [1024, 2048])["length"] == 2048
    assert gate_options({**SPEC, "gates": {}}, [2048, 4096])["length"] == 1024


def test_select_rest_members_keep_a_rounds_full_heads_and_select_the_rest(setup, tmp_path):
    """--select-rest: round r's full heads exactly, every other head a select head within the KV budget, scored
    beside the rounds; absent where the density budget cannot pay the select heads' full prefill or select is
    excluded; recorded and replayed by check, a malformed record refused with the field's name."""
    import yaml
    from headplan.api import do_check, do_refine
    from headplan.profile import save_profile
    from headplan.search.refine import full_heads_of

    lm, _ = setup
    cands = candidate_set("small")
    p = profile(lm, [384], cands, SPEC, samples=2, block=16)
    L, H = p.model.num_layers, p.model.num_kv_heads
    worth = torch.zeros((L, H), dtype=torch.float64)
    worth[0, 0], worth[1, 1] = 5.0, 3.0
    ref = reference_candidate(cands, 384)
    st = SearchSettings(density=1.0, kv_budget=0.5)
    plans, _ = _rounds(p, st, None, ref, 1, lambda r, at, rows: worth, select_rest=True)
    assert set(plans) == {"round0", "round1", "round1s"}
    f1 = full_heads_of(plans["round1"])
    assert f1 and full_heads_of(plans["round1s"]) == f1
    kinds = {e.pattern.kind for layer in plans["round1s"].layers for e in layer}
    assert kinds == {"full", "select"}
    assert max(plans["round1s"].budget.achieved_kv) <= 0.5 + 1e-9
    for other in (SearchSettings(density=0.5), dataclasses.replace(st, exclude_kinds=("select",))):
        plans, _ = _rounds(p, other, None, ref, 1, lambda r, at, rows: worth, select_rest=True)
        assert "round1s" not in plans
    save_profile(p, tmp_path / "p.safetensors")
    plan, hist = do_refine("random:llama", tmp_path / "p.safetensors", tmp_path / "s.yaml", density=1.0,
                           kv_budget=0.5, rounds=1, lm=lm, profile_windows=False, validate=True, samples=2)
    info = plan.provenance["search"]["refine"]
    assert info["select_rest"] is True and [h["round"] for h in hist] == ["round0", "round1", "round1s"]
    assert all("measured" in h for h in hist)  # the member is scored beside the rounds
    assert do_check(tmp_path / "s.yaml") == (True, "")
    d = yaml.safe_load((tmp_path / "s.yaml").read_text())
    d["provenance"]["search"]["refine"]["select_rest"] = "yes"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(HeadplanError, match="refine.select_rest"):
        do_check(tmp_path / "bad.yaml", tmp_path / "p.safetensors")
