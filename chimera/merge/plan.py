"""The merge plan: for every output tensor, its sources, lambdas and operation, grouped per shard.

Decided from the recipe and the parents' safetensors headers alone (no tensor data is read), so a
plan is cheap, printable (`chimera plan`) and serializable: each `ShardJob` names file paths and byte
ranges only, and can run in a thread, a process or on another machine sharing the filesystem.

Operations on one output tensor t (parents P_i, base B, lambda_i from the tensor's class or override):

    copy  one lambda is 1 and the stored format is kept: the stored bytes (FP8 weight + its scale)
          are copied verbatim, bit-exact
    cast  one lambda is 1 but the output format differs: dequantize/convert, then encode
    mix   W_t = sum_i lambda_i * W_t(P_i) in float32, then encode (re-quantize per 128x128 block
          for FP8); with a threshold, W_t = W_t(B) instead where max_i d(P_i, B) < delta
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from chimera.checkpoint import arch
from chimera.checkpoint.files import Checkpoint, TensorInfo, scale_name
from chimera.checkpoint.fp8 import scale_shape
from chimera.checkpoint.writer import Slot
from chimera.errors import ChimeraError
from chimera.merge.recipe import Recipe, Threshold

FLOAT_TAGS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
OUT_TAG = {"bfloat16": "BF16", "float32": "F32"}
FP8_CLASSES = {"attention", "dense_mlp", "shared_experts", "routed_experts"}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@dataclass(frozen=True)
class Source:
    """One parent's stored copy of a tensor: the weight's bytes and, for FP8, its scale's."""

    parent: str
    weight: TensorInfo
    scale: TensorInfo | None
    block: int = 128


@dataclass(frozen=True)
class Item:
    """One output tensor: what is computed and from which bytes."""

    name: str
    cls: str | None
    op: str                              # copy | cast | mix
    lambdas: tuple[tuple[str, float], ...]
    sources: tuple[Source, ...]          # the parents with lambda > 0 (and the base, with a threshold)
    base: str
    dtype: str                           # output safetensors tag of the weight
    shape: tuple[int, ...]
    fp8_out: bool = False                # write an FP8 weight + weight_scale_inv
    ue8m0: bool = False
    block: int = 128
    threshold: Threshold | None = None

    def slots(self) -> list[Slot]:
        s = [Slot(self.name, self.dtype, self.shape)]
        if self.fp8_out:
            s.append(Slot(scale_name(self.name), "F32", scale_shape(self.shape, self.block)))
        return s

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots())

    def source(self, parent: str) -> Source:
        return next(s for s in self.sources if s.parent == parent)


@dataclass
class ShardJob:
    """One output shard: an independent unit of work (file name, its tensors in write order)."""

    filename: str
    items: list[Item]

    def slots(self) -> list[Slot]:
        return [s for it in self.items for s in it.slots()]

    @property
    def nbytes(self) -> int:
        return sum(it.nbytes for it in self.items)


@dataclass
class Plan:
    recipe: Recipe
    arch: str
    config: dict                 # the output config.json
    jobs: list[ShardJob]
    plan_id: str
    parent_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def items(self) -> list[Item]:
        return [it for j in self.jobs for it in j.items]

    def summary(self) -> dict:
        return {"tensors": len(self.items), "ops": dict(Counter(it.op for it in self.items)),
                "shards": len(self.jobs), "output_bytes": sum(j.nbytes for j in self.jobs),
                "thresholded": sum(1 for it in self.items if it.threshold is not None)}


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _check_compatible(cks: dict[str, Checkpoint], base: str) -> None:
    """Same architecture, same tensor names, same shapes: otherwise list the first differences."""
    b = cks[base]
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "moe_intermediate_size", "n_routed_experts", "num_local_experts", "num_experts", "vocab_size")
    bl = b.logical()
    for name, ck in cks.items():
        if name == base:
            continue
        diffs = [f"{k}: {b.config.get(k)} vs {ck.config.get(k)}" for k in keys if b.config.get(k) != ck.config.get(k)]
        if diffs:
            raise ChimeraError(f"parents {base} and {name} have different architectures ({'; '.join(diffs[:3])})")
        cl = ck.logical()
        missing, extra = sorted(set(bl) - set(cl)), sorted(set(cl) - set(bl))
        if missing or extra:
            what = [f"{n} missing in {name}" for n in missing[:3]] + [f"{n} only in {name}" for n in extra[:3]]
            raise ChimeraError(f"parents {base} and {name} have different tensor names "
                               f"({len(missing)} missing, {len(extra)} extra: {'; '.join(what)})")
        shapes = [f"{n} {bl[n].shape} vs {cl[n].shape}" for n in bl if bl[n].shape != cl[n].shape]
        if shapes:
            raise ChimeraError(f"parents {base} and {name} differ in {len(shapes)} tensor shape(s): {'; '.join(shapes[:3])}")


