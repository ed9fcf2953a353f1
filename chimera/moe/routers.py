"""One small adapter per transformers MoE router, keyed by router class name: the one layer that knows routers.

MoE blocks are found structurally (`chimera.checkpoint.arch.moe_blocks`: a module with an `experts` child and a
sibling holding an `[E, hidden]` weight), then each router gets the adapter of its class. An adapter re-runs that
router's own selection rule on its logits with an off/force mask applied, so a forward hook can replace the
router's output. With empty masks each adapter reproduces the router's own output bit for bit (tested per
architecture, which also catches a moved hook point after an upgrade).

Masks (boolean, shape [E]) mean:
- `off` with `mode="replace"`: the expert can't be selected; the next-best expert takes its slot
  (DeepSeek/GLM/dots1: on the bias-corrected selection score, before group-limited top-k).
- `off` with `mode="drop"`: selection unchanged; the expert's weight becomes 0 and the remaining weights are
  rescaled to the original total (sum 1 x routed_scaling_factor for DeepSeek with `norm_topk_prob`).
- `force`: the expert is always selected (for group-limited routers its group is kept too); its weight comes
  from its own score, normalised with the others exactly like an ordinary selection.

Router families (transformers 5.x):

| adapter | routers | selection | weights | bias a `tune` can persist |
| --- | --- | --- | --- | --- |
| NoAuxTc | DeepSeek-V3/V3.2 (+Kimi K2), GLM-4.5, dots1 | sigmoid + bias, group top-2 sums, top-k | unbiased sigmoid, normalised, x scale | `e_score_correction_bias` (selection only) |
| DeepseekV4 | DeepSeek-V4 top-k layers | sqrtsoftplus + bias, top-k | unbiased scores, normalised, x scale | `gate.bias` (selection only) |
| DeepseekV4Hash | DeepSeek-V4 first layers | `tid2eid[token]` table | scores of the table's experts | none: a bias does nothing here |
| MiniMaxM2 | MiniMax-M2 | sigmoid + block's bias, top-k | unbiased sigmoid, normalised | block `e_score_correction_bias` (selection only) |
| Ernie | ERNIE-4.5 | softmax + `moe_statics` bias, top-k | unbiased probs, normalised | `moe_statics.e_score_correction_bias` (selection only) |
| GptOss | gpt-oss | top-k of logits (bias added to logits) | softmax over the k logits | `router.bias`, switch-off only (it is in the logits) |
| DeepseekV2 | DeepSeek-V2 | softmax, greedy / group-limited greedy | probs x scale | none |
| Mixtral | Mixtral | softmax, top-k | renormalised | none |
| QwenStyle | Qwen2/3-MoE, Qwen3-Next, Qwen3.5-MoE, OLMoE | softmax, top-k | renormalised per config | none |
| Llama4 | Llama-4 | top-k of logits | sigmoid of the logit, [T, E] scores | none |
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from chimera.errors import ChimeraError

#: selection bias of a switched-off / forced-on expert (also what `chimera tune` persists). Exact in float32 and
#: float16; -1e4 rounds to -9984 in bfloat16. Far beyond any trained bias or selection score (O(1)-O(10)).
OFF_BIAS = -1.0e4
ON_BIAS = 1.0e4


class RouterAdapter:
    """Base class: wraps one router module (and its MoE block) and re-runs its selection with masks.

    `select` works on canonical `(weights [T, k], index [T, k])`; `logits`/`pack`/`read` translate from and to the
    router's own output format (most routers return `(logits, weights, index)`).
    """

    kind = "?"
    #: where a persisted switch lives: "selection" (a bias used only to rank experts), "logits" (a bias added to
    #: the logits: switching off is exact, forcing on is not), or None (no bias: nothing to persist)
    bias_kind: str | None = None
    #: True where selection is a token table, not a ranking (DeepSeek-V4 hash layers)
    table_routed = False

    def __init__(self, module: nn.Module, block: nn.Module | None = None):
        self.module = module
        self.block = block

    @property
    def num_experts(self) -> int:
        return int(self.module.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.module.top_k)

    #: the bias's attribute path on the router (or, with bias_on_block, on the MoE block)
    bias_attr: str | None = None
    bias_on_block = False

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias tensor a live `replace` writes and `tune` persists (None where there is none)."""
        if self.bias_attr is None:
            return None
        obj = self.block if self.bias_on_block else self.module
        for part in self.bias_attr.split("."):
            obj = getattr(obj, part)
        return obj

    # ------------------------------------------------------------------ the router's output format
    def logits(self, output, args=()) -> torch.Tensor:
        return output[0]

    def pack(self, output, weights: torch.Tensor, index: torch.Tensor):
        return (output[0], weights, index) + tuple(output[3:])

    def read(self, output, args=()) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [T, k], weights [T, k]) of a router output (after any switch hook)."""
        return output[2], output[1]

    def select(self, router_logits: torch.Tensor, off: torch.Tensor | None = None, force: torch.Tensor | None = None,
               mode: str = "replace", args=()) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(top_k_weights, top_k_index)` for `router_logits` [T, E] under the masks."""
        raise NotImplementedError

    def check_masks(self, off: torch.Tensor | None, force: torch.Tensor | None, mode: str, where: str) -> None:
        n_off = int(off.sum()) if off is not None else 0
        n_force = int(force.sum()) if force is not None else 0
        if self.table_routed and (n_force or (n_off and mode == "replace")):
            raise ChimeraError(f"{where} routes by a token table (tid2eid), not by scores: experts can't be replaced "
                               f"or forced there (use mode drop, or a later layer)")
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


