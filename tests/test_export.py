"""headplan.export: serving-engine formats (hf-layer-types, trtllm, duo-tsv) and the DuoAttention importer."""
import json

import pytest
import torch

import headplan
from cases import bsp, full, skip, stream
from headplan.errors import HeadplanError
from headplan.export import (NotExpressible, export_plan, import_duo, kv_shares, project_plan, read_duo,
                             refusal, render)
from headplan.models import identity_of
from headplan.plan import ModelIdentity, load_plan, plan_from_rows, save_plan
from helpers import ids, invoke

FULL = full()


def win(alpha, sink=0, beta=0.0):
    return stream(sink, alpha, beta)


def ident(layers=4, kv=2, arch="Qwen2ForCausalLM", windows=(), max_positions=512):
    return ModelIdentity(architecture=arch, num_layers=layers, num_query_heads=2 * kv, num_kv_heads=kv, head_dim=16,
                         max_positions=max_positions, fingerprint="sha256:0000000000000000",
                         layer_windows=tuple(windows))


def rows_plan(identity, rows):
    return plan_from_rows(identity, [[dict(r) for r in layer] for layer in rows])


def stray(path):
    """Hidden staging folders an export may have left beside its output."""
    return [p.name for p in path.iterdir() if p.name.startswith(".")]


# -- hf-layer-types: transformers runs the exported config as the runtime runs the plan ---------------------

def _qwen2():
    from transformers import Qwen2Config
    # sliding windows switched on, but no layer slides (max_window_layers = every layer): the plan adds them
    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       use_sliding_window=True, sliding_window=4096, max_window_layers=4, tie_word_embeddings=False)


def _gemma3():
    from transformers import Gemma3TextConfig
    # its own local layers (window 48) and one global layer; the plan narrows the local ones
    return Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                            sliding_window=48, query_pre_attn_scalar=16, tie_word_embeddings=False,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"])


CASES = {
    # layers 1 and 3 become sliding (window 24): the layer types change
    "qwen2": (_qwen2, lambda li: win(24) if li % 2 else FULL,
              ["full_attention", "sliding_attention", "full_attention", "sliding_attention"], 24),
    # the local layers' window 48 -> 20, the global layer stays global (Gemma 3's type also picks its RoPE)
    "gemma3": (_gemma3, lambda li: FULL if li == 2 else win(20),
               ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"], 20),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_hf_layer_types_matches_runtime(family, tmp_path):
    from transformers import AutoModelForCausalLM

    make_cfg, row, want_types, want_window = CASES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_cfg(), attn_implementation="sdpa", dtype=torch.float32).eval()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path / "model")
    ident_ = identity_of(model.config)
    plan = plan_from_rows(ident_, [[row(li)] * ident_.num_kv_heads for li in range(ident_.num_layers)])

    export_plan(plan, "hf-layer-types", tmp_path / "hf")
    patch = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert patch["layer_types"] == want_types and patch["sliding_window"] == want_window
    cfg_file = tmp_path / "model" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **patch}))
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="sdpa",
                                                  dtype=torch.float32).eval()
    assert list(served.config.layer_types) == want_types

    x = ids(96, 2, seed=4, vocab=250)  # 96 tokens: four to five times the window
    with torch.no_grad():
        dense = model(x).logits
        headplan.apply(model, plan)
        ours = model(x).logits
        theirs = served(x).logits
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * scale)
    assert float((dense - ours).abs().max()) > 1e-2 * scale  # the windows really change the result