def _out_format(recipe: Recipe, base_ck: Checkpoint, info: TensorInfo, cls: str | None) -> tuple[str, bool]:
    """(output dtype tag, FP8 output?) of one tensor."""
    if recipe.dtype == "keep":
        return info.dtype, info.dtype.startswith("F8")
    if recipe.dtype == "float8":  # DeepSeek's choice: FP8 for the big projections only
        if cls in FP8_CLASSES and len(info.shape) == 2 and info.dtype in FLOAT_TAGS:
            return "F8_E4M3", True
        return ("BF16" if info.dtype.startswith("F8") else info.dtype), False
    if info.dtype in FLOAT_TAGS:
        return OUT_TAG[recipe.dtype], False
    return info.dtype, False


def _out_config(recipe: Recipe, base_ck: Checkpoint) -> dict:
    cfg = dict(base_ck.config)
    if recipe.dtype == "float8":
        cfg["quantization_config"] = dict(base_ck.quantization or FP8_CONFIG)
    elif recipe.dtype != "keep":
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = recipe.dtype
        if "dtype" in cfg:
            cfg["dtype"] = recipe.dtype
    return cfg


def build_plan(recipe: Recipe) -> Plan:
    """Check the parents and decide, for every output tensor, its operation and sources."""
    cks = {name: Checkpoint(path) for name, path in recipe.parents.items()}
    for name, ck in cks.items():
        if not arch.of(ck.config).moe:  # one-line ChimeraError if transformers can't build it
            raise ChimeraError(f"{ck.path / 'config.json'}: model_type {ck.model_type!r} has no MoE layers")
        bm, bn = ck.block_size()
        if bm != bn:
            raise ChimeraError(f"{ck.path / 'config.json'}: non-square FP8 blocks {bm}x{bn} are not supported")
    _check_compatible(cks, recipe.base)
    base_ck = cks[recipe.base]
    logical = {n: ck.logical() for n, ck in cks.items()}
    items: list[Item] = []
    unknown: list[str] = []
    for name in sorted(logical[recipe.base]):
        info = logical[recipe.base][name]
        cls = arch.classify(name, base_ck.config)
        lams = recipe.lambdas(name, cls)
        if lams is None:
            unknown.append(name)
            continue
        dtype, fp8_out = _out_format(recipe, base_ck, info, cls)
        if info.dtype not in FLOAT_TAGS and set(lams) != {recipe.base}:
            raise ChimeraError(f"{info.file}: tensor {name} has dtype {info.dtype}, which cannot be mixed")
        threshold = recipe.threshold if (recipe.threshold and recipe.threshold.delta > 0
                                         and set(lams) != {recipe.base}) else None
        needed = set(lams) | ({recipe.base} if threshold else set())
        sources = tuple(Source(p, logical[p][name], cks[p].scale_of(name), cks[p].block_size()[0])
                        for p in cks if p in needed)
        if len(lams) == 1 and threshold is None:
            (p,) = lams
            src = logical[p][name]
            same = src.dtype == dtype and (not fp8_out or cks[p].block_size()[0] == base_ck.block_size()[0])
            op = "copy" if same else "cast"
        else:
            op = "mix"
        items.append(Item(name, cls, op, tuple(sorted(lams.items())), sources, recipe.base, dtype, info.shape,
                          fp8_out, base_ck.ue8m0, base_ck.block_size()[0] if base_ck.quantization else 128, threshold))
    if unknown:
        raise ChimeraError(f"{base_ck.path}: {len(unknown)} tensor name(s) not known for {base_ck.model_type} "
                           f"and not covered by an override: {', '.join(unknown[:3])}")
    # group into shards, in name order, each at most shard_size (a bigger tensor gets its own shard)
    groups: list[list[Item]] = [[]]
    size = 0
    for it in items:
        if groups[-1] and size + it.nbytes > recipe.shard_size:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it.nbytes
    jobs = [ShardJob(fn, g) for fn, g in zip(_shard_names(len(groups)), groups)]
    parent_bytes = {n: sum(f.stat().st_size for f in ck.files) for n, ck in cks.items()}
    ident = {"recipe": recipe.to_dict(), "chimera_plan": 1,
             "parents": {n: sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ck.files)
                         for n, ck in cks.items()}}
    plan_id = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Plan(recipe, base_ck.model_type, _out_config(recipe, base_ck), jobs, plan_id, parent_bytes)
