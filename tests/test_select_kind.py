"""The select head kind: per-KV-head token selection at the end of each prefill chunk (kernels.patterns SELECT),
checked against brute-force selections written here, in the cache, the decode step and a whole model."""
import math

import pytest
import torch

from cases import full, sel
from headplan import runtime as RT
from headplan.kernels import patterns as P
from headplan.runtime.cache import HeadplanLayer
from helpers import ids, plan_for, tiny

SEL = sel(3, 6, keep_alpha=1, keep_beta=0.125)


def brute_scores(q, k, qpos):
    """SELECT's scores written out (one sequence, keys at positions 0..n-1): the observation queries' (q (G, O, D)
    at positions qpos) attention averaged over queries, max over the group, max-pooled over 7 neighbours,
    plus 1e-3 times the unpooled score."""
    j = torch.arange(k.shape[0])
    s = torch.einsum("god,nd->gon", q.double(), k.double()) / math.sqrt(q.shape[-1])
    raw = torch.softmax(s.masked_fill(j[None, None] > qpos[None, :, None], -math.inf), -1).mean(1).amax(0)
    return torch.nn.functional.max_pool1d(raw[None, None], 7, 1, 3)[0, 0] + 1e-3 * raw


def assert_valid_selection(kept: set, score, sink, ring, K):
    """``kept`` (positions of keys 0..n-1) is the sink, the last ``ring`` and a top-K of the others by score
    (ties within float32 rounding may go either way)."""
    n = score.shape[0]
    near = set(range(min(sink, n))) | set(range(max(0, n - ring), n))
    cand = [p for p in range(n) if p not in near]
    chosen = kept - near
    assert near <= kept and chosen <= set(cand) and len(chosen) == min(K, len(cand))
    rest = [p for p in cand if p not in chosen]
    if chosen and rest:
        assert min(float(score[p]) for p in chosen) >= max(float(score[p]) for p in rest) - 1e-6


def held(layer, h, b=0):
    return set(p for p in layer.head_view(h)[2][b].tolist() if p >= 0)


