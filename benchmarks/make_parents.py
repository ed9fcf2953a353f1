"""Generate benchmark parents: a DeepSeek-V3-format FP8 pair (>= 2 GB each) and a Mixtral bf16 pair
(>= 1.5 GB each), with real on-disk names, shapes (incl. 576-row MLA tensors) and block scales.

The values are random (timing does not depend on them); e4m3 NaN codes are avoided.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def fp8_random(shape, g):
    u = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    u[(u & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in e4m3fn
    return u.view(torch.float8_e4m3fn)


def scale(shape, g):
    return torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=g) * 1e-3 + 1e-5


def write_shards(path: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """One safetensors file per dict, plus the HF index."""
    n, wm = len(shards), {}
    for i, t in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, str(path / fn), metadata={"format": "pt"})
        wm.update({k: fn for k in t})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def deepseek(path: Path, seed: int, layers: int = 8, experts: int = 48) -> None:
    g = torch.Generator().manual_seed(seed)
    h, inter, moe, heads, vocab = 2048, 5632, 768, 16, 32000
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": h,
           "intermediate_size": inter, "moe_intermediate_size": moe, "num_hidden_layers": layers,
           "first_k_dense_replace": 1, "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8,
           "n_group": 8, "topk_group": 4, "num_attention_heads": heads, "num_key_value_heads": heads,
           "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128, "vocab_size": vocab, "num_nextn_predict_layers": 0, "routed_scaling_factor": 2.5,
           "norm_topk_prob": True, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = []

    def fp8w(t: dict, name: str, shape):
        t[name] = fp8_random(shape, g)
        t[name[:-len(".weight")] + ".weight_scale_inv"] = scale(shape, g)

    for L in range(layers):
        t: dict[str, torch.Tensor] = {}
        p = f"model.layers.{L}."
        t[p + "input_layernorm.weight"] = torch.randn(h, generator=g).to(torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.randn(h, generator=g).to(torch.bfloat16)
        t[p + "self_attn.q_a_layernorm.weight"] = torch.randn(768, generator=g).to(torch.bfloat16)
        t[p + "self_attn.kv_a_layernorm.weight"] = torch.randn(512, generator=g).to(torch.bfloat16)
        fp8w(t, p + "self_attn.q_a_proj.weight", (768, h))
        fp8w(t, p + "self_attn.q_b_proj.weight", (heads * 192, 768))
        fp8w(t, p + "self_attn.kv_a_proj_with_mqa.weight", (576, h))
        fp8w(t, p + "self_attn.kv_b_proj.weight", (heads * 256, 512))
        fp8w(t, p + "self_attn.o_proj.weight", (h, heads * 128))
        if L < 1:
            for n, s in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
                fp8w(t, p + f"mlp.{n}.weight", s)
        else:
            t[p + "mlp.gate.weight"] = (torch.randn(experts, h, generator=g) * 0.02).to(torch.bfloat16)
            t[p + "mlp.gate.e_score_correction_bias"] = torch.randn(experts, generator=g) * 0.01
            for n, s in (("gate_proj", (moe, h)), ("up_proj", (moe, h)), ("down_proj", (h, moe))):
                fp8w(t, p + f"mlp.shared_experts.{n}.weight", s)
                for e in range(experts):
                    fp8w(t, p + f"mlp.experts.{e}.{n}.weight", s)
        shards.append(t)
    shards.append({"model.embed_tokens.weight": (torch.randn(vocab, h, generator=g) * 0.02).to(torch.bfloat16),
                   "lm_head.weight": (torch.randn(vocab, h, generator=g) * 0.02).to(torch.bfloat16),
                   "model.norm.weight": torch.randn(h, generator=g).to(torch.bfloat16)})
    write_shards(path, shards)


def mixtral(path: Path, seed: int, layers: int = 5, experts: int = 8) -> None:
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab, heads, kv = 2048, 2816, 32000, 16, 4
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "num_local_experts": experts, "num_experts_per_tok": 2,
           "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = []

    def w(shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    for L in range(layers):
        p = f"model.layers.{L}."
        t = {p + "input_layernorm.weight": w(h), p + "post_attention_layernorm.weight": w(h),
             p + "self_attn.q_proj.weight": w((h, h)), p + "self_attn.k_proj.weight": w((h // 4, h)),
             p + "self_attn.v_proj.weight": w((h // 4, h)), p + "self_attn.o_proj.weight": w((h, h)),
             p + "block_sparse_moe.gate.weight": w((experts, h))}
        for e in range(experts):
            t[p + f"block_sparse_moe.experts.{e}.w1.weight"] = w((inter, h))
            t[p + f"block_sparse_moe.experts.{e}.w3.weight"] = w((inter, h))
            t[p + f"block_sparse_moe.experts.{e}.w2.weight"] = w((h, inter))
        shards.append(t)
    shards.append({"model.embed_tokens.weight": w((vocab, h)), "lm_head.weight": w((vocab, h)), "model.norm.weight": w(h)})
    write_shards(path, shards)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/_data")
    for name, fn, seed in (("ds-a", deepseek, 1), ("ds-b", deepseek, 2), ("mx-a", mixtral, 3), ("mx-b", mixtral, 4)):
        if not (root / name / "config.json").exists():
            fn(root / name, seed)
        size = sum(f.stat().st_size for f in (root / name).glob("*.safetensors"))
        print(f"{name}: {size / 1e9:.2f} GB")
