"""Tiny random MoE models of every supported architecture, built from real transformers configs."""
from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)


def tiny_config(arch: str):
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                                   first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
                                   num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, head_dim=8)
    if arch == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                                num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
                                 decoder_sparse_step=1)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    if arch == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)
    raise ValueError(arch)


ARCHS = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_model(arch: str, seed: int = 0, bias_noise: bool = True):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # spread router scores so selection is decisive
        if bias_noise:
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0, 0.1)
    return model
