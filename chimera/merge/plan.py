"""The merge plan: for every output tensor, its sources, lambdas and operation, grouped per shard.

Decided from the recipe and the parents' safetensors headers alone (no tensor data is read), so a
plan is cheap, printable (`chimera plan`) and serializable: each `ShardJob` names file paths and byte
ranges only, and can run in a thread, a process or on another machine sharing the filesystem.

Operations on one output tensor t (parents P_i, base B, lambda_i from the tensor's class or override):

    copy  one lambda is 1 and the stored format is kept: the stored bytes (FP8 weight + its scale)
          are copied verbatim, bit-exact
    cast  one lambda is 1 but the output format differs: dequantize/convert, then encode
    mix   W_t = sum_i lambda_i * W_t(P_i) in float32, then encode (re-quantize per 128x128 block
          for FP8)

A selection is a copy whatever else the recipe says. With a threshold, a tensor whose parents are
all within delta of the base (max_i d(P_i, B) < delta) is the base's stored bytes instead (`base`).

Parents must agree on what a merge assumes (`recipe.AGREE_KEYS`: quantization_config and the routing
keys); a difference is refused, naming the keys, unless the recipe's `use_base_config` lists them.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chimera.checkpoint import arch
from chimera.checkpoint.files import FLOAT_TAGS, Checkpoint
from chimera.checkpoint.formats import Stored, block_format, scale_name, scale_shape
from chimera.checkpoint.writer import Slot, shard_size
from chimera.errors import ChimeraError
from chimera.merge.recipe import AGREE_KEYS, Recipe, Threshold

OUT_TAG = {"bfloat16": "BF16", "float32": "F32"}
FP8_CLASSES = {"attention", "dense_mlp", "shared_experts", "routed_experts"}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
SIDE_SKIP = {"config.json", "README.md", "chimera_merge.json", "chimera_recipe.yaml",
             "zoo.json"}  # zoo.json: a bundled model's identity, not the child's


@dataclass(frozen=True)
class Source:
    """One parent's stored copy of a tensor: the weight's bytes and its companions (FP8 scale)."""

    parent: str
    stored: Stored

    @property
    def weight(self):
        return self.stored.weight

    @property
    def scale(self):
        return self.stored.scale

    @property
    def block(self) -> int:
        return self.stored.block


@dataclass(frozen=True)
class Item:
    """One output tensor: what is computed and from which bytes.

    `op` is what happens when the tensor is merged; with a `threshold`, the tensor is the base's
    (`base_op`: a copy of its bytes, or a cast when the output format differs) where the parents'
    distance to the base is below delta.
    """

    name: str
    cls: str | None
    op: str                              # copy | cast | mix
    lambdas: tuple[tuple[str, float], ...]
    sources: tuple[Source, ...]          # every parent (distances are measured against all of them)
    base: str
    dtype: str                           # output safetensors tag of the weight
    shape: tuple[int, ...]
    fp8_out: bool = False                # write an FP8 weight + weight_scale_inv
    ue8m0: bool = False
    block: int = 128
    threshold: Threshold | None = None
    metric: str = "relative"             # distance recorded for this tensor
    base_op: str = "copy"                # copy | cast: how the base's version is written

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

    @property
    def align(self) -> int:
        """Row chunks start at multiples of this: every FP8 block size involved (output and parents)."""
        return math.lcm(self.block, *(s.block for s in self.sources if s.scale is not None))

    @property
    def others(self) -> list[Source]:
        """The non-base parents, whose distance to the base is recorded (the largest one)."""
        return [s for s in self.sources if s.parent != self.base]


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

    @property
    def file_bytes(self) -> int:
        """The shard file's size, header included."""
        return shard_size(self.slots())


@dataclass
class Plan:
    recipe: Recipe
    arch: str
    config: dict                 # the output config.json
    jobs: list[ShardJob]
    plan_id: str
    parent_bytes: dict[str, int] = field(default_factory=dict)
    resolved: dict[str, dict] = field(default_factory=dict)  # config key -> {parent: value}, child has the base's
    side_files: list[Path] = field(default_factory=list)     # copied from the base (tokenizer, ...)
    metric: str = "relative"

    @property
    def items(self) -> list[Item]:
        return [it for j in self.jobs for it in j.items]

    def summary(self) -> dict:
        """Counts and bytes. `copy_bytes` are written as stored parent bytes, `computed_bytes` are
        computed (mix, cast); a thresholded tensor counts as its merged operation here."""
        items = self.items
        copy_b = sum(it.nbytes for it in items if it.op == "copy")
        return {"tensors": len(items), "ops": dict(Counter(it.op for it in items)),
                "shards": len(self.jobs), "output_bytes": sum(j.nbytes for j in self.jobs),
                "file_bytes": sum(j.file_bytes for j in self.jobs),
                "copy_bytes": copy_b, "computed_bytes": sum(it.nbytes for it in items) - copy_b,
                "thresholded": sum(1 for it in items if it.threshold is not None)}


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _check_compatible(cks: dict[str, Checkpoint], base: str) -> None:
    """Same architecture, same tensor names, same shapes: otherwise list the first differences."""
    b = cks[base]
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "moe_intermediate_size", "num_local_experts", "num_experts", "vocab_size")
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


