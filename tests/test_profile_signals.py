"""Profiling signals (gradient, mse, recall), resumable runs, the profile file, --plot (issue 6)."""
import json
import math

import pytest
import torch

from headplan.candidates import candidate_set
from headplan.data import Haystack, answer_options, load_task_file, mixture_samples, pydoc_text
from headplan.errors import HeadplanError, ProfileError
from headplan.kernels import patterns as P
from headplan.profile import load_profile, parse_method, profile, save_profile
from headplan.profile.stats import EPS_1MA, Stats
from helpers import tiny

LM_ONLY = {"name": "lm", "seed": 0, "lm_tail": 0.25, "tasks": [{"task": "lm", "share": 1.0}]}
ANSWERED = {"name": "qa", "seed": 3, "answers": "model", "answer_tokens": 6,
            "tasks": [{"task": "lm", "share": 1.0}, {"task": "passkey", "share": 1.0, "keys": 2},
                      {"task": "needle", "share": 1.0}]}


def _vis(c, i, j, q, k, scale, block):
    p = c.pattern
    if p.kind == "blocksparse":
        return P.dynamic_visible(i, j, P.BLOCKSPARSE, P.build_block_index(q, k, p.topk, block), block)
    if p.kind == "vslash":
        return P.dynamic_visible(i, j, P.VSLASH, P.build_vslash_index(q, k, p.vertical, p.slash, scale), block)
    return P.static_visible(i, j, P.make_table([p.row()]), block)[0]


def _influence(a, da):
    """MoA attention influence from explicit A and dL/dA (brute force, whole matrices)."""
    r = (a * da).sum(-1, keepdim=True)
    return -a * (da - r) / (1 - a).clamp(min=EPS_1MA)


# ------------------------------------------------------------------------------------------------
# block-wise statistics against whole-matrix references
# ------------------------------------------------------------------------------------------------

def test_blockwise_stats_equal_dense_references():
    """gradient and mse from Stats (row blocks, cumsums, block sums) == explicit masked matrices."""
    torch.manual_seed(1)
    cands = candidate_set("small")
    G, N, D, block, scale = 2, 300, 16, 16, 0.35
    q, k, v = torch.randn(G, N, D), torch.randn(1, N, D), torch.randn(1, N, D)
    dout = torch.randn(G, N, D)
    st = Stats(cands, 1, 1, block, ("gradient", "mse", "recall"))
    st.layer(0, q, k, v, scale, dout)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    a = torch.softmax((q @ k[0].T * scale).masked_fill(j > i, -math.inf), -1).double()
    da = (dout @ v[0].T).double()
    e = _influence(a, da)
    o = a @ v[0].double()
    for ci, c in enumerate(cands):
        if c.pattern.kind == "select":
            continue  # judged on its rows after the selection: its own brute-force test (test_profile_search)
        vis = _vis(c, i, j, q, k[0], scale, block)
        grad = float((e * ~vis).sum())
        am = a * vis
        oc = (am @ v[0].double()) / am.sum(-1, keepdim=True).clamp(min=1e-300)
        mse = float(((oc - o) ** 2).sum() / (o ** 2).sum()) if c.pattern.kind != "skip" else 1.0
        got_g, got_m = float(st.acc["gradient"][0, 0, ci]), float(st.acc["mse"][0, 0, ci])
        assert got_g == pytest.approx(grad, rel=2e-4, abs=1e-5), c.name
        assert got_m == pytest.approx(mse, rel=2e-4, abs=1e-6), c.name
        if c.pattern.kind != "full":
            assert abs(grad) > 1e-3 and mse > 1e-3, c.name  # non-trivial inputs: the test can fail
    for s in ("gradient", "mse", "recall"):
        assert float(st.acc[s][0, 0, 0]) == 0.0  # full costs nothing, exactly


