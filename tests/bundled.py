"""The bundled tiny-r1's shape, read from its files: tests that name layers, experts or tensor counts of the
bundled family take them from here (the family can be rebuilt with other shapes)."""
from __future__ import annotations

import json

from safetensors import safe_open

from chimera.zoo import family

CONFIG = json.loads((family.model_path("tiny-r1") / "config.json").read_text())
N_LAYERS = CONFIG["num_hidden_layers"]
TOP_K = CONFIG["num_experts_per_tok"]
N_EXPERTS = CONFIG["n_routed_experts"]
N_GROUPS = CONFIG["n_group"]
MOE_LAYERS = list(range(CONFIG["first_k_dense_replace"], N_LAYERS))


def tensor_count(name: str = "tiny-r1") -> int:
    """How many tensors a bundled model stores (a merge or conversion of it records each)."""
    with safe_open(family.model_path(name) / "model.safetensors", "np") as f:
        return len(list(f.keys()))
