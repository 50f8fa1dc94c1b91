"""The static decode step (runtime/graphs.py) on the CPU: the graph path's logic without the graph.

generate() through ``decode="static"`` (static input buffers, no mask, a preallocated cache updated in
place, ``seen`` advanced by the step) must give exactly the tokens of today's path (``decode="eager"``).
"""
import pytest
import torch

from headplan import runtime as RT
from headplan.errors import HeadplanError
from headplan.kernels import patterns as P
from cases import full
from helpers import ids, mixed_plan, plan_for, tiny

NEW = 40


def _batch(n=30, pad=9, seed=1):
    x = ids(n, 2, seed=seed)
    mask = torch.ones_like(x)
    mask[1, :pad] = 0  # left padding
    x[1, :pad] = 0
    return x, mask


def _gen(model, x, mask, mode, new=NEW, **kw):
    RT.state_of(model).decode = mode
    with torch.no_grad():
        return model.generate(x, attention_mask=mask, max_new_tokens=new, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, **kw)


def _the_step(model) -> RT.DecodeStep:
    (step,) = RT.state_of(model).decoders.values()
    return step


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # global layers; sliding layers with their own rings
def test_static_step_gives_todays_tokens_greedy(family):
    lm = tiny(family)
    RT.apply(lm.model, mixed_plan(lm, with_skip=True))
    x, mask = _batch()
    eager = _gen(lm.model, x, mask, "eager", do_sample=False)
    assert RT.state_of(lm.model).last_decode == ("eager", "decode='eager'")
    static = _gen(lm.model, x, mask, "static", do_sample=False)
    assert RT.state_of(lm.model).last_decode == ("static", None)
    step = _the_step(lm.model)
    assert step.eager_steps == NEW - 1 and step.replays == 0  # every decode step went through the static step
    assert torch.equal(static.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(eager.logits), rtol=0, atol=1e-5)
    # streaming heads wrapped their rings: a region smaller than the sequence holds its latest positions
    wrapped = 0
    for layer in step.cache.layers:
        for h, kind in enumerate(layer.table[:, P.C_KIND].tolist()):
            if kind == P.STREAMING and layer.ring[h]:
                assert layer.cap[h] < x.shape[1] + NEW
                wrapped += int(layer.head_view(h)[2].max()) >= layer.cap[h]
        assert layer.seen == x.shape[1] + NEW - 1  # host counters advanced once per step
    assert wrapped > 0


def test_static_step_gives_todays_tokens_sampling():
    lm = tiny("llama")
    RT.apply(lm.model, mixed_plan(lm, with_skip=True))
    x, mask = _batch(seed=3)
    torch.manual_seed(11)
    eager = _gen(lm.model, x, mask, "eager", new=24, do_sample=True, top_k=50, temperature=1.3)
    torch.manual_seed(11)
    static = _gen(lm.model, x, mask, "static", new=24, do_sample=True, top_k=50, temperature=1.3)
    assert _the_step(lm.model).eager_steps == 23
    assert torch.equal(static.sequences, eager.sequences)
    torch.manual_seed(12)  # another seed draws other tokens: the comparison above can fail
    other = _gen(lm.model, x, mask, "static", new=24, do_sample=True, top_k=50, temperature=1.3)
    assert not torch.equal(other.sequences, eager.sequences)


def test_decode_step_is_kept_and_its_cache_emptied_between_calls():
    lm = tiny("qwen2")  # a global layer, then sliding ones
    RT.apply(lm.model, mixed_plan(lm, with_skip=True), decode="static")
    x, mask = _batch(seed=5)
    _gen(lm.model, x, mask, "static", new=12, do_sample=False)
    step = _the_step(lm.model)
    bufs = [(layer.k_buf.data_ptr(), layer.n_logical.data_ptr()) for layer in step.cache.layers]
    y, mask2 = _batch(n=28, pad=4, seed=6)  # shorter request, same batch: the same step and buffers
    again = _gen(lm.model, y, mask2, "static", new=12, do_sample=False)
    assert _the_step(lm.model) is step and step.eager_steps == 22
    assert [(layer.k_buf.data_ptr(), layer.n_logical.data_ptr()) for layer in step.cache.layers] == bufs
    eager = _gen(lm.model, y, mask2, "eager", new=12, do_sample=False)
    assert torch.equal(again.sequences, eager.sequences)
    RT.release_decode(lm.model)
    assert RT.state_of(lm.model).decoders == {}


def test_requests_the_step_cannot_run_fall_back_and_bad_modes_are_refused():
    lm = tiny("llama")
    RT.apply(lm.model, plan_for(lm, lambda li, h: full()), decode="static")
    x, mask = _batch(n=12, pad=3)
    beams = _gen(lm.model, x, mask, "static", new=3, num_beams=2, do_sample=False)
    assert RT.state_of(lm.model).last_decode == ("eager", "beam search")
    assert beams.sequences.shape == (2, 15)
    _gen(lm.model, x, mask, "static", new=3, do_sample=False, output_hidden_states=True)
    assert RT.state_of(lm.model).last_decode == ("eager", "attentions or hidden states requested")
    with pytest.raises(HeadplanError, match="decode='graph' needs a model on CUDA"):
        _gen(lm.model, x, mask, "graph", new=3)
    with pytest.raises(HeadplanError, match="decode must be one of"):
        RT.apply(lm.model, plan_for(lm, lambda li, h: full()), decode="fast")
    # the default on the CPU is today's path
    RT.apply(lm.model, plan_for(lm, lambda li, h: full()))
    with torch.no_grad():
        lm.model.generate(x, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    assert RT.state_of(lm.model).last_decode == ("eager", "decode='eager'")


def test_static_step_after_chunked_prefill_gives_todays_tokens():
    """With prefill_chunk the prompt enters the kept cache in chunks before generate() runs; its last prompt
    token is then the static step's first (eager) step."""
    lm = tiny("mistral")  # MQA, one sliding window for every layer
    RT.apply(lm.model, mixed_plan(lm, with_skip=True), prefill_chunk=11)
    x, mask = _batch(n=40, pad=6, seed=8)
    eager = _gen(lm.model, x, mask, "eager", new=10, do_sample=False)
    static = _gen(lm.model, x, mask, "static", new=10, do_sample=False)
    assert _the_step(lm.model).eager_steps == 10  # the prompt's last token, then 9 decode steps
    assert torch.equal(static.sequences, eager.sequences)
