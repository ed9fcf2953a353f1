"""Single experts in recipes: `model.layers.L.mlp.experts[E]` selects experts whether the file stores them per
expert or fused along axis 0 (`experts.gate_up_proj [E, ...]`)."""
import pytest

from chimera.errors import ChimeraError
from chimera.merge.recipe import expert_of, from_dict, parse_selector


def _recipe(match, **extra):
    return from_dict({"parents": {"a": "/x/a", "b": "/x/b"}, "base": "a", "weights": {"default": {"a": 1.0}},
                      "overrides": [{"match": match, "weights": {"b": 1.0}}], **extra})


def test_selector_syntax_and_matching():
    assert parse_selector("model.layers.3.mlp.experts[5,7-9]", "r") == ("model.layers.3.mlp.experts",
                                                                         frozenset({5, 7, 8, 9}))
    assert parse_selector("*.experts[*]", "r") == ("*.experts", None)
    assert parse_selector("model.layers.3.*", "r") is None
    r = _recipe("model.layers.*.mlp.experts[5]")
    per = "model.layers.3.mlp.experts.5.up_proj.weight"
    assert r.lambdas(per, "routed_experts") == {"b": 1.0}
    assert r.lambdas("model.layers.3.mlp.experts.4.up_proj.weight", "routed_experts") == {"a": 1.0}
    fused = "model.layers.3.mlp.experts.gate_up_proj"
    assert r.lambdas(fused, "routed_experts") == {"a": 1.0}          # the tensor as a whole: class / default
    lams = r.expert_lambdas(fused, "routed_experts", 8)
    assert lams[5] == {"b": 1.0} and all(lams[e] == {"a": 1.0} for e in range(8) if e != 5)
    assert r.expert_lambdas("model.layers.3.mlp.experts.down_proj_bias", "routed_experts", 8)[5] == {"b": 1.0}
    assert r.lambdas("model.layers.3.mlp.shared_experts.up_proj.weight", "shared_experts") == {"a": 1.0}
    assert expert_of("layers.3.ffn.experts.2.w1.weight") == ("layers.3.ffn.experts", 2)   # DeepSeek-V4 names
    assert expert_of("model.layers.3.mlp.shared_experts.up_proj.weight") is None
    # first match wins, as for globs
    r2 = from_dict({"parents": {"a": "/x/a", "b": "/x/b"}, "base": "a", "weights": {"default": {"a": 1.0}},
                    "overrides": [{"match": "model.layers.3.mlp.experts[0-3]", "weights": {"a": 0.5, "b": 0.5}},
                                  {"match": "model.layers.3.*", "weights": {"b": 1.0}}]})
    lams = r2.expert_lambdas(fused, "routed_experts", 8)
    assert lams[:4] == [{"a": 0.5, "b": 0.5}] * 4 and lams[4:] == [{"b": 1.0}] * 4


@pytest.mark.parametrize("match,msg", [("model.layers.3.mlp.experts[5-3]", "bad expert list '5-3'"),
                                       ("model.layers.3.mlp.experts[x]", "bad expert list 'x'"),
                                       ("model.layers.3.mlp[5]", "an expert selector names an experts module")])
def test_bad_selectors_are_one_line_errors(match, msg):
    with pytest.raises(ChimeraError, match=msg) as ei:
        _recipe(match)
    assert "\n" not in str(ei.value) and "overrides[0]" in str(ei.value)