def _biased(bias: torch.Tensor, off, force, mode) -> torch.Tensor:
    """A selection bias with switched-off experts at OFF_BIAS and forced ones at ON_BIAS (what `tune` writes)."""
    if off is not None and mode == "replace":
        bias = bias.masked_fill(off.view(bias.shape) if bias.dim() > 1 else off, OFF_BIAS)
    if force is not None:
        bias = bias.masked_fill(force.view(bias.shape) if bias.dim() > 1 else force, ON_BIAS)
    return bias


def _masked_topk(choice: torch.Tensor, k: int, off, force, mode, sorted: bool = True):
    """topk of `choice` [T, E] with replace-off experts at -inf and forced ones at +inf (unchanged without masks)."""
    if (off is not None and mode == "replace") or force is not None:
        if off is not None and mode == "replace":
            choice = choice.masked_fill(off, float("-inf"))
        if force is not None:
            choice = choice.masked_fill(force, float("inf"))
    return torch.topk(choice, k, dim=-1, sorted=sorted)


# ---------------------------------------------------------------------------------------------- DeepSeek family
class NoAuxTcAdapter(RouterAdapter):
    """`noaux_tc` (DeepSeek-V3/V3.2, Kimi K2, GLM-4.5, dots1): sigmoid scores, + e_score_correction_bias for
    selection, group top-2-sum, topk_group groups, top-k, unbiased weights normalised (norm_topk_prob) and
    multiplied by routed_scaling_factor."""

    kind = "noaux_tc"
    bias_kind = "selection"
    bias_attr = "e_score_correction_bias"

    def check_masks(self, off, force, mode, where):
        super().check_masks(off, force, mode, where)
        m = self.module
        if force is not None and bool(force.any()):
            groups = force.view(m.num_group, -1).any(dim=-1)
            if int(groups.sum()) > m.topk_group:
                raise ChimeraError(f"{where}: forced experts span {int(groups.sum())} groups but only "
                                   f"topk_group={m.topk_group} groups are kept per token")

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        n_group, per_group = m.num_group, m.num_experts // m.num_group
        scores = router_logits.sigmoid()
        # A switch sets the expert's selection bias to OFF_BIAS / ON_BIAS (-1e4 / +1e4; sigmoid scores lie in
        # (0, 1)), exactly what a persisted `tune` writes to the checkpoint, so live and persisted switches give
        # bit-identical results; it ranks the expert last / first, like -inf / +inf would.
        scores_for_choice = scores + _biased(m.e_score_correction_bias, off, force, mode)
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