def test_hf_layer_types_refusals():
    q = ident()
    # a sink, an elastic window, two window sizes, a per-head mixed layer: each names its layer (and head)
    cases = [
        ([[FULL, FULL], [win(24, sink=4)] * 2, [FULL, FULL], [FULL, FULL]], "layer 1 kv_head 0", "sink"),
        ([[FULL, FULL], [FULL, FULL], [win(24, beta=0.25)] * 2, [FULL, FULL]], "layer 2 kv_head 0", "elastic"),
        ([[win(24)] * 2, [FULL, FULL], [FULL, FULL], [win(32)] * 2], "layer 3", "differs from layer 0's 24"),
        ([[FULL, FULL], [FULL, win(24)], [FULL, FULL], [FULL, FULL]], "layer 1 kv_head 1", "kv_head 0 sees full"),
    ]
    for rows, where, why in cases:
        msg = refusal(rows_plan(q, rows), "hf-layer-types")
        assert msg is not None and f"{where} " in msg and why in msg and "\n" not in msg, msg
    # an elastic window whose W(n) = alpha + floor(beta n) never grows within the 512 positions is fixed
    assert refusal(rows_plan(q, [[win(24, beta=1 / 4096)] * 2] + [[FULL, FULL]] * 3), "hf-layer-types") is None
    assert refusal(rows_plan(q, [[win(24, beta=8 / 4096)] * 2] + [[FULL, FULL]] * 3), "hf-layer-types") is not None
    # Gemma 3: a global layer cannot become sliding (its type also picks its RoPE); Llama has no window
    g = ident(arch="Gemma3ForCausalLM", windows=(48, 48, 0, 48))
    msg = refusal(rows_plan(g, [[win(20)] * 2] * 4), "hf-layer-types")
    assert msg and "layer 2 " in msg and "RoPE" in msg
    assert refusal(rows_plan(g, [[win(20)] * 2, [win(20)] * 2, [FULL] * 2, [win(20)] * 2]), "hf-layer-types") is None
    proj = project_plan(rows_plan(g, [[win(20)] * 2] * 4), "hf-layer-types")  # the global layer stays global
    assert [layer[0].pattern.kind for layer in proj.layers] == ["streaming", "streaming", "full", "streaming"]
    msg = refusal(rows_plan(ident(arch="LlamaForCausalLM"), [[win(20)] * 2] + [[FULL] * 2] * 3), "hf-layer-types")
    assert msg and "layer 0 " in msg and "no sliding window" in msg


def test_projection_for_hf_layer_types():
    q = ident(layers=5)
    rows = [[FULL, win(24)],  # tie: the pattern keeping more KV (full) wins
            [win(24), win(24, sink=4)],  # tie: sink4+win24 keeps more; then sinks dropped: window 24
            [skip(), win(40)],  # skip takes the layer's window; 40 -> the plan's common window 24
            [win(24)] * 2,
            [bsp(1), bsp(2)]]  # keep every entry: full
    plan = rows_plan(q, rows)
    assert refusal(plan, "hf-layer-types") is not None
    proj = project_plan(plan, "hf-layer-types")
    assert refusal(proj, "hf-layer-types") is None
    got = [[(e.pattern.kind, e.pattern.sink, e.pattern.window and e.pattern.window.alpha) for e in layer]
           for layer in proj.layers]
    assert got == [[("full", None, None)] * 2] + [[("streaming", 0, 24)] * 2] * 3 + [[("full", None, None)] * 2]
    assert [e.candidate for e in proj.layers[3]] == ["streaming", "streaming"]  # unchanged heads kept as they were
    assert proj.layers[2][1].candidate == "sink0+win24"
    assert proj.model == plan.model and proj.provenance["source"] == "projected"
    # an already expressible plan comes back as it is
    assert project_plan(proj, "hf-layer-types") is proj


def test_effective_matches_the_pattern_definition():
    """What an engine is told a head sees (sink + fixed window, or everything) is, for every position of the
    model, what kernels/patterns.py lets it see, the layer's own window included."""
    import itertools

    from headplan.export import Unfit, effective
    from headplan.kernels import patterns as P
    from headplan.plan import Pattern, Window

    mp, checked = 64, 0
    i, j = torch.arange(mp).view(-1, 1), torch.arange(mp).view(1, -1)
    for lwin in (0, 16, 40, 64, 100):
        cap = lwin if 0 < lwin < mp else None
        pats = [Pattern("full")] + [Pattern("streaming", sink=s, window=Window(a, b)) for s, a, b in
                                    itertools.product([0, 3, 30], [1, 8, 16, 20, 50, 70], [0.0, 1 / 4096, 0.125])]
        for p in pats:
            try:
                d = effective(p, cap, mp)
            except Unfit:
                continue
            vis = P.static_visible(i, j, P.make_table([p.row()], layer_window=lwin))[0]
            told = (j <= i) & ((j < d.sink) | (i - j < (d.window or mp)))
            assert torch.equal(vis, told), (lwin, p, d)
            checked += 1
    assert checked > 100


# -- trtllm ---------------------------------------------------------------------------------------------