class _Eager:
    """An eager attention that keeps every layer's explicit probabilities A (with grad) and can drop
    single entries: the brute-force reference."""

    def __init__(self):
        self.probs = {}
        self.drop = None  # (layer, query head, i, j)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        G = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(G, 1)
        v = value.repeat_interleave(G, 1)
        N = query.shape[2]
        s = query @ k.transpose(-1, -2) * scaling
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, -math.inf)
        if self.drop is not None and self.drop[0] == module.layer_idx:
            _, h, i, j = self.drop
            s = s.clone()
            s[0, h, i, j] = -math.inf
        a = torch.softmax(s, -1)
        if a.requires_grad:
            a.retain_grad()
        self.probs[module.layer_idx] = a
        return (a @ v).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def eager_ref():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from headplan.models import load_model

    lm = load_model("random:llama")  # same seeded weights as tiny("llama"), in float64: exact references
    lm.model.double()
    eager = _Eager()
    AttentionInterface.register("headplan_test_eager", eager)
    AttentionMaskInterface.register("headplan_test_eager", sdpa_mask)
    hay = Haystack(lm.tokenizer, pydoc_text())
    n = 320
    smp = mixture_samples(hay, LM_ONLY, n, 1)[0]
    ids = torch.tensor([smp.input_ids])
    tail = max(1, int(round(n * LM_ONLY["lm_tail"])))
    start = n - tail

    def loss_of(drop=None, grad=False):
        eager.drop = drop
        prev = lm.model.config._attn_implementation
        lm.model.set_attn_implementation("headplan_test_eager")
        try:
            with torch.set_grad_enabled(grad):
                h = lm.model.model(ids).last_hidden_state
                logits = lm.model.lm_head(h[0, start - 1:n - 1])
                loss = torch.nn.functional.cross_entropy(logits, ids[0, start:])
                if grad:
                    loss.backward()
            return loss
        finally:
            lm.model.set_attn_implementation(prev)
            eager.drop = None

    loss_of(grad=True)
    dA = {li: a.grad.detach()[0].double() for li, a in eager.probs.items()}
    A = {li: a.detach()[0].double() for li, a in eager.probs.items()}
    lm.model.zero_grad(set_to_none=True)
    return lm, A, dA, loss_of


def test_gradient_profile_equals_autograd_reference(eager_ref):
    """The profiler's block-wise influence (q, k, v, dL/dO inside the backward of SDPA) summed over
    each candidate's dropped entries == the same sum from autograd's dL/dA of an eager model."""
    lm, A, dA, _ = eager_ref
    cands = candidate_set("small")
    block = 16
    prof = profile(lm, [320], cands, LM_ONLY, samples=1, block=block, method="gradient")
    got = prof.parts["gradient"][..., 0].double()
    ident = lm.identity
    G = ident.num_query_heads // ident.num_kv_heads
    N = 320
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    checked = 0
    for li in range(ident.num_layers):
        e = _influence(A[li], dA[li])  # (Hq, N, N)
        for h in range(ident.num_kv_heads):
            for ci, c in enumerate(cands):
                if c.pattern.kind in ("blocksparse", "vslash", "select"):
                    continue  # dynamic selections need q, k: covered by the block-wise test above
                vis = _vis(c, i, j, None, None, None, block)
                want = float((e[h * G:(h + 1) * G] * ~vis).sum())
                assert float(got[li, h, ci]) == pytest.approx(want, rel=1e-3, abs=1e-7), (li, h, c.name)
                checked += abs(want) > 1e-5
    assert checked > 10
    assert float(prof.loss[..., 0, :].abs().max()) == 0.0  # full


def test_influence_predicts_dropping_an_entry(eager_ref):
    """First order: E_ij predicts the loss change from actually masking entry (i, j) and re-running."""
    lm, A, dA, loss_of = eager_ref
    base = float(loss_of())
    li, h = 1, 1
    e = _influence(A[li][h], dA[li][h])
    a = A[li][h]
    # entries that are small enough for first order, with the largest predicted effects
    ok = (a > 1e-3) & (a < 0.08)
    score = torch.where(ok, e.abs(), torch.zeros_like(e))
    picks = torch.topk(score.flatten(), 6).indices
    pred, act = [], []
    for f in picks.tolist():
        i, j = divmod(f, a.shape[-1])
        pred.append(float(e[i, j]))
        act.append(float(loss_of((li, h, i, j))) - base)
    pred, act = torch.tensor(pred), torch.tensor(act)
    assert float(pred.abs().min()) > 1e-6  # real effects, not zeros
    # and the per-entry formula is not the bare derivative: without 1/(1 - A) the match is worse
    bare = torch.tensor([float(-(a * (dA[li][h] - (a * dA[li][h]).sum(-1, keepdim=True)))[divmod(f, a.shape[-1])])
                         for f in picks.tolist()])
    assert (act - pred).abs().sum() < (act - bare).abs().sum()
    assert torch.allclose(act, pred, rtol=0.05, atol=0.02 * float(pred.abs().max())), (pred, act)
    assert (torch.sign(act) == torch.sign(pred)).all()
    print("influence vs re-run:", pred.tolist(), act.tolist())


# ------------------------------------------------------------------------------------------------
# data, methods, resume, file
# ------------------------------------------------------------------------------------------------