class DeepseekV2Adapter(RouterAdapter):
    """DeepSeek-V2: softmax scores; `greedy` top-k or `group_limited_greedy` (groups ranked by their best score,
    the others zeroed); weights are the probabilities x routed_scaling_factor (no renormalisation)."""

    kind = "deepseek_v2"

    def check_masks(self, off, force, mode, where):
        super().check_masks(off, force, mode, where)
        m = self.module
        if force is not None and bool(force.any()) and m.topk_method == "group_limited_greedy":
            groups = force.view(m.num_group, -1).any(dim=-1)
            if int(groups.sum()) > m.topk_group:
                raise ChimeraError(f"{where}: forced experts span {int(groups.sum())} groups but only "
                                   f"topk_group={m.topk_group} groups are kept per token")

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        group_limited = m.topk_method == "group_limited_greedy"
        if (off is None or mode != "replace") and force is None:  # the router's own code path
            if group_limited:
                scores = scores.masked_fill(~self._group_mask(scores), 0.0)
            topk_weights, topk_indices = torch.topk(scores, k=m.top_k, dim=-1, sorted=False)
        else:
            choice = scores
            if off is not None and mode == "replace":
                choice = choice.masked_fill(off, -1.0)     # below any probability
            if force is not None:
                choice = choice.masked_fill(force, 2.0)    # above any probability
            if group_limited:
                choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
            topk_indices = torch.topk(choice, k=m.top_k, dim=-1, sorted=False)[1]
            topk_weights = scores.gather(1, topk_indices)
        topk_weights = topk_weights * m.routed_scaling_factor
        if off is not None and mode == "drop":
            topk_weights = _drop(topk_weights, topk_indices, off)
        return topk_weights, topk_indices

    def _group_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """[T, E] bool: the experts of each token's topk_group best groups (a group ranks by its best score)."""
        m = self.module
        per = m.num_experts // m.num_group
        group_scores = scores.view(-1, m.num_group, per).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=m.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        return group_mask.unsqueeze(-1).expand(-1, m.num_group, per).reshape(-1, m.num_experts).bool()


class DeepseekV4Adapter(RouterAdapter):
    """DeepSeek-V4 top-k layers: scores = score_fn(logits) (sqrtsoftplus), + bias for selection, top-k, unbiased
    scores normalised and multiplied by routed_scaling_factor."""

    kind = "deepseek_v4"
    bias_kind = "selection"
    bias_attr = "e_score_correction_bias"

    def _choose(self, scores, off, force, mode, args) -> torch.Tensor:
        m = self.module
        return torch.topk(scores + _biased(m.e_score_correction_bias, off, force, mode), m.top_k, dim=-1,
                          sorted=False).indices

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        scores = m.score_fn(router_logits)
        indices = self._choose(scores, off, force, mode, args)
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * m.routed_scaling_factor
        if off is not None and mode == "drop":
            weights = _drop(weights, indices, off)
        return weights, indices


class DeepseekV4HashAdapter(DeepseekV4Adapter):
    """DeepSeek-V4 hash layers: the experts of a token are `tid2eid[token_id]`, a fixed table; the learned gate only
    weights them (as in the top-k layers). Only `drop` switches apply (a bias or a ranking has nothing to act on)."""

    kind = "deepseek_v4_hash"
    bias_kind = None
    bias_attr = None
    table_routed = True

    def _choose(self, scores, off, force, mode, args) -> torch.Tensor:
        input_ids = args[1] if len(args) > 1 else None
        if input_ids is None:
            raise ChimeraError("a DeepSeek-V4 hash-routed layer needs the token ids (call the model with input_ids)")
        return self.module.tid2eid[input_ids.reshape(-1)].long()


class MiniMaxM2Adapter(RouterAdapter):
    """MiniMax-M2: sigmoid of float32 logits + the MoE block's e_score_correction_bias for selection, top-k,
    unbiased sigmoid weights normalised."""

    kind = "minimax_m2"
    bias_kind = "selection"
    bias_attr = "e_score_correction_bias"
    bias_on_block = True

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        bias = args[1] if len(args) > 1 else self.block.e_score_correction_bias
        routing_weights = nn.functional.sigmoid(router_logits.float())
        scores_for_choice = routing_weights + _biased(bias, off, force, mode)
        _, top_k_index = torch.topk(scores_for_choice, m.top_k, dim=-1, sorted=False)
        top_k_weights = routing_weights.gather(1, top_k_index)
        top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
        if off is not None and mode == "drop":
            top_k_weights = _drop(top_k_weights, top_k_index, off)
        return top_k_weights, top_k_index


