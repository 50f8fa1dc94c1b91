import subprocess
import sys

import pytest
import yaml

from headplan.errors import PlanError
from headplan.plan import load_plan, plan_from_dict, save_plan
from helpers import mixed_plan, tiny


@pytest.fixture(scope="module")
def plan():
    return mixed_plan(tiny("llama"), with_skip=True)


def test_round_trip(plan, tmp_path):
    p = tmp_path / "plan.yaml"
    save_plan(plan, p)
    again = load_plan(p)
    assert again == plan
    assert again.to_yaml() == plan.to_yaml()
    assert "window: {alpha: 8, beta: 0.125}" in p.read_text()


def test_plan_module_imports_no_torch():
    code = "import sys; import headplan.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _mut(plan, fn):
    d = yaml.safe_load(plan.to_yaml())
    fn(d)
    return d


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("schema_version"), "schema_version: missing"),
    (lambda d: d.__setitem__("schema_version", 99), "schema_version: unsupported"),
    (lambda d: d["model"].pop("fingerprint"), "model.fingerprint: missing"),
    (lambda d: d["model"].__setitem__("num_layers", "two"), "model.num_layers: expected an integer"),
    (lambda d: d.__setitem__("granularity", "query_head"), "granularity"),
    (lambda d: d.__setitem__("block_size", 48), "block_size: must be a power of two"),
    (lambda d: d["budget"].__setitem__("density", 1.5), "budget.density: must be in"),
    (lambda d: d["layers"].pop(), "layers: has 1 layers"),
    (lambda d: d["layers"][0]["heads"].pop(), "layers[0].heads: expected a list of 2"),
    (lambda d: d["layers"][0]["heads"][0].__setitem__("pattern", "diagonal"), "layers[0].heads[0].pattern: unknown pattern"),
    (lambda d: d["layers"][0]["heads"][0].pop("sink"), "layers[0].heads[0].sink: missing"),
    (lambda d: d["layers"][0]["heads"][0]["window"].__setitem__("alpha", 0), "heads[0].window.alpha: must be >= 1"),
    (lambda d: d["layers"][0]["heads"][0]["window"].__setitem__("beta", 0.1), "window.beta: must be a multiple"),
    (lambda d: d["layers"][0]["heads"][1].__setitem__("topk", 3), "heads[1].topk: not a parameter of pattern 'full'"),
    (lambda d: d["layers"][0]["heads"][0].__setitem__("kv", "all"), "heads[0].kv: 'all' does not match"),
    (lambda d: d["layers"][1]["heads"][0].__setitem__("offset", 5), "heads[0].offset: must be < stride"),
    (lambda d: d["layers"][0]["heads"][1].__setitem__("kv_head", 0), "heads[1].kv_head: expected 1"),
])
def test_validation_names_the_field(plan, mutate, field):
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        plan_from_dict(_mut(plan, mutate))


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("schema_version: 1\nmodel: [unclosed\n")
    with pytest.raises(PlanError, match="malformed YAML"):
        load_plan(p)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "nope.yaml")


def test_a_select_heads_share_is_validated_and_round_trips(plan):
    d = _mut(plan, lambda d: None)
    d["layers"][0]["heads"][0] = {"kv_head": 0, "pattern": "select", "sink": 4, "window": {"alpha": 8, "beta": 0.0},
                                  "keep": {"alpha": 0, "beta": 0.125}, "share": "layer"}
    p = plan_from_dict(d)
    assert p.layers[0][0].pattern.share == "layer"
    assert plan_from_dict(yaml.safe_load(p.to_yaml())) == p
    d["layers"][0]["heads"][0]["share"] = "model"
    with pytest.raises(PlanError, match=r"layers\[0\]\.heads\[0\]\.share: must be one of layer, heads"):
        plan_from_dict(d)
    d["layers"][0]["heads"][1]["share"] = "layer"  # a full head has no keep budget to share
    del d["layers"][0]["heads"][0]["share"]
    with pytest.raises(PlanError, match=r"heads\[1\]\.share: not a parameter of pattern 'full'"):
        plan_from_dict(d)