def _differences(a: object, b: object, key: str) -> list[str]:
    """`key` (and, for a mapping, its sub-keys) where a != b, as 'key: a vs b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"{key}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b), key=str)
                if a.get(k) != b.get(k)]
    return [f"{key}: {a!r} vs {b!r}"]


def _check_agreement(cks: dict[str, Checkpoint], recipe: Recipe) -> dict[str, dict]:
    """The AGREE_KEYS where some parent differs from the base, each {parent: value}.

    A difference is refused (naming the keys) unless the recipe resolves it: `use_base_config` lists
    the key, or, for quantization_config, the recipe sets an output dtype (every tensor is then
    written in that format, converted where it is stored otherwise).
    """
    b = cks[recipe.base]
    differ: dict[str, dict] = {}
    problems: list[str] = []
    for key in AGREE_KEYS:
        vals = {n: ck.config.get(key) for n, ck in cks.items()}
        others = [n for n, v in vals.items() if v != vals[recipe.base]]
        if not others:
            continue
        differ[key] = vals
        resolved = key in recipe.use_base_config or (key == "quantization_config" and recipe.dtype != "keep")
        if not resolved:
            problems += [f"{d} ({recipe.base} vs {n})" for n in others
                         for d in _differences(b.config.get(key), cks[n].config.get(key), key)]
    if problems:
        keys = sorted({p.split(":")[0].split(".")[0] for p in problems})
        raise ChimeraError(f"parents differ in {'; '.join(problems[:4])}: a merge assumes one value; set "
                           f"`use_base_config: [{', '.join(keys)}]` in the recipe to give the child the base's "
                           f"(tensors stored in another quantization format are then converted)")
    return differ


def _out_format(recipe: Recipe, info: Stored, cls: str | None) -> tuple[str, bool]:
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


def _stored_as_output(src: Stored, dtype: str, fp8_out: bool, block: int, ue8m0: bool) -> bool:
    """True when a parent's stored bytes are already the output's format (so a selection copies them).

    Power-of-two (ue8m0) scales are valid float scales, so they copy into a float-scale child; the
    reverse needs re-quantization."""
    if src.dtype != dtype:
        return False
    if not fp8_out:
        return src.scale is None
    return src.scale is not None and src.block == block and (src.ue8m0 or not ue8m0)


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
    """Check the parents (headers, scales, configs) and decide, for every output tensor, its operation
    and sources. Reads config files and safetensors headers only."""
    cks = {name: Checkpoint(path) for name, path in recipe.parents.items()}
    for name, ck in cks.items():
        if not arch.supported(ck.model_type):
            raise ChimeraError(f"{ck.path / 'config.json'}: unsupported architecture {ck.model_type!r} "
                               f"(supported: {', '.join(sorted(arch.TABLES))})")
    _check_compatible(cks, recipe.base)
    resolved = _check_agreement(cks, recipe)
    base_ck = cks[recipe.base]
    config = _out_config(recipe, base_ck)
    out_block, out_ue8m0 = block_format(config.get("quantization_config"), "output config")
    stored = {n: ck.stored for n, ck in cks.items()}
    metric = recipe.threshold.metric if recipe.threshold else "relative"
    items: list[Item] = []
    unknown: list[str] = []
    for name in sorted(stored[recipe.base]):
        info = stored[recipe.base][name]
        cls = arch.classify(name, base_ck.config)
        lams = recipe.lambdas(name, cls)
        if lams is None:
            unknown.append(name)
            continue
        dtype, fp8_out = _out_format(recipe, info, cls)
        if info.dtype not in FLOAT_TAGS and set(lams) != {recipe.base}:
            raise ChimeraError(f"{info.file}: tensor {name} has dtype {info.dtype}, which cannot be mixed")
        threshold = recipe.threshold if (recipe.threshold and recipe.threshold.delta > 0
                                         and set(lams) != {recipe.base}) else None
        sources = tuple(Source(p, stored[p][name]) for p in cks)
        fmt = (dtype, fp8_out, out_block, out_ue8m0)
        if len(lams) == 1:
            (p,) = lams
            op = "copy" if _stored_as_output(stored[p][name], *fmt) else "cast"
        else:
            op = "mix"
        base_op = "copy" if _stored_as_output(info, *fmt) else "cast"
        items.append(Item(name, cls, op, tuple(sorted(lams.items())), sources, recipe.base, dtype, info.shape,
                          fp8_out, out_ue8m0, out_block, threshold, metric, base_op))
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
    ident = {"recipe": recipe.to_dict(), "chimera_plan": 2,
             "parents": {n: sorted((str(f.relative_to(ck.path)), f.stat().st_size, f.stat().st_mtime_ns)
                                   for f in ck.files) for n, ck in cks.items()}}
    plan_id = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Plan(recipe, base_ck.model_type, config, jobs, plan_id, parent_bytes, resolved,
                base_ck.side_files(SIDE_SKIP), metric)
