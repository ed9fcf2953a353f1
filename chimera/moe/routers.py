"""One small adapter per transformers MoE router type, found by module type (never by guessing names).

In transformers 5.x every supported router is `model.model.layers[L].mlp.gate` and its forward returns
`(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])`: it does the top-k itself. An adapter
re-runs that architecture's own selection rule on `router_logits` with an off/force mask applied, so a
forward hook can replace the router's output. With empty masks each adapter reproduces the router's own
output bit for bit (tested per architecture, which also catches a moved hook point after an upgrade).

Masks (boolean, shape [E]) mean:
- `off` with `mode="replace"`: the expert can't be selected; the next-best expert takes its slot
  (DeepSeek: on the bias-corrected selection score, before group-limited top-k).
- `off` with `mode="drop"`: selection unchanged; the expert's weight becomes 0 and the remaining weights are
  rescaled to the original total (sum 1 x routed_scaling_factor for DeepSeek with `norm_topk_prob`).
- `force`: the expert is always selected (for DeepSeek its group is kept too); its weight comes from its
  own unbiased score, normalised with the others exactly like an ordinary selection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from chimera.errors import ChimeraError

#: selection bias of a switched-off / forced-on DeepSeek expert (also what `chimera tune` persists). Exact in
#: float32 and float16; -1e4 rounds to -9984 in bfloat16. Far beyond any trained bias (O(1)).
OFF_BIAS = -1.0e4
ON_BIAS = 1.0e4

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _router_classes() -> dict[str, type]:
    """Router classes of the installed transformers, by adapter kind (a missing model family is skipped)."""
    found: dict[str, type] = {}
    specs = [
        ("deepseek_v3", "transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter"),
        ("mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralTopKRouter"),
        ("qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter"),
        ("qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter"),
        ("olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoeTopKRouter"),
    ]
    import importlib

    for kind, module, name in specs:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the transformers version
            continue
        found[kind] = cls
    return found


SUPPORTED = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class RouterAdapter:
    """Base class: wraps one router module and re-runs its selection with masks."""

    kind = "?"
    has_bias = False

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def num_experts(self) -> int:
        return int(self.module.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.module.top_k)

    def select(self, router_logits: torch.Tensor, off: torch.Tensor | None = None, force: torch.Tensor | None = None,
               mode: str = "replace") -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(top_k_weights, top_k_index)` for `router_logits` [T, E] under the masks."""
        raise NotImplementedError

    def check_masks(self, off: torch.Tensor | None, force: torch.Tensor | None, mode: str, where: str) -> None:
        n_off = int(off.sum()) if off is not None else 0
        n_force = int(force.sum()) if force is not None else 0
        if n_force > self.top_k:
            raise ChimeraError(f"{where}: {n_force} experts forced on but only {self.top_k} are chosen per token")
        if mode == "replace" and n_off > self.num_experts - self.top_k:
            raise ChimeraError(f"{where}: {n_off} experts switched off leaves fewer than top_k={self.top_k} of "
                               f"{self.num_experts}")
        if off is not None and force is not None and bool((off & force).any()):
            e = int((off & force).nonzero()[0, 0])
            raise ChimeraError(f"{where}: expert {e} is both switched off and forced on")


