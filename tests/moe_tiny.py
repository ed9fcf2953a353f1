"""Tiny random MoE models of every supported architecture, built from transformers' own config classes.

Shapes are tiny (hidden 32, 8-16 experts, 2-4 layers) but keep each architecture's structure: dense first
layers, shared experts, MTP-free decoder stacks, linear-attention layers, hash-routed layers (DeepSeek-V4),
vision towers (Qwen3.5-MoE, Llama-4), fused experts (gpt-oss, Llama-4).
"""
from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8)


def tiny_config(arch: str):
    if arch in ("deepseek_v3", "kimi_k2"):
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **MLA, intermediate_size=48,
                                   moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                                   n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                                   topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    if arch == "deepseek_v2":
        return tf.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **MLA, intermediate_size=48,
                                   moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                                   topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.0)
    if arch == "deepseek_v32":
        return tf.DeepseekV32Config(**{**COMMON, "num_key_value_heads": 4}, **MLA, intermediate_size=48,
                                    moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                                    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                                    topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                    index_n_heads=2, index_head_dim=8, index_topk=4)
    if arch == "deepseek_v4":
        # moe_intermediate 32: V4's MXFP4 expert files need whole 32-element blocks
        return tf.DeepseekV4Config(**{**COMMON, "num_key_value_heads": 1}, head_dim=16, q_lora_rank=16,
                                   moe_intermediate_size=32, num_hidden_layers=4, n_routed_experts=8,
                                   n_shared_experts=1, num_experts_per_tok=2, o_groups=2, o_lora_rank=8,
                                   index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2, sliding_window=8,
                                   layer_types=["sliding_attention", "compressed_sparse_attention",
                                                "heavily_compressed_attention", "compressed_sparse_attention"],
                                   mlp_layer_types=["hash_moe", "moe", "moe", "moe"])
    if arch == "glm4_moe":
        return tf.Glm4MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                                num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, use_qk_norm=True, attention_bias=True)
    if arch == "dots1":
        return tf.Dots1Config(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                              first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                              n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    if arch == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                                num_experts_per_tok=2)
    if arch == "minimax_m2":
        return tf.MiniMaxM2Config(**COMMON, head_dim=8, intermediate_size=16, num_hidden_layers=2,
                                  num_local_experts=8, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
                                 decoder_sparse_step=1)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    if arch == "qwen3_next":
        return tf.Qwen3NextConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                  shared_expert_intermediate_size=16, num_hidden_layers=2, num_experts=8,
                                  num_experts_per_tok=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                  linear_num_key_heads=2, linear_num_value_heads=4,
                                  layer_types=["linear_attention", "full_attention"])
    if arch == "qwen3_5_moe":
        text = dict(**COMMON, head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                    num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, linear_key_head_dim=8,
                    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                    layer_types=["linear_attention", "full_attention"])
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                      num_position_embeddings=16)
        return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    if arch == "gpt_oss":
        # intermediate 32: gpt-oss MXFP4 files need whole 32-element blocks
        return tf.GptOssConfig(**COMMON, head_dim=8, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                               num_experts_per_tok=2, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"])
    if arch == "llama4":
        text = dict(**COMMON, head_dim=8, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=2,
                    num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=16)
        vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                      patch_size=8, projector_input_dim=16, projector_output_dim=32, vision_output_dim=16)
        return tf.Llama4Config(text_config=text, vision_config=vision)
    if arch == "ernie4_5_moe":
        return tf.Ernie4_5_MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                                     moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                                     moe_layer_end_index=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)
    raise ValueError(arch)


ARCHS = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "kimi_k2", "glm4_moe", "qwen2_moe", "qwen3_moe",
         "qwen3_next", "qwen3_5_moe", "gpt_oss", "llama4", "minimax_m2", "ernie4_5_moe", "dots1", "mixtral", "olmoe")


#: architectures whose published checkpoints are image-text models (their tiny siblings are too)
VLM = ("qwen3_5_moe", "llama4")


def model_class(arch: str):
    return tf.AutoModelForImageTextToText if arch in VLM else tf.AutoModelForCausalLM


def tiny_model(arch: str, seed: int = 0, bias_noise: bool = True, text_only: bool = False):
    """A tiny random model of `arch` with decisive routers (router weights ~ N(0, 0.5)) and, with `bias_noise`,
    random router biases; DeepSeek-V4 hash layers get a random token table with distinct experts per token.
    `text_only`: Llama-4 as its text model (transformers 5.24's image-text Llama-4 can't run on text alone)."""
    from chimera.checkpoint.arch import moe_blocks

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    if text_only and arch == "llama4":
        model = tf.Llama4ForCausalLM(cfg.text_config).eval()
    else:
        model = model_class(arch).from_config(cfg).eval()
    modules = dict(model.named_modules())
    blocks = list(moe_blocks(model).values())
    with torch.no_grad():  # the global generator, router weights first, then biases (as for the first five archs)
        for b in blocks:
            for p in modules[b.router].parameters(recurse=False):
                if p.dim() == 2 and p.shape[0] == b.num_experts:
                    p.normal_(0, 0.5)
        for b in blocks if bias_noise else ():
            router, block = modules[b.router], modules[b.path]
            for owner in (router, block, getattr(router, "moe_statics", None)):
                for name in ("e_score_correction_bias", "bias"):
                    t = getattr(owner, name, None) if owner is not None else None
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1] == b.num_experts:
                        t.normal_(0, 0.1)
        g = torch.Generator().manual_seed(seed + 7)
        for b in blocks:
            table = getattr(modules[b.router], "tid2eid", None)
            if table is not None:
                rows = [torch.randperm(b.num_experts, generator=g)[: table.shape[1]] for _ in range(table.shape[0])]
                table.copy_(torch.stack(rows))
    return model


def perturbed(arch: str, seed: int, scale: float = 0.05):
    """A tiny model whose every float tensor differs from the seed-0 parent's (norms start at 1, biases at 0)."""
    model = tiny_model(arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "bias" in n]:
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=g))
    return model


def save(model, path, arch: str, fused: bool = False):
    """`save_pretrained` (the library's on-disk layout). Kimi K2 gets its published config (own model_type,
    `auto_map` to remote code chimera must never run). `fused`: the in-memory names as they are, fused
    experts included (Qwen3.5-MoE's newer releases store `experts.gate_up_proj [E, 2I, H]`)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    model.save_pretrained(path)
    if fused:
        for f in path.glob("*.safetensors"):
            f.unlink()
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head")
              or not model.config.get_text_config().tie_word_embeddings}
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    if arch == "kimi_k2":
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                   "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def load(arch: str, path):
    """Load a checkpoint of `arch` with transformers' own classes (never remote code)."""
    if arch == "kimi_k2":  # transformers picks its weight-name conversions by model_type: load it as deepseek_v3
        cfg = tf.DeepseekV3Config.from_pretrained(path)
        cfg.model_type = "deepseek_v3"
        return tf.DeepseekV3ForCausalLM.from_pretrained(path, config=cfg).eval()
    return model_class(arch).from_pretrained(path).eval()


def logits(arch: str, model, ids):
    """Next-token logits on text: Llama-4's image-text class runs its language model."""
    with torch.no_grad():
        return (model.language_model if arch == "llama4" else model)(input_ids=ids).logits
