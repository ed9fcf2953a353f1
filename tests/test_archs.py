"""Every supported architecture: real transformers checkpoints, every tensor classified, merged, loaded."""
import json

import pytest
import torch
import yaml

import ckpt
from chimera.checkpoint.arch import CLASSES, classify
from chimera.checkpoint.files import Checkpoint
from chimera.merge import merge


def make(kind: str, seed: int):
    from transformers import (AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)

    torch.manual_seed(seed)
    cfg = {
        "mixtral": lambda: MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                            shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
        "qwen3_moe": lambda: Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            num_experts=4, num_experts_per_tok=2),
        "olmoe": lambda: OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                     eos_token_id=1, pad_token_id=0, bos_token_id=None),
    }[kind]()
    return AutoModelForCausalLM.from_config(cfg)


EXPECTED = {  # classes each architecture's files must produce
    "mixtral": {"embed", "lm_head", "norm", "attention", "router", "routed_experts"},
    "qwen2_moe": {"embed", "lm_head", "norm", "attention", "dense_mlp", "router", "shared_experts", "routed_experts"},
    "qwen3_moe": {"embed", "lm_head", "norm", "attention", "router", "routed_experts"},
    "olmoe": {"embed", "lm_head", "norm", "attention", "router", "routed_experts"},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_arch_merge_by_class(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(("p", "q")):
        m = make(kind, i)
        with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor differ between parents
            for t in m.parameters():
                t.add_(0.05 * torch.randn_like(t))
        m.save_pretrained(tmp_path / name)
    ck = Checkpoint(tmp_path / "p")
    classes = {n: classify(n, ck.config) for n in ck.logical()}
    assert None not in classes.values(), [n for n, c in classes.items() if c is None]
    assert set(classes.values()) == EXPECTED[kind]
    # each class takes a different parent or mix
    weights = {"default": {"p": 1.0}, "routed_experts": {"q": 1.0}, "router": {"p": 0.5, "q": 0.5}}
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"parents": {"p": str(tmp_path / "p"), "q": str(tmp_path / "q")}, "base": "p",
                                 "weights": weights}))
    merge(r, tmp_path / "c")
    got, fp, fq = (ckpt.load_float(tmp_path / d) for d in ("c", "p", "q"))
    for n, cls in classes.items():
        if cls == "routed_experts":
            assert torch.equal(got[n], fq[n]), n
        elif cls == "router":
            assert torch.allclose(got[n], (fp[n] + fq[n]) / 2, rtol=1e-6, atol=1e-7), n
        else:
            assert torch.equal(got[n], fp[n]), n
    # the child keeps the input's per-expert layout and loads in transformers
    child = AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == kind
    with torch.no_grad():
        assert torch.isfinite(child(torch.tensor([[1, 2, 3]])).logits).all()


def test_deepseek_mtp_and_dense_classes():
    sd, cfg = ckpt.ds_state(0, mtp=True)
    n = cfg["num_hidden_layers"]
    got = {k: classify(k, cfg) for k in sd}
    assert None not in got.values()
    assert got["model.layers.0.mlp.gate_proj.weight"] == "dense_mlp"
    assert got[f"model.layers.{n}.enorm.weight"] == "mtp"
    assert got[f"model.layers.{n}.eh_proj.weight"] == "mtp"
    assert got[f"model.layers.{n}.mlp.experts.2.down_proj.weight"] == "routed_experts"
    assert got[f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight"] == "attention"
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"] == "router"
    assert classify("model.layers.1.mlp.gate_proj.weight", cfg) is None  # no dense MLP in an MoE layer
    assert set(got.values()) == set(CLASSES)