class ErnieAdapter(RouterAdapter):
    """ERNIE-4.5: softmax in float32, + moe_statics.e_score_correction_bias for selection, top-k, unbiased
    probabilities normalised (sum clamped at moe_norm_min), cast to the hidden states' dtype."""

    kind = "ernie4_5_moe"
    bias_kind = "selection"
    bias_attr = "moe_statics.e_score_correction_bias"

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        routing_weights = nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
        bias = _biased(m.moe_statics.e_score_correction_bias, off, force, mode)
        _, selected = torch.topk(routing_weights + bias.squeeze(), m.top_k, dim=-1)
        routing_weights = torch.gather(routing_weights, dim=-1, index=selected)
        routing_weights = routing_weights / torch.clamp(routing_weights.sum(dim=-1, keepdim=True), min=m.norm_min)
        if off is not None and mode == "drop":
            routing_weights = _drop(routing_weights, selected, off)
        dtype = args[0].dtype if args else router_logits.dtype
        return routing_weights.to(dtype), selected


# ---------------------------------------------------------------------------------------------- softmax families
class MixtralAdapter(RouterAdapter):
    """softmax in float32, top-k, always renormalised; weights stay float32."""

    kind = "mixtral"

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
        if (off is None or mode != "replace") and force is None:
            top_value, indices = torch.topk(router_probs, m.top_k, dim=-1)
        else:
            indices = _masked_topk(router_probs, m.top_k, off, force, mode)[1]
            top_value = router_probs.gather(1, indices)
        top_value /= top_value.sum(dim=-1, keepdim=True)
        if off is not None and mode == "drop":
            top_value = _drop(top_value, indices, off)
        return top_value, indices


class QwenStyleAdapter(RouterAdapter):
    """Qwen2-MoE / Qwen3-MoE / Qwen3-Next / Qwen3.5-MoE / OLMoE: softmax in float32, top-k, renormalised with
    norm_topk_prob (Qwen3.5-MoE: always), weights cast back to the logits' dtype."""

    kind = "qwen_moe"

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        m = self.module
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        if (off is None or mode != "replace") and force is None:
            top_value, indices = torch.topk(router_probs, m.top_k, dim=-1)
        else:
            indices = _masked_topk(router_probs, m.top_k, off, force, mode)[1]
            top_value = router_probs.gather(1, indices)
        if getattr(m, "norm_topk_prob", True):
            top_value /= top_value.sum(dim=-1, keepdim=True)
        if off is not None and mode == "drop":
            top_value = _drop(top_value, indices, off)
        return top_value.to(router_logits.dtype), indices


class GptOssAdapter(RouterAdapter):
    """gpt-oss: top-k of the logits (router bias included), softmax over the k chosen logits. Its bias is added to
    the logits: a large negative bias switches an expert off exactly (it never reaches the top-k softmax), while a
    large positive one would also give it all the weight, so `tune` persists switch-offs only."""

    kind = "gpt_oss"
    bias_kind = "logits"
    bias_attr = "bias"

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        top_value, indices = _masked_topk(router_logits, self.module.top_k, off, force, mode)
        if (off is not None and mode == "replace") or force is not None:
            top_value = router_logits.gather(1, indices)
        weights = torch.nn.functional.softmax(top_value, dim=1, dtype=top_value.dtype)
        if off is not None and mode == "drop":
            weights = _drop(weights, indices, off)
        return weights, indices