def test_parse_method():
    assert parse_method("gradient") == {"gradient": 1.0}
    assert parse_method("gradient,recall") == {"gradient": 0.5, "recall": 0.5}
    assert parse_method("mse=0.2,gradient=0.8") == {"mse": 0.2, "gradient": 0.8}
    for bad in ("attention", "gradient,gradient", "gradient=-1", "gradient=x", ""):
        with pytest.raises(HeadplanError):
            parse_method(bad)


def test_needle_and_answered_samples_record_how_they_were_made():
    lm = tiny("llama")
    hay = Haystack(lm.tokenizer, pydoc_text())
    src, reserve, tail = answer_options(ANSWERED)
    assert (src, reserve) == ("model", 6)
    a = mixture_samples(hay, ANSWERED, 900, 3, reserve=reserve)
    b = mixture_samples(hay, ANSWERED, 900, 3, reserve=reserve)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    tasks = {s.task: s for s in a}
    assert set(tasks) == {"lm", "passkey", "needle"}
    nd = tasks["needle"]
    assert len(nd.input_ids) == 900 - reserve and nd.answer in lm.tokenizer.decode(nd.input_ids)
    assert len(tasks["lm"].input_ids) == 900
    for s in a:
        assert s.meta["rng"].startswith("3:900:") and s.meta["length"] == 900 and "options" in s.meta
    with pytest.raises(HeadplanError, match="answers must be"):
        answer_options({"answers": "human"})


@pytest.fixture(scope="module")
def full_run():
    lm = tiny("llama")
    return profile(lm, [512, 640], candidate_set("small"), ANSWERED, samples=3, block=16, method="gradient,mse")


class _Killer:
    """A reporter that stops the run after `after` finished samples (like a kill)."""

    def __init__(self, after):
        self.after = after

    def log(self, msg):
        pass

    def task(self, description, total):
        import contextlib

        killer = self

        @contextlib.contextmanager
        def cm():
            def advance(n=1):
                if description.startswith("profiling"):
                    killer.after -= n
                    if killer.after <= 0:
                        raise KeyboardInterrupt
            yield advance
        return cm()


def test_resume_gives_the_same_profile(full_run, tmp_path):
    lm = tiny("llama")
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        profile(lm, [512, 640], candidate_set("small"), ANSWERED, samples=3, block=16, method="gradient,mse",
                resume=state, reporter=_Killer(4))
    assert len(list(state.glob("n*-s*.safetensors"))) == 4
    resumed = profile(lm, [512, 640], candidate_set("small"), ANSWERED, samples=3, block=16, method="gradient,mse",
                      resume=state)
    assert torch.equal(resumed.loss, full_run.loss)
    for s in ("gradient", "mse"):
        assert torch.equal(resumed.parts[s], full_run.parts[s])
    assert resumed.header() == full_run.header()
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_profile(resumed, p1)
    save_profile(full_run, p2)
    a, b = load_profile(p1), load_profile(p2)
    assert torch.equal(a.loss, b.loss) and a.header() == b.header()
    # the statistics on disk are safetensors, and another run's settings are refused
    assert all(f.read_bytes()[:1] != b"\x80" for f in state.glob("*.safetensors"))
    with pytest.raises(HeadplanError, match="another run"):
        profile(lm, [512, 640], candidate_set("small"), ANSWERED, samples=2, block=16, method="gradient,mse",
                resume=state)


def test_combined_profile_header_file_and_tampering(full_run, tmp_path):
    prof = full_run
    assert prof.method == "gradient+mse"
    assert set(prof.signals) == {"gradient", "mse"} and prof.signals["mse"]["weight"] == 0.5
    samples = prof.data["samples"]
    assert len(samples) == 6 and {m["task"] for m in samples} == {"lm", "passkey", "needle"}
    assert any(m.get("answer_source") == "model" for m in samples)
    # full costs nothing under every signal; the weighted sum follows the documented formula
    assert float(prof.loss[:, :, 0].abs().max()) == 0.0
    for t in prof.parts.values():
        assert float(t[:, :, 0].abs().max()) == 0.0
    want = sum(v["weight"] * prof.parts[s].double().clamp(min=0) / v["scale"] for s, v in prof.signals.items())
    assert torch.allclose(prof.loss.double(), want, rtol=1e-5, atol=1e-7)
    assert float(prof.parts["mse"][:, :, 1:].min()) > 0  # non-trivial
    path = tmp_path / "p.safetensors"
    save_profile(prof, path)
    raw = path.read_bytes()
    assert b"pickle" not in raw and raw[:2] != b"\x80\x04"
    back = load_profile(path)
    assert back.method == "gradient+mse" and back.signals == prof.signals
    assert torch.equal(back.parts["gradient"], prof.parts["gradient"].float())
    w = json.dumps(prof.signals["gradient"]["weight"]).encode()
    bad = raw.replace(b'\\"weight\\": ' + w, b'\\"weight\\": 0.9', 1)
    assert bad != raw
    (tmp_path / "bad.safetensors").write_bytes(bad)
    with pytest.raises(ProfileError, match="modified"):
        load_profile(tmp_path / "bad.safetensors")