def _drop(weights: torch.Tensor, index: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Zero the weights of `off` experts among the chosen ones; rescale the rest to the original total."""
    dropped = off[index]  # [T, k] bool
    if not bool(dropped.any()):
        return weights
    total = weights.sum(dim=-1, keepdim=True)
    kept = weights.masked_fill(dropped, 0.0)
    rest = kept.sum(dim=-1, keepdim=True)
    scale = torch.where(rest > 0, total / rest.clamp_min(torch.finfo(rest.dtype).tiny), torch.zeros_like(rest))
    return (kept * scale).to(weights.dtype)


class DeepseekV3Adapter(RouterAdapter):
    """`noaux_tc`: sigmoid scores, + e_score_correction_bias for selection, group top-2-sum, topk_group groups,
    top-k, unbiased weights normalised (norm_topk_prob) and multiplied by routed_scaling_factor."""

    kind = "deepseek_v3"
    has_bias = True

    def check_masks(self, off, force, mode, where):
        super().check_masks(off, force, mode, where)
        m = self.module
        if force is not None and bool(force.any()):
            groups = force.view(m.num_group, -1).any(dim=-1)
            if int(groups.sum()) > m.topk_group:
                raise ChimeraError(f"{where}: forced experts span {int(groups.sum())} groups but only "
                                   f"topk_group={m.topk_group} groups are kept per token")

    def select(self, router_logits, off=None, force=None, mode="replace"):
        m = self.module
        n_group, per_group = m.num_group, m.num_experts // m.num_group
        scores = router_logits.sigmoid()
        bias = m.e_score_correction_bias
        # A switch sets the expert's selection bias to OFF_BIAS / ON_BIAS (-1e4 / +1e4; sigmoid scores lie in
        # (0, 1)), exactly what a persisted `tune` writes to the checkpoint, so live and persisted switches give
        # bit-identical results; it ranks the expert last / first, like -inf / +inf would.
        if off is not None and mode == "replace":
            bias = bias.masked_fill(off, OFF_BIAS)
        if force is not None:
            bias = bias.masked_fill(force, ON_BIAS)
        scores_for_choice = scores + bias
        group_scores = scores_for_choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=m.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, m.num_experts)
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=m.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if m.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * m.routed_scaling_factor
        if off is not None and mode == "drop":
            topk_weights = _drop(topk_weights, topk_indices, off)
        return topk_weights, topk_indices


def _softmax_topk(router_probs, top_k, off, force, mode):
    """Top-k of softmax probabilities [T, E] with `replace`-off experts masked to -inf and forced ones
    to +inf before selection; returns the unmasked probabilities of the chosen experts [T, k]."""
    if (off is None or mode != "replace") and force is None:
        return torch.topk(router_probs, top_k, dim=-1)
    choice = router_probs
    if off is not None and mode == "replace":
        choice = choice.masked_fill(off, float("-inf"))
    if force is not None:
        choice = choice.masked_fill(force, float("inf"))
    indices = torch.topk(choice, top_k, dim=-1)[1]
    return router_probs.gather(1, indices), indices


class MixtralAdapter(RouterAdapter):
    """softmax in float32, top-k, always renormalised; weights stay float32."""

    kind = "mixtral"

    def select(self, router_logits, off=None, force=None, mode="replace"):
        m = self.module
        router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
        top_value, indices = _softmax_topk(router_probs, m.top_k, off, force, mode)
        top_value /= top_value.sum(dim=-1, keepdim=True)
        if off is not None and mode == "drop":
            top_value = _drop(top_value, indices, off)
        return top_value, indices


class QwenStyleAdapter(RouterAdapter):
    """Qwen2-MoE / Qwen3-MoE / OLMoE: softmax in float32, top-k, renormalise only with norm_topk_prob,
    weights cast back to the logits' dtype."""

    kind = "qwen_moe"

    def select(self, router_logits, off=None, force=None, mode="replace"):
        m = self.module
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, indices = _softmax_topk(router_probs, m.top_k, off, force, mode)
        if m.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        if off is not None and mode == "drop":
            top_value = _drop(top_value, indices, off)
        top_value = top_value.to(router_logits.dtype)
        return top_value, indices


_ADAPTERS: dict[str, type[RouterAdapter]] = {
    "deepseek_v3": DeepseekV3Adapter,
    "mixtral": MixtralAdapter,
    "qwen2_moe": QwenStyleAdapter,
    "qwen3_moe": QwenStyleAdapter,
    "olmoe": QwenStyleAdapter,
}


def adapter_for(module: nn.Module) -> RouterAdapter | None:
    """The adapter for a router module, or None when `module` is not a supported router."""
    for kind, cls in _router_classes().items():
        if isinstance(module, cls):
            adapter = _ADAPTERS[kind](module)
            adapter.kind = kind
            return adapter
    return None


@dataclass
class MoELayer:
    layer: int          # decoder layer index L (model.model.layers[L])
    name: str           # module name of the router
    adapter: RouterAdapter


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    return f"{type(model).__name__}" + (f" (model_type {mt})" if mt else "")


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """Map decoder layer index -> its router adapter, for every MoE layer of a loaded transformers model.

    Raises ChimeraError (one line) when the model has no supported router.
    """
    layers: dict[int, MoELayer] = {}
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        m = _LAYER_RE.search("." + name + ".")
        if m is None:  # pragma: no cover - a router outside the decoder stack (e.g. an MTP head)
            continue
        layer = int(m.group(1))
        if layer in layers:  # pragma: no cover - two routers in one decoder layer
            raise ChimeraError(f"{_describe(model)}: two routers in decoder layer {layer}")
        layers[layer] = MoELayer(layer, name, adapter)
    if not layers:
        raise ChimeraError(f"unknown architecture: {_describe(model)} has no supported MoE router "
                           f"(supported: {', '.join(SUPPORTED)})")
    return dict(sorted(layers.items()))


def num_decoder_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n is None and config is not None and hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
    return int(n) if n is not None else None