#: router module -> (scores, index) of the last output a Llama-4 switch hook packed (read by capture hooks)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Llama4Adapter(RouterAdapter):
    """Llama-4: top-k of the logits; the router returns `(scores [T, E], logits)` with scores = sigmoid(logit) at
    the chosen experts and 0 elsewhere. `drop` zeroes the expert's score (its input is scaled by it)."""

    kind = "llama4"

    def logits(self, output, args=()):
        return output[1]

    def pack(self, output, weights, index):
        scores = torch.zeros_like(output[0]).scatter_(1, index, weights.to(output[0].dtype))
        _PACKED[self.module] = (scores, index)  # a dropped expert scores 0 like an unchosen one: keep the choice
        return (scores,) + tuple(output[1:])

    def read(self, output, args=()):
        scores = output[0]
        packed = _PACKED.get(self.module)
        if packed is not None and packed[0] is scores:
            index = packed[1]
        else:
            index = torch.topk(scores, self.top_k, dim=1).indices
        return index, scores.gather(1, index)

    def select(self, router_logits, off=None, force=None, mode="replace", args=()):
        top_value, indices = _masked_topk(router_logits, self.module.top_k, off, force, mode)
        if (off is not None and mode == "replace") or force is not None:
            top_value = router_logits.gather(1, indices)
        # the router's own arithmetic: scatter into -inf, sigmoid in float32, back to the logits' dtype
        full = torch.full_like(router_logits, float("-inf")).scatter_(1, indices, top_value)
        weights = torch.nn.functional.sigmoid(full.float()).to(full.dtype).gather(1, indices)
        if off is not None and mode == "drop":
            weights = weights.masked_fill(off[indices], 0.0)  # k is 1 in Llama-4: nothing to rescale
        return weights, indices


#: router class name -> adapter (the names of transformers' router modules; subclasses match by name too)
ADAPTERS: dict[str, type[RouterAdapter]] = {
    "DeepseekV3TopkRouter": NoAuxTcAdapter,
    "DeepseekV32TopkRouter": NoAuxTcAdapter,
    "Glm4MoeTopkRouter": NoAuxTcAdapter,
    "Dots1TopkRouter": NoAuxTcAdapter,
    "DeepseekV2TopkRouter": DeepseekV2Adapter,
    "DeepseekV4TopKRouter": DeepseekV4Adapter,
    "DeepseekV4HashRouter": DeepseekV4HashAdapter,
    "MiniMaxM2TopKRouter": MiniMaxM2Adapter,
    "Ernie4_5_MoeTopKRouter": ErnieAdapter,
    "GptOssTopKRouter": GptOssAdapter,
    "Llama4Router": Llama4Adapter,
    "MixtralTopKRouter": MixtralAdapter,
    "Qwen2MoeTopKRouter": QwenStyleAdapter,
    "Qwen3MoeTopKRouter": QwenStyleAdapter,
    "Qwen3NextTopKRouter": QwenStyleAdapter,
    "Qwen3_5MoeTopKRouter": QwenStyleAdapter,
    "OlmoeTopKRouter": QwenStyleAdapter,
}
SUPPORTED = tuple(sorted(ADAPTERS))


def adapter_class(router_class_name: str) -> type[RouterAdapter] | None:
    return ADAPTERS.get(router_class_name)


def adapter_for(module: nn.Module, block: nn.Module | None = None) -> RouterAdapter | None:
    """The adapter for a router module (its class or a base class known by name), or None."""
    for klass in type(module).__mro__:
        cls = ADAPTERS.get(klass.__name__)
        if cls is not None:
            return cls(module, block)
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

    Raises ChimeraError (one line) when the model has no MoE router or a router without an adapter.
    """
    from chimera.checkpoint.arch import moe_blocks

    try:
        blocks = moe_blocks(model)
    except ChimeraError:
        blocks = {}
    if not blocks:
        raise ChimeraError(f"unknown architecture: {_describe(model)} has no MoE router "
                           f"(supported routers: {', '.join(SUPPORTED)})")
    modules = dict(model.named_modules())
    layers: dict[int, MoELayer] = {}
    for L, b in blocks.items():
        adapter = adapter_for(modules[b.router], modules[b.path])
        if adapter is None:
            raise ChimeraError(f"{_describe(model)}: no router adapter for {b.router_class} (layer {L}); "
                               f"supported routers: {', '.join(SUPPORTED)}")
        layers[L] = MoELayer(L, b.router, adapter)
    return layers


def num_decoder_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if n is None and config is not None and hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
    return int(n) if n is not None else None
