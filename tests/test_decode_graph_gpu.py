"""The CUDA-graph decode step (runtime/graphs.py) on a GPU: graph replay equals the eager path for every
pattern kind, greedy and sampling, in global and sliding-window layers. Skipped without CUDA."""
import json

import pytest
import torch

from cases import MIXED, ONE_OF_EACH
from headplan import runtime as RT
from headplan.models import load_model
from helpers import ids, plan_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NEW = 40
SHAPES = {  # head_dim 64: the Triton decode kernels run (the graph path needs them)
    "llama": {"model_type": "llama", "rope_theta": 10000.0},
    "mistral": {"model_type": "mistral", "sliding_window": 128},
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def lm(request, tmp_path_factory):
    cfg = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1000, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, **SHAPES[request.param]}
    p = tmp_path_factory.mktemp("cfg") / "config.json"
    p.write_text(json.dumps(cfg))
    return load_model(f"random:{p}", dtype="bfloat16", device="cuda")


def _batch():
    x = ids(300, 3, seed=1, vocab=1000).cuda()
    mask = torch.ones_like(x)
    mask[1, :57] = 0
    mask[2, :200] = 0
    x[mask == 0] = 0
    return x, mask


def _gen(model, mode, **kw):
    x, mask = _batch()
    RT.state_of(model).decode = mode
    with torch.no_grad():
        return model.generate(x, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, **kw)


# every kind (cases.STRIDED's beta is off the plan format's grid: the plan's own strided row instead)
PLANS = {**{k: [v] for k, v in ONE_OF_EACH.items()}, "strided": [MIXED[2]], "mixed": MIXED}


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_graph_replay_equals_eager(lm, kind):
    pool = PLANS[kind]
    RT.apply(lm.model, plan_for(lm, lambda li, h: pool[(li + h) % len(pool)]))
    eager = _gen(lm.model, "eager", do_sample=False)
    graph = _gen(lm.model, "graph", do_sample=False)
    assert RT.state_of(lm.model).last_decode == ("graph", None)
    (step,) = RT.state_of(lm.model).decoders.values()
    assert step.failed is None and step.captures == 1 and step.replays == NEW - 2  # one warm-up step, then replays
    assert torch.equal(graph.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(graph.logits), torch.stack(eager.logits), rtol=0, atol=2e-2)
    # a second request of the batch size replays the same graph over the emptied cache
    again = _gen(lm.model, "graph", do_sample=False)
    assert step.captures == 1 and step.replays == 2 * NEW - 3
    assert torch.equal(again.sequences, eager.sequences)


def test_graph_replay_equals_eager_sampling(lm):
    RT.apply(lm.model, plan_for(lm, lambda li, h: MIXED[(li + h) % len(MIXED)]))
    torch.manual_seed(3)
    eager = _gen(lm.model, "eager", do_sample=True, top_p=0.9, temperature=1.5)
    torch.manual_seed(3)
    graph = _gen(lm.model, "graph", do_sample=True, top_p=0.9, temperature=1.5)
    (step,) = RT.state_of(lm.model).decoders.values()
    assert step.replays == NEW - 2
    assert torch.equal(graph.sequences, eager.sequences)


def test_graph_is_the_default_on_cuda_and_fp32_falls_back(lm):
    RT.apply(lm.model, plan_for(lm, lambda li, h: MIXED[(li + h) % len(MIXED)]))
    x, mask = _batch()
    with torch.no_grad():
        lm.model.generate(x, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert RT.state_of(lm.model).last_decode == ("graph", None)
    lm.model.float()
    try:
        with torch.no_grad():
            lm.model.generate(x, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
        mode, why = RT.state_of(lm.model).last_decode
        assert mode == "eager" and "not Triton" in why
    finally:
        lm.model.to(torch.bfloat16)
