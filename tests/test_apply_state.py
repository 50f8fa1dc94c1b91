"""apply/unapply/applied: one PlanState on the model, and a model restored exactly after unapply."""
import pytest
import torch

import headplan.runtime as RT
from headplan.models import load_model
from cases import stream
from helpers import ids, mixed_plan, plan_for


def fresh(family="llama"):
    return load_model(f"random:{family}")  # not helpers.tiny: that one is shared between tests


def headplan_attrs(model):
    return [(name, a) for name, m in model.named_modules() for a in vars(m) if a.startswith("_headplan")]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_unapply_restores_dense_behaviour_exactly(family):
    lm = fresh(family)
    m = lm.model
    x = ids(40, 2, seed=4)
    before, attn = logits(m, x), m.config._attn_implementation
    RT.apply(m, mixed_plan(lm, with_skip=True), prefill_chunk=16)
    st = RT.state_of(m)
    assert isinstance(st, RT.PlanState) and st.prefill_chunk == 16
    assert [a for _, a in headplan_attrs(m)].count("_headplan") == 1 + len(st.modules)
    assert not torch.equal(logits(m, x), before)  # the plan really runs
    RT.unapply(m)
    assert m.config._attn_implementation == attn
    assert "generate" not in vars(m) and m.generate.__func__ is type(m).generate
    assert headplan_attrs(m) == [] and RT.state_of(m) is None
    assert torch.equal(logits(m, x), before)
    assert torch.equal(logits(fresh(family).model, x), before)  # same as a never-patched model
    with torch.no_grad():
        out = m.generate(x[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 45)
    assert RT.unapply(m) is m  # nothing applied: a no-op


def test_applied_context_manager():
    lm = fresh()
    m = lm.model
    x = ids(30, 1, seed=5)
    before = logits(m, x)
    plan = mixed_plan(lm)
    RT.apply(m, plan)
    want = logits(m, x)
    RT.unapply(m)
    with RT.applied(m, plan) as got:
        assert got is m and RT.state_of(m).plan is plan
        assert torch.equal(logits(m, x), want)
    assert RT.state_of(m) is None and headplan_attrs(m) == [] and "generate" not in vars(m)
    assert torch.equal(logits(m, x), before)
    with pytest.raises(ValueError):
        with RT.applied(m, plan):
            raise ValueError("inside")
    assert RT.state_of(m) is None and headplan_attrs(m) == []


def test_applied_inside_an_applied_plan_gives_the_earlier_plan_back():
    lm = fresh()
    m = lm.model
    x = ids(30, 1, seed=6)
    outer = plan_for(lm, lambda li, h: stream(2, 4, 0.25))
    RT.apply(m, outer)
    want = logits(m, x)
    gen = m.generate
    with RT.applied(m, mixed_plan(lm)):
        assert not torch.equal(logits(m, x), want)
    assert RT.state_of(m).plan is outer and m.generate is gen
    assert torch.equal(logits(m, x), want)
    RT.unapply(m)
    assert headplan_attrs(m) == []


def test_reapply_twice_then_unapply():
    lm = fresh()
    m = lm.model
    x = ids(50, 1, seed=7)
    before, attn = logits(m, x), m.config._attn_implementation
    RT.apply(m, mixed_plan(lm, with_skip=True))
    gen = m.generate
    last = plan_for(lm, lambda li, h: stream(2, 4, 0.25))
    RT.apply(m, mixed_plan(lm))
    RT.apply(m, last, prefill_chunk=8)
    assert m.generate is gen  # generate is wrapped once, whatever the number of applies
    assert RT.state_of(m).plan is last
    assert [a for _, a in headplan_attrs(m)].count("_headplan") == 1 + len(RT.state_of(m).modules)
    lone = fresh()
    RT.apply(lone.model, last)
    assert torch.equal(logits(m, x), logits(lone.model, x))
    RT.unapply(m)
    assert m.config._attn_implementation == attn and "generate" not in vars(m)
    assert headplan_attrs(m) == []
    assert torch.equal(logits(m, x), before)


def test_failed_apply_leaves_the_model_alone():
    lm = fresh()
    m = lm.model
    with pytest.raises(Exception):
        RT.apply(m, mixed_plan(lm), prefill_chunk=0)
    assert RT.state_of(m) is None and headplan_attrs(m) == [] and "generate" not in vars(m)