def test_trtllm_content():
    q = ident(max_positions=512)
    plan = rows_plan(q, [[FULL, FULL], [win(60, sink=4)] * 2, [win(124, sink=4)] * 2, [win(1024, sink=4)] * 2])
    data = json.loads(render(plan, "trtllm")["kv_cache_config.json"])
    # sink + window per window layer (TensorRT-LLM counts sinks inside the window); a window spanning the
    # positions is full: the model's max positions
    assert data == {"max_attention_window": [512, 64, 128, 512], "sink_token_length": 4}
    msg = refusal(rows_plan(q, [[FULL, FULL], [win(60, sink=4)] * 2, [win(60, sink=8)] * 2, [FULL, FULL]]), "trtllm")
    assert msg and "layer 2 " in msg and "sink 8 differs from layer 1's 4" in msg
    msg = refusal(rows_plan(q, [[FULL, FULL], [FULL, win(60, sink=4)], [FULL, FULL], [FULL, FULL]]), "trtllm")
    assert msg and "layer 1 kv_head 1 " in msg
    # a model's own sliding layer: full there is its window; a sink there is refused
    s = ident(windows=(0, 100, 0, 100))
    assert json.loads(render(rows_plan(s, [[FULL] * 2, [FULL] * 2, [FULL] * 2, [win(50)] * 2]), "trtllm")
                      ["kv_cache_config.json"]) == {"max_attention_window": [512, 100, 512, 50], "sink_token_length": 0}
    msg = refusal(rows_plan(s, [[FULL] * 2, [win(50, sink=4)] * 2, [FULL] * 2, [FULL] * 2]), "trtllm")
    assert msg and "layer 1 kv_head 0 " in msg and "hides its sink" in msg
    # projection: per layer the pattern keeping more KV on a tie (sink 8), then the common sink (4 of 4, 8, 4);
    # the elastic window becomes W(512) = 60 + floor(0.25 x 512) = 188
    proj = project_plan(rows_plan(q, [[FULL, FULL], [win(60, sink=4)] * 2, [win(60, sink=8), win(60, sink=4)],
                                      [win(60, sink=4, beta=0.25)] * 2]), "trtllm")
    assert json.loads(render(proj, "trtllm")["kv_cache_config.json"]) == {
        "max_attention_window": [512, 64, 64, 4 + 188], "sink_token_length": 4}


# -- duo-tsv --------------------------------------------------------------------------------------------

def test_duo_round_trip(tmp_path):
    q = ident(layers=3, kv=4)
    rows = [[FULL, win(32, sink=4), win(32, sink=4), FULL],
            [win(32, sink=4)] * 4,
            [FULL] * 4]
    plan = rows_plan(q, rows)
    r = export_plan(plan, "duo-tsv", tmp_path / "duo")
    assert sorted(p.name for p in (tmp_path / "duo").iterdir()) == ["config.json", "full_attention_heads.tsv"]
    assert (tmp_path / "duo" / "full_attention_heads.tsv").read_text() == "1\t0\t0\t1\n0\t0\t0\t0\n1\t1\t1\t1\n"
    assert json.loads((tmp_path / "duo" / "config.json").read_text()) == {"sink_size": 4, "recent_size": 32}
    back = import_duo(tmp_path / "duo", q)
    pats = lambda p: [[e.pattern for e in layer] for layer in p.layers]  # noqa: E731
    assert pats(back) == pats(plan)
    assert kv_shares(back) == kv_shares(plan) and r.plan is plan
    # the TSV file itself works too, and the imported plan writes and reloads as every plan does
    save_plan(import_duo(tmp_path / "duo" / "full_attention_heads.tsv", q), tmp_path / "p.yaml")
    assert pats(load_plan(tmp_path / "p.yaml")) == pats(plan)
    msg = refusal(rows_plan(q, [[FULL, win(32, sink=4), win(16, sink=4), FULL]] + rows[1:]), "duo-tsv")
    assert msg and "layer 0 kv_head 2 " in msg


def test_duo_import_fractional_gates(tmp_path):
    q = ident(layers=2, kv=3)
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.2\t1.7\n-0.3\t0.5\t0.49\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 8, "recent_size": 64, "lr": 0.02}))
    gates, sink, recent = read_duo(tmp_path)
    assert gates == [[0.9, 0.2, 1.0], [0.0, 0.5, 0.49]] and (sink, recent) == (8, 64)  # clipped to [0, 1]
    kinds = lambda p: [[e.pattern.kind[0] for e in layer] for layer in p.layers]  # noqa: E731
    assert kinds(import_duo(tmp_path, q)) == [["f", "s", "f"], ["s", "f", "s"]]  # >= 0.5 is full
    assert kinds(import_duo(tmp_path, q, threshold=0.95)) == [["s", "s", "f"], ["s", "s", "s"]]
    assert kinds(import_duo(tmp_path, q, keep_top=1 / 3)) == [["f", "s", "f"], ["s", "s", "s"]]  # top 2 of 6
    p = import_duo(tmp_path, q)
    assert (p.pattern(0, 1).sink, p.pattern(0, 1).window.alpha) == (8, 64)
    assert p.provenance["source"] == "duo-attention"
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.2\n0.1\t0.3\n")
    with pytest.raises(HeadplanError, match="row 1 has 2 values"):
        import_duo(tmp_path, q)


