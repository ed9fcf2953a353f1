"""The merge plan: for every output tensor, its sources, lambdas and operation, grouped per shard.

Decided from the recipe and the parents' safetensors headers alone (no tensor data is read), so a
plan is cheap, printable (`chimera plan`) and serializable: each `ShardJob` names file paths and byte
ranges only, and can run in a thread, a process or on another machine sharing the filesystem.

Operations on one output tensor t (parents P_i, base B, lambda_i from the tensor's class or override):

    copy  one lambda is 1 and the stored format is kept: the stored bytes (the weight and every
          companion: FP8 scale, MXFP4 blocks + scales, INT4 packed + scale + shape) are copied
          verbatim, bit-exact
    cast  one lambda is 1 but the output format differs: dequantize/convert, then encode
    mix   W_t = sum_i lambda_i * W_t(P_i) in float32, then encode in the output's format
          (re-quantize per 128x128 block for FP8, per 32-block for MXFP4, per 32-group for INT4)

The output format of a tensor (`formats.OutFormat`) is the recipe's `output.dtype`: `keep` writes the
base's format (so parents stored otherwise, e.g. a bf16 fine-tune of an FP8 release, are converted);
`bfloat16`/`float32` dequantize; `float8` quantizes the big projections. A fused experts tensor
(`experts.gate_up_proj [E, ...]`) that a recipe's expert selector splits gets `segments`: each run of
experts is copied or computed on its own. A mix or conversion chimera can't do (an opaque format such as
NVFP4, an integer table) is refused here, naming the tensor and format, before anything is written.

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

from chimera.checkpoint import archcache
from chimera.checkpoint.files import FLOAT_TAGS, Checkpoint
from chimera.checkpoint.formats import OutFormat, Stored, block_format
from chimera.checkpoint.writer import Slot, shard_size
from chimera.errors import ChimeraError
from chimera.merge.recipe import AGREE_KEYS, Recipe, Threshold, expert_of

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
class Segment:
    """Experts [lo, hi) of a fused `[E, ...]` experts tensor and what is done with them."""

    lo: int
    hi: int
    op: str                              # copy | cast | mix
    lambdas: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Item:
    """One output tensor: what is computed and from which bytes.

    `op` is what happens when the tensor is merged; with a `threshold`, the tensor is the base's
    (`base_op`: a copy of its bytes, or a cast when the output format differs) where the parents'
    distance to the base is below delta. `segments` (a fused experts tensor whose experts an override
    names) split the operation by runs of experts along axis 0; `op` is then copy only if every
    segment copies.
    """

    name: str
    cls: str | None
    op: str                              # copy | cast | mix
    lambdas: tuple[tuple[str, float], ...]
    sources: tuple[Source, ...]          # every parent (distances are measured against all of them)
    base: str
    out: OutFormat                       # how the output tensor is written (format, dtype, blocks, names)
    shape: tuple[int, ...]               # the logical (dequantized) shape
    threshold: Threshold | None = None
    metric: str = "relative"             # distance recorded for this tensor
    base_op: str = "copy"                # copy | cast: how the base's version is written
    segments: tuple[Segment, ...] = ()

    @property
    def dtype(self) -> str:
        """The output's main stored dtype tag (F8_E4M3 for FP8 blocks)."""
        return self.slots()[0].dtype

    @property
    def fp8_out(self) -> bool:
        return self.out.fp8

    @property
    def ue8m0(self) -> bool:
        return self.out.ue8m0

    @property
    def block(self) -> int:
        return self.out.block

    def parts(self) -> list[tuple[str, str, str, tuple[int, ...]]]:
        """(role, stored name, dtype tag, stored shape) of every tensor written for this one (an opaque
        format: the base's stored tensors, as they are)."""
        if self.out.format == "opaque":
            return [(r, t.name, t.dtype, t.shape) for r, t in self.source(self.base).stored.roles()]
        return self.out.parts(self.name, self.shape)

    def slots(self) -> list[Slot]:
        return [Slot(n, tag, shape) for _, n, tag, shape in self.parts()]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots())

    def source(self, parent: str) -> Source:
        return next(s for s in self.sources if s.parent == parent)

    @property
    def align(self) -> int:
        """Row chunks start at multiples of this: every FP8 block size involved (output and parents)."""
        return math.lcm(self.block if self.fp8_out else 1, *(s.block for s in self.sources if s.scale is not None))

    @property
    def others(self) -> list[Source]:
        """The non-base parents, whose distance to the base is recorded (the largest one); none when a
        parent stores the tensor in a format chimera can't read as numbers (opaque: copied only)."""
        if any(s.stored.format == "opaque" for s in self.sources):
            return []
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


