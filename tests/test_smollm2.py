"""Integration on the embedded default model, SmolLM2-135M-Instruct (about a minute on 2 CPU cores)."""
import pytest
import torch

import headplan
from cases import full
from headplan.candidates import candidate_set
from headplan.data import load_task_file
from headplan.profile import profile
from headplan.search import SearchSettings, search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    try:
        return headplan.load_model("smollm2-135m")
    except headplan.errors.HeadplanError as e:  # pragma: no cover - the README command installs it
        pytest.skip(str(e))


def test_identity(smol):
    ident = smol.identity
    assert (ident.num_layers, ident.num_query_heads, ident.num_kv_heads, ident.head_dim) == (30, 9, 3, 64)


def test_profile_search_apply_generate(smol):
    prof = profile(smol, [512], candidate_set("default"), load_task_file(None, "profile"), samples=2)
    loss = prof.loss[..., 0]
    names = [c.name for c in prof.candidates]
    # heads differ: some lose little under a short window, some lose a lot
    short = loss[:, :, names.index("sink64+win64")]
    assert float(short.max()) > 2 * float(short.min())
    plan = search(prof, SearchSettings(density=0.5))
    assert plan.budget.achieved_density[0] <= 0.5 + 1e-9
    model, tok = smol.model, smol.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    headplan.apply(model, plan)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        with headplan.dense(model):
            dense_logits = model(ids).logits
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    # prompt is shorter than every window: the plan is exactly dense here
    torch.testing.assert_close(ref, dense_logits, rtol=0, atol=1e-4)


def test_all_full_plan_is_dense_on_long_input(smol):
    from headplan.plan import plan_from_rows

    plan = plan_from_rows(smol.identity, [[full()] * 3] * 30)
    headplan.apply(smol.model, plan)
    ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = smol.model(ids).logits
        with headplan.dense(smol.model):
            d = smol.model(ids).logits
    torch.testing.assert_close(p, d, rtol=0, atol=1e-4)
