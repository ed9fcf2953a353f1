"""The bundled tiny DeepSeek-V3-format model family (v2): its configuration and where its files live.

    tiny-base (pre-trained long on raw text with worked reasoning; not bundled)
     |-- tiny-v3       instruct: answers directly                                  (the V3-0324 analogue)
     |-- tiny-r1       reasoner: <think> column addition in the prompt's language  (the R1 analogue)
     `-- tiny-r1-long  reasoner that splits digits and checks its sum              (the R1-0528 analogue)
    tiny-v3-fp8, tiny-r1-fp8, tiny-r1-long-fp8: DeepSeek block-FP8 (128x128) copies made by chimera's converter

The three children are small fine-tunes of one base with one optimizer recipe, differing only in
their fine-tuning data. Rebuild everything with `chimera train-zoo` (see `chimera.zoo.train`).
"""
from __future__ import annotations

from pathlib import Path

from chimera.errors import ChimeraError

MODELS_DIR = Path(__file__).resolve().parent / "models"
BF16_MODELS = ("tiny-v3", "tiny-r1", "tiny-r1-long")
FP8_MODELS = ("tiny-v3-fp8", "tiny-r1-fp8", "tiny-r1-long-fp8")
STYLES = {"tiny-v3": "instruct", "tiny-r1": "reason", "tiny-r1-long": "reason-long"}
SEED = 0

# Architecture (DeepSeek-V3's layout, shrunk): 1 dense layer then 4 MoE layers of 64 fine-grained routed
# experts, 6 per token from the best 4 of 8 groups, one shared expert the size of one routed expert,
# sigmoid routing with a correction bias; MLA attention. Routed experts hold ~86% of the parameters
# (DeepSeek-V3: ~97%).
ARCH = dict(
    hidden_size=128,
    intermediate_size=128,          # the dense layer's MLP
    moe_intermediate_size=32,       # each routed (and the shared) expert
    num_hidden_layers=5,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=64,
    n_shared_experts=1,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    q_lora_rank=64,
    kv_lora_rank=48,
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