def _out_format(recipe: Recipe, info: Stored, cls: str | None, block: int, ue8m0: bool) -> OutFormat:
    """How one output tensor is written, from the recipe's output dtype and the base's stored tensor."""
    if recipe.dtype == "keep":
        return OutFormat.like(info)
    numeric_float = info.numeric and (info.format != "plain" or info.dtype in FLOAT_TAGS)
    if recipe.dtype == "float8":  # DeepSeek's choice: FP8 for the big projections only
        if cls in FP8_CLASSES and len(info.shape) == 2 and numeric_float:
            return OutFormat("fp8_block", "F32", block, ue8m0, "scale_inv")
        return OutFormat("plain", "BF16" if info.format != "plain" or info.dtype.startswith("F8") else info.dtype)
    if numeric_float:
        return OutFormat("plain", OUT_TAG[recipe.dtype])
    return OutFormat.like(info)


def _operation(name: str, lams: dict[str, float], stored: dict[str, Stored], out: OutFormat, base: Stored) -> str:
    """copy / cast / mix of one tensor (or run of experts); a one-line error where chimera can't do it."""
    if len(lams) == 1:
        (p,) = lams
        src = stored[p]
        if out.format == "opaque":
            if src.signature() == base.signature():
                return "copy"
            raise ChimeraError(f"tensor {name}: parent {p} stores it as {src.describe()} and the output keeps "
                               f"{base.describe()}, which chimera can't convert (select it from a parent "
                               f"stored alike)")
        if out.accepts(src):
            return "copy"
        if not src.numeric:
            raise ChimeraError(f"tensor {name}: parent {p} stores it as {src.describe()}, which chimera can't convert "
                               f"to {out.describe()}")
        return "cast"
    bad = next((p for p in lams if not stored[p].numeric or (stored[p].format == "plain"
                                                              and stored[p].dtype not in FLOAT_TAGS)), None)
    if bad is not None or out.format == "opaque":
        st = stored[bad] if bad is not None else base
        what = f"dtype {st.dtype}" if st.format == "plain" else st.describe()
        raise ChimeraError(f"{st.file}: tensor {name} has {what}, which cannot be mixed (mixing this format is "
                           f"not implemented; select it from one parent)")
    return "mix"


def _segments(recipe: Recipe, name: str, cls: str | None, n_experts: int, stored: dict[str, Stored],
              out: OutFormat, base: Stored) -> tuple[Segment, ...]:
    """Runs of experts of a fused experts tensor with equal lambdas, each with its operation; () when the
    recipe treats the tensor as a whole."""
    per = recipe.expert_lambdas(name, cls, n_experts)
    if all(lam == per[0] for lam in per):
        return ()
    segs: list[Segment] = []
    lo = 0
    for e in range(1, n_experts + 1):
        if e == n_experts or per[e] != per[lo]:
            lams = per[lo]
            segs.append(Segment(lo, e, _operation(f"{name}[{lo}-{e - 1}]", lams, stored, out, base),
                                tuple(sorted(lams.items()))))
            lo = e
    return tuple(segs)