@pytest.mark.parametrize("G,n", [(1, 70), (3, 133)])
def test_a_chunk_keeps_sink_window_and_the_top_scored_tokens(G, n):
    torch.manual_seed(0)
    rows = [SEL, full()]
    table = P.make_table(rows)
    layer = HeadplanLayer(table, 512)
    B, Hkv, D = 2, 2, 16
    q = torch.randn(B, Hkv * G, n, D)
    k, v = torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    layer.update(k, v)
    pos = torch.arange(n).expand(B, n)
    layer.commit_contiguous(k, v, (q, pos, D ** -0.5))
    K = 1 + (512 * n) // 4096
    for b in range(B):
        assert_valid_selection(held(layer, 0, b), brute_scores(q[b, :G, -P.OBS:], k[b, 0], pos[b, -P.OBS:]), 3, 6, K)
        assert len(held(layer, 0, b)) == 3 + 6 + K  # the head holds exactly its budget
        assert held(layer, 1, b) == set(range(n))  # the full head everything
    # decode: the new token attends to what the select head holds, plus itself
    kq, kk, kv_ = torch.randn(B, Hkv * G, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    layer.update(kk[:, :, None], kv_[:, :, None])
    vlen = layer.commit_one(kk, kv_, None)
    out = RT.backend.decode(kq, layer.k_buf, layer.v_buf, layer.slot_pos, layer.head_off("cpu"),
                            layer.head_cap("cpu"), layer.n_logical, table, D ** -0.5, valid_len=vlen,
                            max_cap=max(layer.cap))
    for b in range(B):
        keep = sorted(p for p in held(layer, 0, b) if p < n)
        assert n in held(layer, 0, b) and len(keep) == 3 + 5 + K  # the ring dropped its oldest token
        kk_all = torch.cat([k[b, 0, keep], kk[b, 0][None]])
        vv_all = torch.cat([v[b, 0, keep], kv_[b, 0][None]])
        want = torch.softmax(kq[b, :G] @ kk_all.T * D ** -0.5, -1) @ vv_all
        torch.testing.assert_close(out[b, :G], want, rtol=1e-5, atol=1e-5)


def test_a_later_chunk_reselects_among_what_is_held_and_the_chunk():
    torch.manual_seed(1)
    table = P.make_table([SEL])
    layer = HeadplanLayer(table, 512)
    D = 16
    k, v, q = torch.randn(1, 1, 150, D), torch.randn(1, 1, 150, D), torch.randn(1, 2, 150, D)
    layer.update(k[:, :, :100], v[:, :, :100])
    layer.commit_contiguous(k[:, :, :100], v[:, :, :100], (q[:, :, :100], torch.arange(100)[None], D ** -0.5))
    before = held(layer, 0)
    layer.update(k[:, :, 100:], v[:, :, 100:])
    qpos = torch.arange(100, 150)[None]
    layer.commit(k[:, :, 100:], v[:, :, 100:], qpos, (q[:, :, 100:], qpos, D ** -0.5))
    after = held(layer, 0)
    assert len(after) == 3 + 6 + 1 + (512 * 150) // 4096
    assert after <= before | set(range(100, 150))  # nothing evicted comes back
    # the choice among the pool: brute force over exactly the held-before + chunk keys (window 144..149)
    pool = sorted(before | set(range(100, 150)))
    sc = brute_scores(q[0, :, -P.OBS:], k[0, 0, pool], torch.tensor([pool.index(p) for p in range(118, 150)]))
    near = {pool.index(p) for p in range(3)} | {pool.index(p) for p in range(144, 150)}
    idx = {pool.index(p) for p in after}
    assert near <= idx
    chosen, rest = idx - near, set(range(len(pool))) - idx
    assert len(chosen) == 1 + (512 * 150) // 4096
    assert min(float(sc[i]) for i in chosen) >= max(float(sc[i]) for i in rest) - 1e-6


def test_a_select_plan_prefills_as_full_and_decodes_from_its_selection():
    lm = tiny("llama")
    x = ids(120, 1, seed=5)
    with torch.no_grad():
        RT.apply(lm.model, plan_for(lm, lambda li, h: full()))
        full_logits = lm.model(x, use_cache=False).logits
        RT.apply(lm.model, plan_for(lm, lambda li, h: SEL if h == 0 else full()))
        cache = RT.new_cache(lm.model, 256)
        pre = lm.model(x[:, :100], past_key_values=cache).logits
        torch.testing.assert_close(pre, full_logits[:, :100], rtol=0, atol=1e-5)  # prefill: every key
        steps = torch.cat([lm.model(x[:, t:t + 1], past_key_values=cache).logits for t in range(100, 120)], 1)
        assert (steps - full_logits[:, 100:]).abs().max() > 1e-4  # decode: only what the select heads kept


def test_select_heads_hold_their_budget_through_generate():
    lm = tiny("qwen2")
    plan = plan_for(lm, lambda li, h: SEL)
    RT.apply(lm.model, plan)
    x = ids(200, 1, seed=6)
    cache = RT.new_cache(lm.model, 240)
    with torch.no_grad():
        lm.model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0, past_key_values=cache)
    want = 3 + 6 + 1 + (512 * 200) // 4096
    for layer in cache.layers:
        for h in range(len(layer.cap)):
            if layer.keep[h]:
                assert len(held(layer, h)) == want
    share = RT.kv_report(plan, 200, model=lm.model)
    assert share["plan_bytes"] < share["dense_bytes"]


def test_select_reference_matches_runtime_scores():
    """select_scores (the runtime's) equals the brute force above on a padded pool (empty slots, -1)."""
    torch.manual_seed(2)
    G, O, M, D = 2, 5, 40, 8
    q, k = torch.randn(1, G, O, D), torch.randn(1, M, D)
    kpos = torch.arange(M)[None].clone()
    kpos[0, ::7] = -1
    qpos = torch.arange(M - O, M)[None]
    sc = P.select_scores(q, k, kpos, qpos, D ** -0.5)
    assert torch.isinf(sc[0, ::7]).all()
    j = kpos[0]
    s = torch.einsum("god,nd->gon", q[0].double(), k[0].double()) * D ** -0.5
    a = torch.softmax(s.masked_fill((j[None, None] < 0) | (j[None, None] > qpos[0][None, :, None]), -math.inf), -1)
    raw = a.mean(1).amax(0)
    ok = j >= 0
    order = j.argsort()
    pooled = torch.nn.functional.max_pool1d(raw[order][None, None], 7, 1, 3)[0, 0]
    want = torch.empty_like(raw).scatter_(0, order, pooled) + 1e-3 * raw
    torch.testing.assert_close(sc[0, ok].double(), want[ok], rtol=1e-5, atol=1e-6)


