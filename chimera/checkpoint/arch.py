"""Architecture knowledge, derived from transformers' own model classes (never hand-written per model).

For a checkpoint's `config.json` the model class transformers would use is built on the meta device (no
weights, no remote code: `auto_map` is ignored and only classes inside transformers are used). Every
on-disk tensor name is then mapped to the in-memory parameter it loads into with transformers' own
checkpoint-conversion rules (the renames and expert fusions `from_pretrained` applies, e.g.
`block_sparse_moe.experts.3.w1.weight` -> `mlp.experts.gate_up_proj`, DeepSeek-V4's `ffn.gate.bias` ->
`mlp.gate.e_score_correction_bias`), and its class is read off the module that owns that parameter:

    embed / lm_head      the model's input / output embeddings
    routed_experts       under an MoE block's `experts` module (per-expert or fused `[E, ...]` tensors)
    router               the MoE block's child holding an `[E, hidden]` weight (gate / router) and the block's
                         own `[E]` tensors (MiniMax keeps its selection bias on the block)
    shared_experts       everything else in an MoE block (shared expert(s), `shared_expert_gate`)
    indexer              a module whose class name says Indexer (DeepSeek-V3.2/V4 sparse-attention indexer)
    linear_attention     a linear-time token mixer (Qwen3-Next / Qwen3.5 `linear_attn` GatedDeltaNet, Mamba)
    hyper_connection     DeepSeek-V4's manifold-constrained hyper-connections (`hc_*`)
    norm                 any normalization module (outside indexer and linear-attention blocks, which own theirs)
    attention            the attention token mixer (incl. sinks, q/k norms' siblings, compressors)
    dense_mlp            a dense decoder-layer MLP
    mtp                  multi-token-prediction tensors transformers does not build (`model.layers.{n}.enorm`,
                         `mtp.fc`, ...); an MTP layer's attention / router / experts keep their role's class,
                         found by analogy with a decoder layer
    vision               anything outside the text decoder (vision tower, projector of a VLM)

Why derived rather than tables: the names on disk are whatever transformers' loader accepts, which the
library itself defines per model (and keeps current); a table per architecture would duplicate that and
drift. The price: the derivation needs torch + transformers (both core dependencies, 4-8 s to import and
build); planning reads its answers from a cache (`archcache.py`) and runs it only for names it hasn't seen.
Names transformers does not load (MTP, quantization companions) need the rules above.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

from chimera.errors import ChimeraError

CLASSES = ("embed", "lm_head", "norm", "attention", "linear_attention", "indexer", "dense_mlp", "router",
           "shared_experts", "routed_experts", "hyper_connection", "mtp", "vision")

# The one vocabulary of module class-name words the classification relies on (first match wins, innermost
# module first for norms; any ancestor for the block kinds).
_BLOCK_WORDS = (("Indexer", "indexer"), ("GatedDeltaNet", "linear_attention"), ("LinearAttention", "linear_attention"),
                ("Mamba", "linear_attention"),
                ("HyperConnection", "hyper_connection"), ("HyperHead", "hyper_connection"))
_NORM_WORDS = ("Norm",)
_ATTENTION_WORDS = ("Attention", "Attn")
_MLP_WORDS = ("MLP", "Mlp", "FeedForward")
_MTP_RE = re.compile(r"(?:^|\.)mtp\.(?:layers\.)?(\d+)\.(.*)")
_EXPERT_INDEX_RE = re.compile(r"(?:^|\.)experts\.(\d+)\.")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: config.json keys that hold the number of routed experts per MoE layer (ERNIE: moe_num_experts)
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
_CONFIG_DROP = ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version",
                "_name_or_path", "compression_config")


@dataclass(frozen=True)
class Role:
    """What one on-disk tensor is."""

    cls: str
    layer: int | None = None      # decoder layer index (an MTP layer: its index on disk, or n + k for `mtp.k`)
    expert: int | None = None     # routed expert index of a per-expert tensor
    fused: bool = False           # a routed-experts tensor holding every expert along axis 0
    memory: str | None = None     # the in-memory parameter it loads into (None for MTP-only tensors)


@dataclass(frozen=True)
class ExpertSlice:
    name: str                     # logical on-disk tensor
    axis: int | None              # None: the whole tensor belongs to the expert; 0: fused, the expert's index


@dataclass(frozen=True)
class RouterTensor:
    name: str                     # logical on-disk tensor
    axis: int | None              # the axis indexing experts; None: values are expert ids (a token table)


@dataclass
class MoEBlock:
    """One MoE layer of the in-memory model."""

    layer: int
    path: str                     # module path of the MoE block, e.g. model.layers.3.mlp
    num_experts: int
    router: str                   # module path of the router (gate / router)
    router_class: str             # its class name, e.g. DeepseekV3TopkRouter
    experts: str                  # module path of the experts module


@dataclass
class Arch:
    """Architecture knowledge for one config: built once per config (cached), shared by merge and MoTE."""

    model_type: str
    model_class: str
    n_layers: int
    layers_path: str                                   # e.g. model.layers
    moe: dict[int, MoEBlock] = field(default_factory=dict)
    _classes: dict[str, str] = field(default_factory=dict, repr=False)      # in-memory tensor -> class
    _shapes: dict[str, tuple] = field(default_factory=dict, repr=False)
    _state: dict = field(default_factory=dict, repr=False)                  # in-memory name -> meta tensor
    _rename: object = field(default=None, repr=False)                       # disk name -> in-memory name
    _cache: dict = field(default_factory=dict, repr=False)
    model: object = field(default=None, repr=False)    # the meta-device model (structure only, no weights)

    # ------------------------------------------------------------------ names
    def memory_name(self, name: str) -> str | None:
        """The in-memory parameter/buffer an on-disk tensor loads into, or None."""
        mem = self._rename(name)
        if mem in self._classes:
            return mem
        return name if name in self._classes else None  # written by save_pretrained, not renamed back on load

    def role(self, name: str) -> Role | None:
        """Class, layer and expert of a logical on-disk tensor name (quantization companions removed)."""
        m = _EXPERT_INDEX_RE.search(name)
        key = name if m is None else name[: m.start(1)] + "#" + name[m.end(1):]
        if key not in self._cache:
            self._cache[key] = self._role(name)
        r = self._cache[key]
        if r is not None and m is not None and r.cls == "routed_experts":
            r = Role(r.cls, r.layer, int(m.group(1)), False, r.memory)
        return r

    def _role(self, name: str) -> Role | None:
        mem = self.memory_name(name)
        if mem is not None:
            cls = self._classes[mem]
            lm = _LAYER_RE.search(mem) if mem.startswith(self.layers_path + ".") else None
            layer = int(lm.group(1)) if lm else None
            fused = cls == "routed_experts" and _EXPERT_INDEX_RE.search(name) is None
            return Role(cls, layer, None, fused, mem)
        return self._mtp_role(name)

    def _mtp_role(self, name: str) -> Role | None:
        """A tensor of a multi-token-prediction layer transformers does not build, classed by analogy."""
        m = _MTP_RE.search(name)
        if m is None and re.search(r"(?:^|\.)mtp\.", name):
            return Role("mtp", self.n_layers)  # Qwen3-Next / Qwen3.5 `mtp.fc`, `mtp.norm`, ...
        if m is not None:
            layer, rest, prefix = self.n_layers + int(m.group(1)), m.group(2), name[: m.start()]
        else:
            lm = _LAYER_RE.search(name)
            if lm is None or int(lm.group(1)) < self.n_layers:
                return None
            layer, rest, prefix = int(lm.group(1)), name[lm.end():], name[: lm.start()]
        lead = (prefix + ".") if prefix else ""
        cands = [f"{lead}layers.{{L}}.{rest}", f"{self.layers_path}.{{L}}.{rest}", f"layers.{{L}}.{rest}"]
        for L in sorted(self.moe, reverse=True) + [L for L in range(self.n_layers - 1, -1, -1) if L not in self.moe]:
            for c in cands:
                mem = self.memory_name(c.format(L=L))
                if mem is not None:
                    cls = self._classes[mem]
                    if cls in ("norm",):
                        return Role("mtp", layer)  # the MTP layer's own norms travel with it
                    fused = cls == "routed_experts" and _EXPERT_INDEX_RE.search(name) is None
                    return Role(cls, layer, None, fused, None)
        return Role("mtp", layer)

    # ------------------------------------------------------------------ experts (merge overrides, pruning)
    def num_experts(self, layer: int) -> int:
        """Routed experts of an MoE layer (an MTP layer: those of the last MoE layer)."""
        return self.moe[layer if layer in self.moe else max(self.moe)].num_experts

    def expert_tensors(self, names, layer: int, expert: int) -> list[ExpertSlice]:
        """The logical on-disk tensors holding routed expert `expert` of `layer`: per-expert tensors whole
        (axis None), fused `[E, ...]` tensors at index `expert` of axis 0. Every stored part of a logical tensor
        (`formats.group`) follows it: FP8 scales, MXFP4 blocks/scales and INT4 companions index experts alike."""
        out = []
        for n in names:
            r = self.role(n)
            if r is not None and r.cls == "routed_experts" and r.layer == layer and (r.fused or r.expert == expert):
                out.append(ExpertSlice(n, 0 if r.fused else None))
        return out

    def router_tensors(self, names, layer: int) -> list[RouterTensor]:
        """The router tensors of `layer` and the axis of each that indexes experts (None: the tensor's values
        are expert ids, DeepSeek-V4's `tid2eid` token table)."""
        out = []
        E = self.num_experts(layer)
        for n in names:
            r = self.role(n)
            if r is None or r.cls != "router" or r.layer != layer:
                continue
            t = self._state.get(r.memory) if r.memory else None
            if t is not None and not t.is_floating_point():
                out.append(RouterTensor(n, None))
                continue
            shape = self._shapes.get(r.memory) if r.memory else None
            out.append(RouterTensor(n, shape.index(E) if shape and E in shape else 0))
        return out


def _words(obj: object, words: tuple[str, ...]) -> bool:
    n = type(obj).__name__
    return any(w in n for w in words)


def _resolve_classes(config: dict):
    """(transformers config object, model class) for a config.json mapping. Never runs remote code."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = config.get("model_type")
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    lib_cls = next((getattr(transformers, a) for a in archs if isinstance(getattr(transformers, a, None), type)), None)
    if mt in CONFIG_MAPPING:
        cfg_cls = CONFIG_MAPPING[mt]
    elif lib_cls is not None and getattr(lib_cls, "config_class", None) is not None:
        cfg_cls = lib_cls.config_class  # e.g. kimi_k2: architectures DeepseekV3ForCausalLM, its own model_type
    else:
        raise ChimeraError(f"unknown architecture model_type {mt!r}: transformers {transformers.__version__} has no "
                           f"such model and chimera never runs a checkpoint's own code (auto_map)")
    kwargs = {k: v for k, v in config.items() if k not in _CONFIG_DROP}
    try:
        cfg = cfg_cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - a config transformers rejects
        raise ChimeraError(f"config.json: transformers' {cfg_cls.__name__} rejects it "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if lib_cls is not None and getattr(lib_cls, "config_class", None) is cfg_cls:
        return cfg, lib_cls
    autos = [transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText]
    if getattr(cfg, "vision_config", None) is not None:  # an image-text release: its files hold the vision tower
        autos.reverse()
    for auto in autos:
        try:
            return cfg, auto._model_mapping[type(cfg)]
        except KeyError:
            continue
    raise ChimeraError(f"model_type {mt!r}: transformers has no causal-LM class for {cfg_cls.__name__}")


def model_class(config: dict):
    """(transformers config object, model class) to load a checkpoint with transformers' own code: the class its
    `architectures` names when transformers has it, else the causal-LM (or, with a vision tower, image-text)
    class of its model type. Kimi K2's own `model_type` gets DeepseekV3's config, whose model type picks the
    right weight-name conversions when loading. Never runs remote code."""
    return _resolve_classes(config)


def _build(config: dict) -> Arch:
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    from transformers.utils import logging as hf_logging

    cfg, cls = _resolve_classes(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = cls._from_config(cfg)
        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except ChimeraError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers refusing this config
        raise ChimeraError(f"model_type {config.get('model_type')!r}: transformers cannot build {cls.__name__} from "
                           f"config.json ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = dict(model.state_dict(keep_vars=True))
    prefix = model.base_model_prefix

    def rename(name: str) -> str:
        try:
            return rename_source_key(name, renamings, converters, prefix, state)[0]
        except Exception:  # noqa: BLE001 - a name transformers' rules can't handle is simply unknown
            return name

    modules = dict(model.named_modules())
    dec_path, layers_path, n_layers = decoder_layers(model)
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    arch = Arch(str(config.get("model_type")), cls.__name__, n_layers, layers_path, _rename=rename)
    arch.moe = moe_blocks(model, layers_path)
    arch.model = model
    arch._state = state
    moe_paths = {b.path: b for b in arch.moe.values()}

    for name, t in state.items():
        owner_path = name.rsplit(".", 1)[0] if "." in name else ""
        arch._shapes[name] = tuple(t.shape)
        arch._classes[name] = _classify(name, owner_path, modules, emb_in, emb_out, dec_path, layers_path, moe_paths)
    return arch


def decoder_layers(model) -> tuple[str, str, int]:
    """(decoder module path, decoder-layers ModuleList path, number of layers) of a transformers model."""
    import torch

    modules = dict(model.named_modules())
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    dec_path = next(n for n, m in modules.items() if m is decoder)
    inside = [n for n, m in modules.items() if isinstance(m, torch.nn.ModuleList) and n.rsplit(".", 1)[-1] == "layers"
              and (dec_path == "" or n.startswith(dec_path + "."))]
    if not inside:
        raise ChimeraError(f"{type(model).__name__}: no decoder layers found")
    layers_path = min(inside, key=len)
    return dec_path, layers_path, len(modules[layers_path])


def moe_blocks(model, layers_path: str | None = None) -> dict[int, MoEBlock]:
    """Every MoE block of a model (meta or loaded), by decoder layer: a module with an `experts` child whose
    sibling holding an `[E, hidden]` weight is the router."""
    import torch

    if layers_path is None:
        layers_path = decoder_layers(model)[1]
    out: dict[int, MoEBlock] = {}
    for path, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if not isinstance(experts, torch.nn.Module) or not path.startswith(layers_path + "."):
            continue
        E = _num_experts(experts)
        router = next(((n, c) for n, c in mod.named_children() if c is not experts and any(
            p.dim() == 2 and p.shape[0] == E for p in c.parameters(recurse=False))), None)
        if router is None:
            continue
        layer = int(path[len(layers_path) + 1:].split(".", 1)[0])
        out[layer] = MoEBlock(layer, path, E, f"{path}.{router[0]}", type(router[1]).__name__, f"{path}.experts")
    return dict(sorted(out.items()))


def _num_experts(experts) -> int:
    import torch

    if isinstance(experts, torch.nn.ModuleList):
        return len(experts)
    n = getattr(experts, "num_experts", None)
    if isinstance(n, int):
        return n
    return max(p.shape[0] for p in experts.parameters(recurse=False) if p.dim() >= 3)


def _classify(name, owner_path, modules, emb_in, emb_out, dec_path, layers_path, moe_paths) -> str:
    owner = modules[owner_path]
    if owner is emb_out:
        return "lm_head"
    if owner is emb_in:
        return "embed"
    if dec_path and not (owner_path == dec_path or owner_path.startswith(dec_path + ".")):
        return "vision"
    parts = owner_path.split(".") if owner_path else []
    ancestors = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]   # innermost first
    for a in ancestors:
        for word, cls in _BLOCK_WORDS:
            if _words(modules[a], (word,)):
                return cls
    for a in ancestors:
        if a in moe_paths:
            b = moe_paths[a]
            if owner_path == b.experts or owner_path.startswith(b.experts + "."):
                return "routed_experts"
            if owner_path == b.router or owner_path.startswith(b.router + "."):
                return "router"
            if owner_path == a:  # the block's own tensors: MiniMax's selection bias [E]
                return "router"
            return "shared_experts"
    if _words(owner, _NORM_WORDS):
        return "norm"
    in_layer = owner_path.startswith(layers_path + ".")
    for a in ancestors:
        if _words(modules[a], _ATTENTION_WORDS):
            return "attention"
        if in_layer and _words(modules[a], _MLP_WORDS):
            return "dense_mlp"
    return "other"


@functools.lru_cache(maxsize=16)
def _cached(key: str) -> Arch:
    return _build(json.loads(key))


def of(config: dict) -> Arch:
    """The architecture knowledge for a config.json mapping (cached per config)."""
    return _cached(json.dumps(config, sort_keys=True, default=str))


def expert_count_keys(config: dict) -> list[str]:
    """The config.json key(s) holding the number of routed experts (what pruning rewrites)."""
    return [k for k in EXPERT_COUNT_KEYS if isinstance(config.get(k), int)]


def supported(config: dict | str) -> bool:
    """Whether chimera can derive this architecture (transformers builds it and it has MoE layers)."""
    if isinstance(config, str):
        config = {"model_type": config}
    try:
        return bool(of(config).moe)
    except ChimeraError:
        return False


def classify(name: str, config: dict) -> str | None:
    """The class of a logical on-disk tensor name, or None if the architecture has no such tensor."""
    r = of(config).role(name)
    if r is None or r.cls == "other":
        return None
    return r.cls