def _check_selectors(recipe: Recipe, names, a: archcache.Table) -> None:
    """Every expert selector names routed experts that exist: one-line errors otherwise."""
    paths: dict[str, int] = {}
    for n in names:
        r = a.role(n)
        if r is not None and r.cls == "routed_experts" and r.layer is not None:
            where = expert_of(n)
            if where is not None:
                paths[where[0]] = a.num_experts(r.layer)
    for i, o in enumerate(recipe.overrides):
        if not o.selector:
            continue
        from fnmatch import fnmatchcase

        hit = {p: E for p, E in paths.items() if fnmatchcase(p, o.path)}
        if not hit:
            raise ChimeraError(f"recipe: overrides[{i}]: {o.match} matches no routed experts "
                               f"(experts modules look like {next(iter(sorted(paths)), 'none')})")
        for p, E in sorted(hit.items()):
            if o.experts and max(o.experts) >= E:
                raise ChimeraError(f"recipe: overrides[{i}]: {o.match}: {p} has experts 0-{E - 1}")


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
        # the derived architecture (torch + transformers on a miss; a cached table otherwise); a one-line
        # ChimeraError if transformers can't build it
        if not archcache.table(ck.config, ck.stored).moe:
            raise ChimeraError(f"{ck.path / 'config.json'}: model_type {ck.model_type!r} has no MoE layers")
    _check_compatible(cks, recipe.base)
    resolved = _check_agreement(cks, recipe)
    base_ck = cks[recipe.base]
    config = _out_config(recipe, base_ck)
    out_block, out_ue8m0 = block_format(config.get("quantization_config"), "output config")
    stored = {n: ck.stored for n, ck in cks.items()}
    metric = recipe.threshold.metric if recipe.threshold else "relative"
    base_arch = archcache.table(base_ck.config, stored[recipe.base])
    _check_selectors(recipe, stored[recipe.base], base_arch)
    items: list[Item] = []
    unknown: list[str] = []
    for name in sorted(stored[recipe.base]):
        info = stored[recipe.base][name]
        role = base_arch.role(name)
        cls = role.cls if role is not None and role.cls != "other" else None
        lams = recipe.lambdas(name, cls)
        if lams is None:
            unknown.append(name)
            continue
        out = _out_format(recipe, info, cls, out_block, out_ue8m0)
        at = {p: stored[p][name] for p in cks}
        segments = ()
        if role is not None and role.fused and info.shape:
            segments = _segments(recipe, name, cls, info.shape[0], at, out, info)
        if segments:  # `lambdas` stay the tensor's own (class/glob); the segments carry each run's
            ops = {sg.op for sg in segments}
            op = "copy" if ops == {"copy"} else ("mix" if "mix" in ops else "cast")
        else:
            op = _operation(name, lams, at, out, info)
        involved = set(lams) | {p_ for sg in segments for p_, _ in sg.lambdas}
        threshold = recipe.threshold if (recipe.threshold and recipe.threshold.delta > 0
                                         and involved != {recipe.base}) else None
        if any(st.format == "opaque" for st in at.values()):
            threshold = None  # no distance without numbers: the selection stands
        sources = tuple(Source(p, stored[p][name]) for p in cks)
        base_op = _operation(name, {recipe.base: 1.0}, at, out, info)
        items.append(Item(name, cls, op, tuple(sorted(lams.items())), sources, recipe.base, out, info.shape,
                          threshold, metric, base_op, segments))
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


def formats_summary(plan: Plan) -> dict:
    """What the plan writes in which format, and what it converts: {"output": {format: tensors},
    "converted": {"stored -> output": tensors}} (a selection that is not a copy converts)."""
    out: Counter = Counter()
    conv: Counter = Counter()
    for it in plan.items:
        out[it.out.describe()] += 1
        for p, _ in it.lambdas:
            src = it.source(p).stored
            if not it.out.accepts(src) and it.out.format != "opaque":
                conv[f"{src.describe()} -> {it.out.describe()}"] += 1
    return {"output": dict(out.most_common()), "converted": dict(conv.most_common()),
            "segments": sum(1 for it in plan.items if it.segments)}