def brute_context_scores(q, k, lwin=0):
    """The ``context`` scorer written out (one sequence, queries and keys at 0..n-1): each query's softmax over
    every key (both directions, inside the layer's window), the most any query gives a key, max over the
    group, max-pooled over 7 neighbours, plus 1e-3 times the unpooled score."""
    n = k.shape[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    s = torch.einsum("gid,jd->gij", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if lwin:
        s = s.masked_fill((i - j).abs() >= lwin, -math.inf)
    raw = torch.softmax(s, -1).amax(dim=(0, 1))
    return torch.nn.functional.max_pool1d(raw[None, None], 7, 1, 3)[0, 0] + 1e-3 * raw


@pytest.mark.parametrize("G,n,lwin", [(1, 70, 0), (3, 133, 0), (2, 97, 40)])
def test_the_context_scorer_keeps_the_tokens_any_query_reads(G, n, lwin):
    torch.manual_seed(1)
    D = 16
    q, k = torch.randn(2, G, n, D), torch.randn(2, n, D)
    pos = torch.arange(n).expand(2, n)
    got = P.context_scores(q, k, pos, pos, D ** -0.5, lwin, block=32)  # blocks of queries: same as one pass
    for b in range(2):
        torch.testing.assert_close(got[b].double(), brute_context_scores(q[b], k[b], lwin), rtol=1e-4, atol=1e-6)
    if lwin:
        return  # a sliding layer's cache keeps its window (test_runtime); the scores alone are checked here
    # through the cache: a select head with the context scorer keeps a top-K of those scores
    table = P.make_table([SEL, full()])
    layer = HeadplanLayer(table, 512, scorer="context")
    kk = torch.stack([k, torch.randn_like(k)], 1)
    qq = torch.cat([q, torch.randn_like(q)], 1)
    layer.update(kk, kk)
    layer.commit_contiguous(kk, kk, (qq, pos, D ** -0.5))
    K = 1 + (512 * n) // 4096
    for b in range(2):
        assert_valid_selection(held(layer, 0, b), brute_context_scores(q[b], k[b], lwin), 3, 6, K)


def test_the_context_scorer_finds_a_token_the_last_queries_ignore():
    """A key that only a mid-chunk query reads (the needle, before any question): the observation scorer,
    which looks at the last queries only, drops it; the context scorer keeps it."""
    torch.manual_seed(2)
    n, D = 200, 16
    k = torch.randn(1, 1, n, D) * 0.01
    q = torch.randn(1, 1, n, D) * 0.01
    k[0, 0, 50, 0] = 3.0  # the needle's key
    q[0, 0, 120, 0] = 3.0  # the one query that reads it, far before the end
    k[0, 0, 20:28, 1] = 3.0  # what the last queries read
    q[0, 0, -P.OBS:, 1] = 3.0
    table = P.make_table([sel(4, 16, keep_alpha=8, keep_beta=0.0)])
    pos = torch.arange(n).expand(1, n)
    kept = {}
    for scorer in ("obs", "context"):
        layer = HeadplanLayer(table, 512, scorer=scorer)
        layer.update(k, k)
        layer.commit_contiguous(k, k, (q, pos, D ** -0.5))
        kept[scorer] = held(layer, 0)
    assert 50 in kept["context"] and 50 not in kept["obs"]
    with pytest.raises(ValueError, match="scorer"):
        HeadplanLayer(table, 512, scorer="kvzip")


def test_the_question_after_compression_settings(tmp_path):
    """eval's ``after`` and ``after-context`` settings: the context is prefilled (and compressed) alone; the
    select heads' scorer is the cache's. A full plan then gives dense's logits exactly; a select plan's logits
    depend on the scorer; the eval reports each setting as its own task."""
    import yaml

    from headplan.api import do_eval
    from headplan.eval import driver
    from headplan.plan import save_plan
    from headplan.runtime import applied, dense

    lm = tiny("llama")  # shared with other tests, which may leave a plan on it: dense and each plan explicitly
    x = ids(160, seed=3)
    with dense(lm.model):
        dense_lg = driver.logits(lm.model, x, keep=20)
    full_plan = plan_for(lm, lambda li, h: full())
    sel_plan = plan_for(lm, lambda li, h: sel(4, 16, keep_alpha=8, keep_beta=0.0))
    with applied(lm.model, full_plan, check=False):
        torch.testing.assert_close(driver.logits(lm.model, x, keep=20, split=140), dense_lg, rtol=1e-4, atol=1e-4)
    with applied(lm.model, sel_plan, check=False):
        a = driver.logits(lm.model, x, keep=20, split=140, scorer="obs")
        b = driver.logits(lm.model, x, keep=20, split=140, scorer="context")
    assert (a - dense_lg).abs().max() > 1e-3 and (a - b).abs().max() > 1e-4
    save_plan(sel_plan, tmp_path / "sel.yaml")
    spec = {"name": "after", "seed": 5, "passkey": {"lengths": [256], "depths": [0.5], "samples": 1, "digits": 3,
                                                    "settings": ["single", "after", "after-context"]}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    res = do_eval("random:llama", tmp_path / "sel.yaml", tmp_path / "ev", data=str(tmp_path / "spec.yaml"), lm=lm)
    assert [r["task"] for r in res["retrieval"]] == ["passkey", "passkey-after", "passkey-after-context"]


def test_the_select_heads_of_a_layer_are_chosen_together_each_on_its_own_budget():
    """Several select heads (different sink, ring and keep) selected in one batched call: each head's kept set is
    its own brute-force top-K, in a first prefill and in a later chunk."""
    torch.manual_seed(3)
    rows = [SEL, sel(0, 4, keep_alpha=5, keep_beta=0.0), full(), sel(2, 9, keep_alpha=0, keep_beta=0.25)]
    layer = HeadplanLayer(P.make_table(rows), 512)
    B, Hkv, G, D, n = 2, 4, 2, 16, 90
    q, k, v = torch.randn(B, Hkv * G, n, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    layer.update(k, v)
    pos = torch.arange(n).expand(B, n)
    layer.commit_contiguous(k, v, (q, pos, D ** -0.5))
    for h, (sink, ring, K) in {0: (3, 6, 1 + (512 * n) // 4096), 1: (0, 4, 5), 3: (2, 9, (1024 * n) // 4096)}.items():
        for b in range(B):
            sc = brute_scores(q[b, h * G:(h + 1) * G, -P.OBS:], k[b, h], pos[b, -P.OBS:])
            assert_valid_selection(held(layer, h, b), sc, sink, ring, K)
            assert len(held(layer, h, b)) == sink + ring + K
    assert held(layer, 2, 0) == set(range(n))


def _pooled_layer(share, n=120, seed=4, Hkv=3, G=2, D=16):
    torch.manual_seed(seed)
    row = sel(8, 5, keep_alpha=0, keep_beta=0.125, share=share)
    layer = HeadplanLayer(P.make_table([row] * Hkv), 256)
    q, k, v = torch.randn(1, Hkv * G, n, D), torch.randn(1, Hkv, n, D), torch.randn(1, Hkv, n, D)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0) * 6
    q[0, :G, -P.OBS:] += u
    k[0, 0, :4] += u  # head 0 attends to its sink: its other tokens score low, only its floor keeps some
    layer.update(k, v)
    pos = torch.arange(n)[None]
    layer.commit_contiguous(k, v, (q, pos, D ** -0.5))
    return layer, q, k, pos, G


def test_adakv_heads_pool_their_budgets_and_tokens_compete_across_heads():
    n, Hkv = 120, 3
    layer, q, k, pos, G = _pooled_layer("layer", n)
    own = (512 * n) // 4096  # each head's own K(n) = 15
    scores = [brute_scores(q[0, h * G:(h + 1) * G, -P.OBS:], k[0, h], pos[0, -P.OBS:]) for h in range(Hkv)]
    near = set(range(8)) | set(range(n - 5, n))
    kept = [held(layer, h) - near for h in range(Hkv)]
    assert all(near <= held(layer, h) for h in range(Hkv))
    assert sum(map(len, kept)) == Hkv * own  # the pool's total, spent unevenly
    assert len({len(x) for x in kept}) > 1
    assert len(kept[0]) == int(own * P.SHARE_FLOOR)  # head 0 gets its floor and no more
    floor = int(own * P.SHARE_FLOOR)
    cand = [p for p in range(n) if p not in near]
    for h in range(Hkv):  # each head keeps at least its floor: its own top tokens
        top = sorted(cand, key=lambda p: -float(scores[h][p]))[:floor]
        assert set(top) <= kept[h]
    # beyond the floors, the pool's choice is a joint top-k over every head's candidates
    rest = [(float(scores[h][p]), h, p) for h in range(Hkv) for p in cand]
    floors = {(h, p) for h in range(Hkv) for p in sorted(cand, key=lambda p: -float(scores[h][p]))[:floor]}
    chosen = [x for x in rest if x[2] in kept[x[1]] and (x[1], x[2]) not in floors]
    dropped = [x for x in rest if x[2] not in kept[x[1]]]
    assert min(c[0] for c in chosen) >= max(d[0] for d in dropped) - 1e-6


def test_duo_heads_scored_on_the_fly_buy_whole_heads_with_the_pooled_budget():
    n, Hkv, G, D = 120, 3, 2, 16
    torch.manual_seed(4)
    row = sel(2, 5, keep_alpha=0, keep_beta=0.375, share="heads")
    layer = HeadplanLayer(P.make_table([row] * Hkv), 256)
    q, k, v = torch.randn(1, Hkv * G, n, D), torch.randn(1, Hkv, n, D), torch.randn(1, Hkv, n, D)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0) * 6
    q[0, :, -P.OBS:] += u
    for h in range(Hkv):  # head 1's last queries look far back (keys 20..39), the others at their ring
        k[0, h, slice(20, 40) if h == 1 else slice(n - 5, n)] += u
    layer.update(k, v)
    layer.commit_contiguous(k, v, (q, torch.arange(n)[None], D ** -0.5))
    # the pooled budget, 3 x 45 = 135 tokens, buys one whole head of 113 candidates (a head is bought while the
    # budget left covers half of it: not a second one); head 1 keeps everything, the others sink + ring
    assert held(layer, 1) == set(range(n))
    assert held(layer, 0) == held(layer, 2) == set(range(2)) | set(range(n - 5, n))
    # with a budget too small for half a head, no head is bought
    small = HeadplanLayer(P.make_table([{**row, "keep_beta": 0.125}] * Hkv), 256)
    small.update(k, v)
    small.commit_contiguous(k, v, (q, torch.arange(n)[None], D ** -0.5))
    assert all(len(held(small, h)) == 7 for h in range(Hkv))


@pytest.mark.parametrize("share,family", [("layer", "qwen2"), ("heads", "gemma3")])
def test_pooled_select_heads_through_generate_hold_the_pools_budget(share, family):
    """AdaKV and on-the-fly Duo heads in a whole model (Gemma 3: its sliding layers too), prefill then decode:
    each layer's select heads hold, together, what their pooled budget allows (a Duo head all or nothing)."""
    lm = tiny(family)
    row = {**SEL, "share": share}
    plan = plan_for(lm, lambda li, h: row)
    RT.apply(lm.model, plan)
    x = ids(200, 1, seed=7)
    cache = RT.new_cache(lm.model, 240)
    with torch.no_grad():
        out = lm.model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert out.shape[1] == 204
    own, near, pooled = 1 + (512 * 200) // 4096, 3 + 6, 0  # K(200), sink + ring
    for layer in cache.layers:
        hs = [h for h in range(len(layer.cap)) if layer.keep[h]]
        if not hs:  # a sliding layer whose window is smaller than the head's budget: a plain ring
            continue
        pooled += 1
        kept = [len({p for p in held(layer, h) if 3 <= p < 200 - 6}) for h in hs]  # chosen at the prefill
        if share == "layer":
            assert sum(kept) == own * len(hs)
        else:
            assert all(k in (0, 200 - near) for k in kept)
    assert pooled
