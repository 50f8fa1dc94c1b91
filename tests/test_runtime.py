"""The reference runtime: exactness against dense attention and explicit-mask references."""
import pytest
import torch

from cases import bsp, full, skip, stream, strided, vslash
from headplan import runtime as RT
from headplan.kernels import patterns as P
from headplan.kernels import reference as R
from helpers import ids, mixed_plan, plan_for, tiny

FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "phi3"]  # GQA 2, GQA 3, MQA, gemma, MHA


@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_plan_reproduces_dense(family):
    lm = tiny(family)
    x = ids(77, 2, seed=1)
    with torch.no_grad():
        RT.apply(lm.model, plan_for(lm, lambda li, h: full()))
        with RT.dense(lm.model):
            d = lm.model(x).logits
        p = lm.model(x).logits
    assert lm.model.config._attn_implementation == "headplan"
    torch.testing.assert_close(p, d, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_with_eviction_matches_masked_forward(family):
    lm = tiny(family)
    RT.apply(lm.model, mixed_plan(lm, with_skip=True))
    x = ids(100, 1, seed=2)
    with torch.no_grad():
        ref = lm.model(x, use_cache=False).logits
        cache = RT.new_cache(lm.model, 128)
        outs = [lm.model(x[:, :60], past_key_values=cache).logits]
        for t in range(60, 100):  # 40 decode steps (the generate test below adds 32 more)
            outs.append(lm.model(x[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=2e-5)
    # streaming heads really evicted: their region is smaller than the sequence
    layer = cache.layers[0]
    caps = dict(zip(range(len(layer.cap)), layer.cap))
    kinds = layer.table[:, P.C_KIND].tolist()
    for h, kind in enumerate(kinds):
        if kind == P.STREAMING:
            assert caps[h] < 100
            held = (layer.head_view(h)[2] >= 0).sum(dim=1)
            assert int(held.max()) <= caps[h]
        if kind == P.SKIP:
            assert caps[h] == 0


def test_ring_buffer_regrows_past_max_length():
    lm = tiny("llama")
    RT.apply(lm.model, plan_for(lm, lambda li, h: stream(2, 4, 0.25)))
    x = ids(90, 1, seed=3)
    with torch.no_grad():
        ref = lm.model(x, use_cache=False).logits
        cache = RT.new_cache(lm.model, 20)  # too small on purpose
        outs = [lm.model(x[:, :10], past_key_values=cache).logits]
        for t in range(10, 90):
            outs.append(lm.model(x[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=2e-5)


def test_chunked_prefill_equals_unchunked():
    lm = tiny("qwen2")
    RT.apply(lm.model, mixed_plan(lm))
    x = ids(97, 2, seed=4)
    with torch.no_grad():
        ref = lm.model(x, use_cache=False).logits
        cache = RT.new_cache(lm.model, 128)
        parts = [lm.model(x[:, a:b], past_key_values=cache).logits for a, b in ((0, 31), (31, 64), (64, 97))]
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padded_batch_matches_unpadded_runs(family):
    lm = tiny(family)
    RT.apply(lm.model, mixed_plan(lm))
    a, b = ids(70, seed=5), ids(45, seed=6)
    batch = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 25:], mask[1, 25:] = b[0], 1
    kw = dict(max_new_tokens=35, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        lp = lm.model(batch, attention_mask=mask).logits
        la, lb = lm.model(a).logits, lm.model(b).logits
        g = lm.model.generate(batch, attention_mask=mask, **kw)
        ga, gb = lm.model.generate(a, **kw), lm.model.generate(b, **kw)
    torch.testing.assert_close(lp[0], la[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(lp[1, 25:], lb[0], rtol=0, atol=2e-5)
    assert torch.equal(g[0, 70:], ga[0, 70:])
    assert torch.equal(g[1, 70:], gb[0, 45:])


def test_generate_uses_per_head_cache_and_matches_masked_greedy():
    """Greedy generate through the evicting cache equals greedy decoding by full masked forwards."""
    lm = tiny("llama")
    RT.apply(lm.model, mixed_plan(lm))
    x = ids(50, seed=7)
    with torch.no_grad():
        g = lm.model.generate(x, max_new_tokens=32, do_sample=False, pad_token_id=0)
        seq = x
        for _ in range(32):
            nxt = lm.model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(g, seq)


def test_streaming_head_matches_explicit_mask():
    """Reference attention for a streaming head equals SDPA with a hand-built band mask."""
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 131, 32
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    sink, alpha, beta = 5, 17, 0.25
    table = P.make_table([stream(sink, alpha, beta)] * H)
    out = R.prefill_ref(q, k, v, table, D ** -0.5)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    w = alpha + (i + 1) // 4  # beta = 1/4
    mask = (j <= i) & ((j < sink) | (i - j < w))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and it is really sparse: differs from causal attention
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - causal).abs().max() > 1e-2


def test_skip_head_outputs_zero():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    table = P.make_table([skip(), full()])
    out = R.prefill_ref(q, k, v, table, 0.25)
    assert out[:, :2].abs().max() == 0
    assert out[:, 2:].abs().max() > 0.1


def test_wrong_model_plan_is_refused():
    from headplan.errors import PlanError

    plan = mixed_plan(tiny("llama"))
    with pytest.raises(PlanError, match="plan is for another model"):
        RT.apply(tiny("qwen2").model, plan)


def test_kv_bytes_follow_the_plan():
    lm = tiny("llama")
    RT.apply(lm.model, plan_for(lm, lambda li, h: stream(4, 28)))
    cache = RT.new_cache(lm.model, 1024)
    with torch.no_grad():
        lm.model(ids(300), past_key_values=cache)
    dense_bytes = 2 * 2 * 2 * 1024 * 16 * 4  # layers * kv heads * (K,V) * max_len * head_dim * fp32
    assert cache.kv_bytes() * 10 < dense_bytes


def test_random_model_from_config_json(tmp_path):
    import json

    from headplan.models import load_model

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    lm = load_model(f"random:{p}")
    assert (lm.identity.num_layers, lm.identity.num_query_heads, lm.identity.num_kv_heads) == (3, 8, 2)
    assert lm.identity.head_dim == 8 and lm.identity.max_positions == 512
    RT.apply(lm.model, mixed_plan(lm))
    x = ids(40, vocab=300)
    with torch.no_grad():
        assert torch.isfinite(lm.model(x).logits).all()


def assert_same_generation(a, b, margin=0.05, atol=1e-2):
    """Two greedy generate() results (with scores) agree: same logits up to fp32 reordering noise, and the
    same token at every step whose top-2 margin is clear (a near-tie may flip; the rows then part ways)."""
    n0 = a.sequences.shape[1] - len(a.scores)
    for row in range(a.sequences.shape[0]):
        for t, (sa, sb) in enumerate(zip(a.scores, b.scores)):
            assert (sa[row] - sb[row]).abs().max() < atol, (row, t)
            top2 = sa[row].topk(2).values
            if top2[0] - top2[1] < margin:
                break  # a near-tie: both continuations are the model's
            assert a.sequences[row, n0 + t] == b.sequences[row, n0 + t], (row, t)


def test_generate_with_chunked_prefill_equals_unchunked():
    lm = tiny("llama")
    x = ids(90, 2, seed=8)
    mask = torch.ones_like(x)
    mask[1, :13] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        RT.apply(lm.model, mixed_plan(lm))
        a = lm.model.generate(x, **kw)
        RT.apply(lm.model, mixed_plan(lm), prefill_chunk=16)
        b = lm.model.generate(x, **kw)
        RT.apply(lm.model, mixed_plan(lm), prefill_chunk=None)
    assert_same_generation(a, b)


def test_generate_sizes_the_cache_from_max_length(monkeypatch):
    """generate(max_length=N) sizes the per-head cache for N tokens, as max_new_tokens does: it never regrows."""
    from headplan.runtime.cache import HeadplanLayer

    lm = tiny("llama")
    RT.apply(lm.model, mixed_plan(lm))
    grown = []
    orig = HeadplanLayer._grow
    monkeypatch.setattr(HeadplanLayer, "_grow", lambda self, need: grown.append(need) or orig(self, need))
    x = ids(30, 1, seed=4)
    with torch.no_grad():
        a = lm.model.generate(x, max_length=30 + 25, min_length=30 + 25, do_sample=False, pad_token_id=0)
        b = lm.model.generate(x, max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0)
    assert a.shape[1] == 55 and grown == []
    assert torch.equal(a, b)


def test_cache_refuses_wrong_batch_dtype_and_overflow():
    lm = tiny("llama")
    RT.apply(lm.model, mixed_plan(lm))
    cache = RT.new_cache(lm.model, 40, grow=False)
    with torch.no_grad():
        lm.model(ids(30, 2), past_key_values=cache)
        with pytest.raises(ValueError, match="sized for batch 2"):
            lm.model(ids(1, 3), past_key_values=cache)
        with pytest.raises(ValueError, match="sized for 40 tokens"):
            lm.model(ids(20, 2), past_key_values=cache)


def test_beam_search_with_streaming_heads_is_refused():
    from headplan.errors import HeadplanError

    lm = tiny("llama")
    RT.apply(lm.model, mixed_plan(lm))
    with pytest.raises(HeadplanError, match="beam search"):
        lm.model.generate(ids(20), max_new_tokens=3, num_beams=2, pad_token_id=0)


@pytest.mark.parametrize("rows,G,L,pad", [
    ([stream(4, 9, 0.125), full()], 3, 131, False),
    ([strided(2, 4, stride=3, offset=1), vslash(9, 6)], 2, 97, False),
    ([bsp(2), stream(3, 5)], 1, 200, True),
    ([skip(), full()], 2, 77, False),  # an empty row: the explicit path
])
def test_fused_reference_equals_explicit(rows, G, L, pad):
    """The CPU runtime path (visibility of the reference, attention by SDPA) == the explicit oracle."""
    torch.manual_seed(1)
    B, Hkv, D = 2, len(rows), 32
    q = torch.randn(B, Hkv * G, L, D)
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    table = P.make_table(rows)
    p = torch.tensor([0, 7]) if pad else None
    want = R.prefill_ref(q, k, v, table, D ** -0.5, pad=p, block=16)
    got = R.prefill_ref(q, k, v, table, D ** -0.5, pad=p, block=16, fused=True)
    if pad:  # rows of padding slots are undefined in both; compare the real tokens
        want, got = want[1, :, 7:], got[1, :, 7:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.05


def _kernel_inputs(monkeypatch, seed: int):
    """(q, k, v) for the routed-prefill tests, 8 query / 4 KV heads, 150 tokens: fp16 on the GPU (the kernel's
    own path), else fp32 on the CPU with the kernel forced through the Triton interpreter."""
    from headplan.runtime import backend

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, 150, 64, generator=g) for h in (8, 4, 4))
    if torch.cuda.is_available():
        return tuple(t.to("cuda", torch.float16) for t in (q, k, v))
    monkeypatch.setattr(backend, "_use_triton", lambda x: True)
    return q, k, v


def _close_to_reference(out, q, k, v, table, scale):
    """The routed output against the fp32 reference: exact to 1e-4 in fp32; in fp16 within twice the error of
    the reference run in fp16 itself (plus a rounding step)."""
    ref = R.prefill_ref(*(t.float().cpu() for t in (q, k, v)), table.cpu(), scale)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-4)
        return
    same = R.prefill_ref(*(t.cpu() for t in (q, k, v)), table.cpu(), scale).float()
    bound = 2 * float((same - ref).abs().max()) + 1e-3
    assert float((out.float().cpu() - ref).abs().max()) <= bound


def test_routed_prefill_equals_the_plan(monkeypatch):
    """Long prompts send a layer's full heads to dense SDPA on that head subset and the others to the sparse
    kernel: the same result as the kernel alone (and the reference). Forced here on the CPU with the
    Triton interpreter and a low routing threshold."""
    import os
    import math

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from headplan.runtime import backend
    from cases import ONE_OF_EACH

    rows = [ONE_OF_EACH["full"], ONE_OF_EACH["streaming"], ONE_OF_EACH["full"], ONE_OF_EACH["strided"]]
    q, k, v = _kernel_inputs(monkeypatch, 3)
    table = P.make_table(rows, device=q.device)
    monkeypatch.setattr(backend, "ROUTE_FULL_FROM", 100)
    calls = []
    orig = backend._kernel("prefill")
    monkeypatch.setattr(backend, "_kernel", lambda name: (lambda *a, **kw: calls.append(a[3].shape[0]) or orig(*a, **kw)))
    out = backend.prefill(q, k, v, table, 1 / math.sqrt(64))
    assert calls == [2]  # the kernel saw only the two non-full KV heads
    _close_to_reference(out, q, k, v, table, 1 / math.sqrt(64))
    calls.clear()
    backend.prefill(q[:, :, :90], k[:, :, :90], v[:, :, :90], table, 0.125)  # shorter than the threshold
    assert calls == [4]


def test_routing_follows_the_layers_cost_table(monkeypatch):
    """The runtime asks the layer's FullRoute (its cost table) whether to split, per prompt length."""
    import dataclasses
    import math
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from headplan.candidates import full, streaming
    from headplan.costmodel import analytic
    from headplan.runtime import backend

    base = analytic(head_dim=64, group=2)
    # split pays from ~120 tokens with these rates
    cost = dataclasses.replace(base, dense_per_pair_ns=base.per_pair_ns["full"] / 2, route_fixed_us=0.0,
                               route_ns_per_token=base.per_pair_ns["full"] * 30)
    pats = [full().pattern, streaming(4, 16).pattern, full().pattern, streaming(2, 8).pattern]
    assert not cost.routes_full(pats, 90) and cost.routes_full(pats, 150)
    route = backend.FullRoute(pats, 64, 0, cost)
    q, k, v = _kernel_inputs(monkeypatch, 5)
    table = P.make_table([p.row() for p in pats], device=q.device)
    calls = []
    orig = backend._kernel("prefill")
    monkeypatch.setattr(backend, "_kernel", lambda name: (lambda *a, **kw: calls.append(a[3].shape[0]) or orig(*a, **kw)))
    out = backend.prefill(q, k, v, table, 0.125, route=route)
    assert calls == [2]
    _close_to_reference(out, q, k, v, table, 0.125)
    calls.clear()
    backend.prefill(q[:, :, :90], k[:, :, :90], v[:, :, :90], table, 0.125, route=route)
    assert calls == [4]
    assert math.isfinite(float(out.abs().max()))
    # no full head, or a local layer: never split
    assert not backend.FullRoute([streaming(4, 16).pattern] * 4, 64, 0, cost).split(1 << 20, "cpu", 64, 2)
    assert not backend.FullRoute(pats, 64, 32, cost).split(1 << 20, "cpu", 64, 2)
    # no table on a CPU device: the fixed rule
    fr = backend.FullRoute(pats, 64, 0)
    assert fr.source("cpu", 64, 2) == "fixed rule"
    assert fr.split(backend.ROUTE_FULL_FROM, "cpu", 64, 2) and not fr.split(backend.ROUTE_FULL_FROM - 1, "cpu", 64, 2)
