"""Per-architecture tables: on-disk tensor-name pattern -> tensor class.

Data, not code paths: to support a new MoE architecture add one table. Patterns are regular
expressions matched against the whole on-disk name (with `weight_scale_inv` companions removed: a
scale always follows its weight). `{L}` stands for the layer index and is resolved by `classify`,
which also handles the two layer-dependent cases: DeepSeek's dense layers (< first_k_dense_replace)
and its multi-token-prediction (MTP) layer at index num_hidden_layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from chimera.errors import ChimeraError

CLASSES = ("embed", "lm_head", "norm", "attention", "dense_mlp", "router",
           "shared_experts", "routed_experts", "mtp")

_COMMON: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed"),
    (r"lm_head\.weight", "lm_head"),
    (r"model\.norm\.weight", "norm"),
    (r"model\.layers\.{L}\.(input_layernorm|post_attention_layernorm)\.weight", "norm"),
]

TABLES: dict[str, list[tuple[str, str]]] = {
    "deepseek_v3": _COMMON + [
        (r"model\.layers\.{L}\.self_attn\.(q_a_layernorm|kv_a_layernorm)\.weight", "norm"),
        (r"model\.layers\.{L}\.self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight", "attention"),
        (r"model\.layers\.{L}\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "dense_mlp"),
        (r"model\.layers\.{L}\.mlp\.gate\.(weight|e_score_correction_bias)", "router"),
        (r"model\.layers\.{L}\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight", "shared_experts"),
        (r"model\.layers\.{L}\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight", "routed_experts"),
        # the MTP layer's own tensors (its attention, router and experts keep their role's class)
        (r"model\.layers\.{L}\.(enorm|hnorm|eh_proj|shared_head\.norm|shared_head\.head|embed_tokens)\.weight", "mtp"),
    ],
    "mixtral": _COMMON + [
        (r"model\.layers\.{L}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", "attention"),
        (r"model\.layers\.{L}\.block_sparse_moe\.gate\.weight", "router"),
        (r"model\.layers\.{L}\.block_sparse_moe\.experts\.\d+\.(w1|w2|w3)\.weight", "routed_experts"),
    ],
    "qwen2_moe": _COMMON + [
        (r"model\.layers\.{L}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", "attention"),
        (r"model\.layers\.{L}\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "dense_mlp"),
        (r"model\.layers\.{L}\.mlp\.gate\.weight", "router"),
        (r"model\.layers\.{L}\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight", "shared_experts"),
        (r"model\.layers\.{L}\.mlp\.shared_expert_gate\.weight", "shared_experts"),
        (r"model\.layers\.{L}\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight", "routed_experts"),
    ],
    "qwen3_moe": _COMMON + [
        (r"model\.layers\.{L}\.self_attn\.(q_norm|k_norm)\.weight", "norm"),
        (r"model\.layers\.{L}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", "attention"),
        (r"model\.layers\.{L}\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "dense_mlp"),
        (r"model\.layers\.{L}\.mlp\.gate\.weight", "router"),
        (r"model\.layers\.{L}\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight", "routed_experts"),
    ],
}
TABLES["olmoe"] = TABLES["qwen3_moe"]
TABLES["deepseek_v2"] = TABLES["deepseek_v3"]

_COMPILED = {arch: [(re.compile(p.replace("{L}", r"(?P<layer>\d+)") + r"\Z"), c) for p, c in table]
             for arch, table in TABLES.items()}


def supported(model_type: str) -> bool:
    return model_type in _COMPILED


def classify(name: str, config: dict) -> str | None:
    """The class of an on-disk tensor name, or None if the architecture's table has no rule for it."""
    model_type = config.get("model_type")
    if model_type not in _COMPILED:
        raise ChimeraError(f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(_COMPILED))})")
    n_layers = int(config.get("num_hidden_layers", 0))
    for pattern, cls in _COMPILED[model_type]:
        m = pattern.match(name)
        if not m:
            continue
        layer = m.groupdict().get("layer")
        if layer is not None and int(layer) >= n_layers:
            # DeepSeek's multi-token-prediction layer(s): layers num_hidden_layers.. keep their role
            # class for attention/router/experts; the rest of the layer is `mtp`.
            if cls in ("attention", "router", "routed_experts", "shared_experts"):
                return cls
            return "mtp"
        if cls == "dense_mlp" and model_type.startswith("deepseek") and layer is not None:
            if int(layer) >= int(config.get("first_k_dense_replace", 0)):
                return None  # an MoE layer has no dense MLP: a stray name, not a class
        return cls
    return None


# ------------------------------------------------------------------------------------------- roles
# Layer and routed-expert index of an on-disk name: the same on-disk convention in every table above.
_LAYER_IDX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_IDX = re.compile(r"(?:^|\.)experts\.(\d+)\.")

#: config keys that hold the number of routed experts per MoE layer, by architecture family
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")


@dataclass(frozen=True)
class Role:
    """What one on-disk tensor is: its class, decoder layer and routed-expert index (per-expert tensors), or
    `fused` when it holds every expert of its layer along axis 0."""

    cls: str
    layer: int | None = None
    expert: int | None = None
    fused: bool = False


@dataclass(frozen=True)
class RouterTensor:
    name: str                     # logical on-disk tensor
    axis: int | None              # the axis indexing experts; None: values are expert ids (a token table)


class _Tables:
    """Roles of on-disk names for one config, from the tables above."""

    def __init__(self, config: dict):
        self.config = config
        self.n_layers = int(config.get("num_hidden_layers", 0))

    def role(self, name: str) -> Role | None:
        cls = classify(name, self.config)
        if cls is None:
            return None
        lm, em = _LAYER_IDX.search(name), _EXPERT_IDX.search(name)
        expert = int(em.group(1)) if em and cls == "routed_experts" else None
        return Role(cls, int(lm.group(1)) if lm else None, expert, cls == "routed_experts" and expert is None)

    def num_experts(self, layer: int) -> int:
        """Routed experts of an MoE layer: every table above has one count for all layers in config.json."""
        keys = expert_count_keys(self.config)
        if not keys:
            raise ChimeraError(f"config.json: no expert count ({', '.join(EXPERT_COUNT_KEYS)})")
        return int(self.config[keys[0]])

    def router_tensors(self, names, layer: int) -> list[RouterTensor]:
        """The router tensors of `layer` with the axis that indexes experts (axis 0 for every table above)."""
        return [RouterTensor(n, 0) for n in names if (r := self.role(n)) and r.cls == "router" and r.layer == layer]


def of(config: dict) -> _Tables:
    """Architecture knowledge for a config.json mapping: `.role(name)`, `.num_experts(layer)`,
    `.router_tensors(names, layer)`, `.n_layers`."""
    return _Tables(config)


def expert_count_keys(config: dict) -> list[str]:
    """The config key(s) holding the number of routed experts (one per family; checked, not guessed)."""
    return [k for k in EXPERT_COUNT_KEYS if isinstance(config.get(k), int)]
