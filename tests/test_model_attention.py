"""The model's own attention is the dense reference every plan composes with.

Every random family preset has its real features switched on (sliding layers and their interleaving,
8K positions); the test lengths are longer than each model's own windows, so a runtime that ignored
them would fail here (an all-full plan would see tokens the model never attends to).
"""
import json

import pytest
import torch

from cases import full, stream, strided
from headplan import runtime as RT
from headplan.candidates import budget_tables, candidate_set, plan_shares, same_as_full
from headplan.errors import HeadplanError
from headplan.kernels import patterns as P
from headplan.models import layer_windows, load_model
from helpers import ids, invoke, plan_for, tiny
from test_runtime import assert_same_generation

FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "phi3"]
N = 300  # longer than every preset's own window (96-128)


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_have_the_family_features(family):
    lm = tiny(family)
    w = lm.identity.layer_windows
    assert lm.identity.max_positions == 8192
    if family == "llama":
        assert w == ()
    else:
        assert w and max(w) < N
    if family == "gemma3":  # five local layers per global one
        assert w == (128,) * 5 + (0,)
    if family == "qwen2":  # sliding from max_window_layers on
        assert w[0] == 0 and all(w[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_plan_is_the_model_itself(family):
    """Prefill logits of a left-padded batch and 40 generated tokens equal the model's own dense run."""
    lm = tiny(family)
    x = ids(N, 2, seed=11)
    mask = torch.ones_like(x)
    mask[1, :37] = 0  # left padding
    x[1, :37] = 0
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        RT.apply(lm.model, plan_for(lm, lambda li, h: full()))
        with RT.dense(lm.model):
            d = lm.model(x, attention_mask=mask).logits
            gd = lm.model.generate(x[:1], attention_mask=mask[:1], **kw)
        p = lm.model(x, attention_mask=mask).logits
        gp = lm.model.generate(x[:1], attention_mask=mask[:1], **kw)
    real = mask.bool()
    torch.testing.assert_close(p[real], d[real], rtol=0, atol=5e-5)
    assert_same_generation(gd, gp, atol=1e-3)
    assert gp.sequences.shape[1] == N + 40


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_a_narrower_plan_differs_so_the_test_above_can_fail(family):
    lm = tiny(family)
    x = ids(N, 1, seed=12)
    with torch.no_grad():
        RT.apply(lm.model, plan_for(lm, lambda li, h: stream(4, 32)))
        with RT.dense(lm.model):
            d = lm.model(x).logits
        p = lm.model(x).logits
    assert (p - d).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_mixed_plan_decode_in_sliding_layers_equals_its_masked_forward(family):
    """Prefill + 40 decode steps through the per-head cache (full heads of sliding layers keep a ring of
    the window) equal one forward of the same plan."""
    lm = tiny(family)
    rows = [full(), stream(8, 24), strided(4, 16, stride=2, offset=1), stream(4, 200, 0.125)]
    RT.apply(lm.model, plan_for(lm, lambda li, h: rows[(li + h) % len(rows)]))
    x = ids(N, 1, seed=13)
    with torch.no_grad():
        ref = lm.model(x, use_cache=False).logits
        cache = RT.new_cache(lm.model, N + 8)
        outs = [lm.model(x[:, :N - 40], past_key_values=cache).logits]
        for t in range(N - 40, N):
            outs.append(lm.model(x[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=5e-5)
    for li, layer in enumerate(cache.layers):
        w = lm.identity.window(li)
        if w:  # no head keeps more than the layer's own cache
            assert max(layer.cap) <= w
            assert int((layer.slot_pos >= 0).sum(dim=1).max()) <= w * len(layer.cap)


def test_searched_plan_keeps_no_more_than_the_model_and_says_how_much_it_saves(tmp_path):
    r = invoke("run", "random:gemma3", "--out", tmp_path / "run", "--density", "0.5", "--lengths", "256",
               "--samples", "1", "--candidates", "small", "--eval-data", "eval-small")
    assert r.exit_code == 0, r.output
    from headplan.plan import load_plan

    plan = load_plan(tmp_path / "run" / "plan.yaml")
    assert plan.model.layer_windows == (128,) * 5 + (0,)
    kv = RT.kv_report(plan, 1024)
    for li, layer in enumerate(kv["layers"]):
        assert layer["plan_bytes"] <= layer["dense_bytes"]
    # dense is the model's own cache: 5 sliding layers keep 128 tokens, the global one 1024
    per_tok = 2 * plan.model.head_dim * 2 * plan.model.num_kv_heads
    assert kv["dense_bytes"] == per_tok * (5 * 128 + 1024)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    b = ev["budget"][0]
    assert b["kv_bytes_plan"] < b["kv_bytes_dense"] == RT.kv_report(plan, b["length"], b["kv_dtype_bytes"])["dense_bytes"]
    assert b["kv_share"] == pytest.approx(b["kv_bytes_plan"] / b["kv_bytes_dense"], abs=1e-3)
    # measured: the dense run held the model's own (sliding) cache, not a full-length one
    m = ev["kv_cache_measured"][0]
    n = m["length"] + 8
    per_tok_fp32 = 2 * plan.model.head_dim * 4 * plan.model.num_kv_heads
    assert m["kv_bytes_dense"] < per_tok_fp32 * n * plan.model.num_layers


def test_budget_tables_count_against_the_models_own_attention():
    lm = tiny("gemma3")
    cands = candidate_set("default")
    d, k = budget_tables(cands, [1024], 64, lm.identity)
    full = [i for i, c in enumerate(cands) if c.pattern.kind == "full"][0]
    # an all-full plan is exactly dense (1.0) whatever the layer windows
    assert abs(d[:, full, 0].mean() - 1.0) < 1e-12 and abs(k[:, full, 0].mean() - 1.0) < 1e-12
    # a window as wide as a sliding layer's window costs what full costs there, and collapses into it
    wide = [i for i, c in enumerate(cands) if same_as_full(c.pattern, 128) and c.pattern.kind != "full"]
    assert wide
    for c in wide:
        assert d[0, c, 0] == pytest.approx(d[0, full, 0]) and k[0, c, 0] == pytest.approx(k[0, full, 0])
    ident = lm.identity
    pats = [[cands[full].pattern] * ident.num_kv_heads for _ in range(ident.num_layers)]
    assert plan_shares(ident, pats, 1024) == pytest.approx((1.0, 1.0))


def test_search_collapses_candidates_wider_than_a_sliding_window(tmp_path):
    prof = tmp_path / "p.safetensors"
    r = invoke("profile", "random:mistral", "--out", prof, "--lengths", "256", "--samples", "1",
               "--candidates", "default")
    assert r.exit_code == 0, r.output
    r = invoke("search", prof, "--out", tmp_path / "plan.yaml", "--density", "1.0")
    assert r.exit_code == 0, r.output
    from headplan.plan import load_plan

    plan = load_plan(tmp_path / "plan.yaml")
    for layer in plan.layers:  # window 128 everywhere: sink64+win1024/2048 are full there, named full
        for e in layer:
            assert not (e.pattern.kind == "streaming" and e.pattern.window.alpha >= 128)


def _config_file(tmp_path, **cfg):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p


_SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=1024)


@pytest.mark.parametrize("cfg, feature", [
    (dict(model_type="llama", attention_chunk_size=64), "chunked attention"),
    (dict(model_type="qwen2", layer_types=["full_attention", "chunked_attention"], sliding_window=64,
          use_sliding_window=True), "layer type 'chunked_attention'"),
    (dict(model_type="gemma3_text", head_dim=16, use_bidirectional_attention=True), "non-causal"),
    (dict(model_type="gemma2", head_dim=16, attn_logit_softcapping=50.0), "softcapping"),
    (dict(model_type="bloom", n_layer=2, n_head=2), "ALiBi"),
])
def test_features_the_runtime_cannot_reproduce_are_refused(tmp_path, cfg, feature):
    path = _config_file(tmp_path, **{**_SMALL, **cfg})
    r = invoke("profile", f"random:{path}", "--out", tmp_path / "p.safetensors", "--lengths", "128",
               "--samples", "1")
    assert r.exit_code == 2, r.output
    assert feature in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p.safetensors").exists()


def test_apply_refuses_a_plan_whose_layer_windows_differ(tmp_path):
    lm = tiny("mistral")
    plan = plan_for(lm, lambda li, h: full())
    other = load_model("random:llama")
    with pytest.raises(HeadplanError):
        RT.apply(other.model, plan)
    with pytest.raises(HeadplanError, match="layer windows"):
        RT.apply(other.model, plan, check=False)


def test_layer_windows_follow_the_models_own_code():
    from transformers import MistralConfig, Phi3Config, Qwen2Config

    assert layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=None)) == ()
    assert layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=4096)) == (4096,) * 3
    assert layer_windows(Phi3Config(num_hidden_layers=2, sliding_window=2047)) == (2047, 2047)
    # Qwen2: no window unless use_sliding_window; then layers >= max_window_layers slide
    assert layer_windows(Qwen2Config(num_hidden_layers=4, use_sliding_window=False)) == ()
    assert layer_windows(Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64,
                                     max_window_layers=2)) == (0, 0, 64, 64)


def test_kernel_tables_carry_the_layer_window():
    t = P.make_table([full(), stream(2, 4)], layer_window=16)
    assert t[:, P.C_LWIN].tolist() == [16, 16]
    vis = P.static_visible(torch.arange(40)[:, None], torch.arange(40)[None, :], t)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    assert torch.equal(vis[0], (j <= i) & (i - j < 16))
