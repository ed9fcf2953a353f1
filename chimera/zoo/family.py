"""The bundled tiny DeepSeek-V3-format model family: its configuration and where its files live.

    base (pre-trained on raw text, not bundled)
     |-- tiny-v3       instruct: answers directly
     |-- tiny-r1       reasoner: <think> column arithmetic in the prompt's language </think> answer
     `-- tiny-r1-long  reasoner that checks its work (about twice the thinking); optional, not
                       bundled: `chimera train-zoo --long` adds it
    tiny-v3-fp8, tiny-r1-fp8: DeepSeek block-FP8 (128x128) copies made by chimera's converter

Rebuild everything with `chimera train-zoo` (see `chimera.zoo.train`).
"""
from __future__ import annotations

from pathlib import Path

from chimera.errors import ChimeraError

MODELS_DIR = Path(__file__).resolve().parent / "models"
BF16_MODELS = ("tiny-v3", "tiny-r1", "tiny-r1-long")
FP8_MODELS = ("tiny-v3-fp8", "tiny-r1-fp8")
STYLES = {"tiny-v3": "instruct", "tiny-r1": "reason", "tiny-r1-long": "reason-long"}
SEED = 0

# Architecture (DeepSeek-V3 layout, shrunk): 1 dense layer then 3 MoE layers of 32 routed experts,
# 4 per token from the best 2 of 4 groups, one shared expert, sigmoid routing with a correction bias.
ARCH = dict(
    hidden_size=128,
    intermediate_size=256,          # the dense layer's MLP
    moe_intermediate_size=48,       # each routed (and the shared) expert
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=32,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
)


def config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, **overrides):
    """A `DeepseekV3Config` for the family (overrides shrink it further for tests)."""
    from transformers import DeepseekV3Config

    kw = dict(ARCH, vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def model_path(name: str) -> Path:
    """The bundled directory of a family member, e.g. `model_path("tiny-r1")`."""
    names = BF16_MODELS + FP8_MODELS
    if name not in names:
        raise ChimeraError(f"unknown zoo model {name!r}: expected one of {', '.join(names)}")
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise ChimeraError(f"{path}: zoo model {name!r} is not built; run `chimera train-zoo`")
    return path


def available() -> list[str]:
    return [n for n in BF16_MODELS + FP8_MODELS if (MODELS_DIR / n / "config.json").is_file()]