def test_recall_profile_is_unchanged_by_the_new_signals(tmp_path):
    """A recall-only profile has no signal tensors and the same values from the shared code path."""
    lm = tiny("llama")
    prof = profile(lm, [256], candidate_set("small"), LM_ONLY, samples=1, block=16)
    assert prof.method == "recall" and prof.parts == {} and "signals" not in prof.header()
    both = profile(lm, [256], candidate_set("small"), LM_ONLY, samples=1, block=16, method="recall=1,mse=1")
    assert torch.allclose(both.parts["recall"], prof.loss, atol=1e-6)


def test_cli_profile_gradient_plot_and_bad_method(tmp_path):
    from typer.testing import CliRunner

    from headplan.cli import app

    r = CliRunner().invoke(app, ["profile", "random:qwen2", "--method", "gradient,recall", "--lengths", "512",
                                 "--samples", "2", "--candidates", "small", "--out", str(tmp_path / "p.safetensors"),
                                 "--plot", "--resume", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    png = tmp_path / "p.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "retrieval-like" in r.stdout and "gradient+recall" in r.stdout
    prof = load_profile(tmp_path / "p.safetensors")
    assert prof.data["spec"]["name"] == "gradient"  # the gradient mixture is the default data
    r = CliRunner().invoke(app, ["profile", "random:llama", "--method", "attention", "--out",
                                 str(tmp_path / "q.safetensors")])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["headplan: error: unknown profiling method 'attention' "
                                             "(known: gradient, mse, recall, gates)"]


def test_torchrun_two_ranks_give_the_same_profile(tmp_path):
    """Data parallel over samples (torchrun, gloo on CPU): the same statistics as one process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "-m", "headplan.cli", "profile", "random:llama",
                        "--method", "gradient,recall", "--lengths", "512", "--samples", "3", "--candidates", "small",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = load_profile(out)
    one = profile(tiny("llama"), [512], candidate_set("small"), load_task_file("gradient", ""), samples=3,
                  method="gradient,recall")
    assert torch.equal(ddp.loss, one.loss)
    assert all(torch.equal(ddp.parts[s], one.parts[s]) for s in one.parts)
    assert ddp.header()["data"] == one.header()["data"]


def test_search_reweights_stored_signals_and_excludes_kinds(full_run, tmp_path):
    """--signals re-combines the stored parts (the profiled weights give back the stored loss and the
    same plan); one signal alone is that signal; --exclude-kinds is honoured; check reproduces it."""
    from typer.testing import CliRunner

    from headplan.api import do_search
    from headplan.cli import app
    from headplan.search import SearchSettings, profile_loss, search

    prof = full_run
    same = profile_loss(prof, tuple((k, v["weight"]) for k, v in prof.signals.items()))
    assert torch.allclose(same, prof.loss.double(), rtol=1e-5, atol=1e-8)
    assert torch.equal(profile_loss(prof, (("mse", 1.0),)), prof.parts["mse"].double().clamp(min=0))
    a = search(prof, SearchSettings(density=0.6))
    b = search(prof, SearchSettings(density=0.6, signals=tuple((k, v["weight"]) for k, v in prof.signals.items())))
    assert [e.pattern for layer in a.layers for e in layer] == [e.pattern for layer in b.layers for e in layer]
    c = search(prof, SearchSettings(density=0.6, signals=(("gradient", 1.0),)))
    assert c.provenance["search"]["signals"] == {"gradient": 1.0}
    path = tmp_path / "p.safetensors"
    save_profile(prof, path)
    plan = do_search(path, tmp_path / "mse.yaml", density=0.6, signals="mse", exclude_kinds="vslash,blocksparse")
    kinds = {e.pattern.kind for layer in plan.layers for e in layer}
    assert not kinds & {"vslash", "blocksparse"}
    r = CliRunner().invoke(app, ["check", str(tmp_path / "mse.yaml")])
    assert r.exit_code == 0, r.output
    for bad, msg in ((dict(signals="recall"), "no stored signal 'recall'"), (dict(signals="foo"), "--signals"),
                     (dict(exclude_kinds="windowed"), "unknown pattern kind")):
        with pytest.raises(HeadplanError, match=msg):
            do_search(path, tmp_path / "x.yaml", density=0.6, **bad)
        assert not (tmp_path / "x.yaml").exists()


def test_search_keep_is_an_epsilon_constraint(full_run, tmp_path):
    """--keep mse=1 gives a plan whose mse loss equals the mse-only optimum; a loose slack changes
    nothing; the constrained plan is never better on the main objective than the unconstrained one."""
    import numpy as np

    from headplan.api import do_search
    from headplan.search import SearchSettings, profile_loss
    from headplan.search.solve import _solve

    prof = full_run
    H = prof.model.num_layers * prof.model.num_kv_heads
    C = len(prof.candidates)
    part = profile_loss(prof, (("mse", 1.0),)).numpy().reshape(H, C, -1).mean(axis=2)
    main = profile_loss(prof, (("gradient", 1.0),)).numpy().reshape(H, C, -1).mean(axis=2)
    at = lambda tab, ch: float(tab[np.arange(H), ch].sum())  # noqa: E731
    base = SearchSettings(density=0.6, signals=(("gradient", 1.0),))
    free, *_ = _solve(prof, base)
    best_mse, *_ = _solve(prof, SearchSettings(density=0.6, signals=(("mse", 1.0),)))
    tight, *_ = _solve(prof, SearchSettings(density=0.6, signals=(("gradient", 1.0),), keep=(("mse", 1.0),)))
    loose, *_ = _solve(prof, SearchSettings(density=0.6, signals=(("gradient", 1.0),), keep=(("mse", 1e6),)))
    assert at(part, tight) <= at(part, best_mse) * (1 + 1e-6) + 1e-12
    assert at(main, tight) >= at(main, free) - 1e-9
    assert list(loose) == list(free)
    if at(part, free) > at(part, best_mse) * 1.001:  # the constraint binds: the plans must differ
        assert list(tight) != list(free)
    path = tmp_path / "p.safetensors"
    save_profile(prof, path)
    plan = do_search(path, tmp_path / "k.yaml", density=0.6, signals="gradient", keep="mse=1.05")
    assert plan.provenance["search"]["keep"] == {"mse": 1.05}
    for bad, msg in (("mse=0.5", "must be >= 1"), ("mse", "SIGNAL=SLACK"), ("recall=1.2", "no stored signal")):
        with pytest.raises(HeadplanError, match=msg):
            do_search(path, tmp_path / "x.yaml", density=0.6, keep=bad)
        assert not (tmp_path / "x.yaml").exists()


def test_gradient_split_by_task(full_run):
    """gradient.lm / gradient.answer average the same per-sample statistics over lm / answered samples:
    their sample-count-weighted mean is the gradient signal, and they differ (they are not copies)."""
    prof = full_run
    samples = prof.data["samples"]
    assert {"gradient.lm", "gradient.answer"} <= set(prof.parts) and set(prof.signals) == {"gradient", "mse"}
    for li, n in enumerate(prof.lengths):
        tasks = [m["task"] for m in samples if m["length"] == n]
        k = sum(t == "lm" for t in tasks)
        assert 0 < k < len(tasks)
        mix = (k * prof.parts["gradient.lm"][..., li].double()
               + (len(tasks) - k) * prof.parts["gradient.answer"][..., li].double()) / len(tasks)
        assert torch.allclose(mix, prof.parts["gradient"][..., li].double(), rtol=1e-5, atol=1e-8)
        assert not torch.allclose(prof.parts["gradient.lm"][..., li], prof.parts["gradient.answer"][..., li])


def test_signals_accept_the_gradient_split(full_run):
    from headplan.profile.signals import signal_weights as _signal_weights
    from headplan.search import SearchSettings, profile_loss, search

    assert _signal_weights("gradient.answer=1", "--signals") == (("gradient.answer", 1.0),)
    with pytest.raises(HeadplanError, match="--signals.*gradient.other"):
        _signal_weights("gradient.other=1", "--signals")
    got = profile_loss(full_run, (("gradient.lm", 1.0),))
    assert torch.equal(got, full_run.parts["gradient.lm"].double().clamp(min=0))
    plan = search(full_run, SearchSettings(density=0.6, signals=(("gradient.answer", 1.0),),
                                           keep=(("gradient.lm", 1.2),)))
    assert plan.provenance["search"]["keep"] == {"gradient.lm": 1.2}