# -- the command ----------------------------------------------------------------------------------------

def test_cli_refuses_then_projects(tmp_path):
    q = ident()
    plan = rows_plan(q, [[FULL, FULL], [FULL, win(24)], [win(24)] * 2, [FULL, FULL]])  # layer 1 mixed per head
    save_plan(plan, tmp_path / "plan.yaml")
    out = tmp_path / "served"
    r = invoke("export", tmp_path / "plan.yaml", "--format", "hf-layer-types", "--out", out)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer 1 kv_head 1" in lines[0] and "Traceback" not in r.output
    assert not out.exists() and stray(tmp_path) == []  # nothing written, no staging folder left

    r = invoke("export", tmp_path / "plan.yaml", "--format", "hf-layer-types", "--out", out, "--project")
    assert r.exit_code == 0, r.output
    patch = json.loads((out / "config.json").read_text())
    assert patch == {"layer_types": ["full_attention", "full_attention", "sliding_attention", "full_attention"],
                     "sliding_window": 24, "use_sliding_window": True}
    proj = load_plan(out / "projected-plan.yaml")
    assert refusal(proj, "hf-layer-types") is None and stray(tmp_path) == []
    before, after = kv_shares(plan)[512], kv_shares(proj)[512]
    assert before < after  # layer 1's streaming head became full
    assert f"original {before:.4f}, projected {after:.4f}" in r.stdout

    r = invoke("export", tmp_path / "plan.yaml", "--format", "nope", "--out", out)
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "unknown export format" in r.stderr


def test_cli_from_duo(tmp_path):
    (tmp_path / "duo").mkdir()
    (tmp_path / "duo" / "full_attention_heads.tsv").write_text("1\t0\n0\t0.7\n")  # random:llama: 2 layers, 2 KV heads
    (tmp_path / "duo" / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 16}))
    r = invoke("export", "--from-duo", tmp_path / "duo", "--model", "random:llama", "--out", tmp_path / "p.yaml")
    assert r.exit_code == 0, r.output
    p = load_plan(tmp_path / "p.yaml")
    assert [[e.pattern.kind for e in layer] for layer in p.layers] == [["full", "streaming"], ["streaming", "full"]]
    assert "2 full + 2 streaming heads (sink 4, recent 16)" in r.stdout
    r = invoke("export", "--from-duo", tmp_path / "duo", "--out", tmp_path / "q.yaml")
    assert r.exit_code == 2 and "--model" in r.stderr and not (tmp_path / "q.yaml").exists()
    with pytest.raises(NotExpressible):
        render(rows_plan(ident(), [[FULL, skip()]] + [[FULL, FULL]] * 3), "duo-tsv")


def test_cli_projects_and_measures_both_plans(tmp_path):
    """--project --eval-model: the projected plan's measured quality printed beside the original's."""
    from helpers import plan_for, tiny

    lm = tiny("llama")
    plan = plan_for(lm, lambda li, h: full() if h == 0 else stream(4, 24))
    save_plan(plan, tmp_path / "plan.yaml")
    out = tmp_path / "served"
    r = invoke("export", tmp_path / "plan.yaml", "--format", "duo-tsv", "--out", tmp_path / "x", "--eval-model",
               "random:llama")
    assert r.exit_code == 2 and "--project" in r.stderr and not (tmp_path / "x").exists()
    r = invoke("export", tmp_path / "plan.yaml", "--format", "trtllm", "--out", out, "--project",
               "--eval-model", "random:llama", "--eval-data", "eval-small")
    assert r.exit_code == 0, r.output
    ppl = [line for line in r.stdout.splitlines() if line.startswith("perplexity @ 512")]
    assert len(ppl) == 1 and "dense" in ppl[0] and "original" in ppl[0] and "projected" in ppl[0]
    assert any(line.startswith("passkey @ 512") for line in r.stdout.splitlines())
