"""The merge recipe: dataclasses, YAML parsing (chimera's schema or mergekit's `linear`), validation.

chimera's schema:

    parents: {v3: /ckpt/DeepSeek-V3-0324, r1: /ckpt/DeepSeek-R1}   # directories or bundled names (tiny-r1)
    base: v3
    weights:                      # per tensor class: {parent: lambda}, lambdas >= 0 summing to 1
      default: {v3: 1.0}
      routed_experts: {r1: 1.0}
    threshold: {delta: 0.0, metric: relative}     # optional
    overrides: [{match: "model.layers.61.*", weights: {v3: 1.0}}]   # optional, first match wins
    output: {dtype: keep, shard_size: 5GB}
    normalize: false              # optional: rescale lambdas that do not sum to 1
    use_base_config: [quantization_config, num_experts_per_tok]   # optional, see AGREE_KEYS
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chimera.checkpoint.arch import CLASSES
from chimera.errors import ChimeraError
from chimera.resolve import resolve_model

METRICS = ("relative", "symmetric", "rms")
OUT_DTYPES = ("keep", "bfloat16", "float32", "float8")
#: config keys every parent must share (a merge assumes one quantization format and one routing rule).
#: Where parents differ, `use_base_config: [key, ...]` lets the child take the base's value: for
#: `quantization_config` every tensor stored in another format is then converted to the base's
#: (op `cast`: dequantized and re-quantized with the base's block size and scale format).
ROUTING_KEYS = ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "scoring_func",
                "topk_method", "norm_topk_prob", "routed_scaling_factor")
AGREE_KEYS = ("quantization_config",) + ROUTING_KEYS


@dataclass(frozen=True)
class Override:
    match: str
    weights: dict[str, float]

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class Threshold:
    delta: float = 0.0
    metric: str = "relative"


@dataclass
class Recipe:
    """A validated recipe. Build one with `Recipe.load(path)` or `Recipe.from_dict({...})` (which check
    every field), or directly; parents may be directories or bundled model names either way."""

    parents: dict[str, Path]
    base: str
    weights: dict[str, dict[str, float]]  # class (or "default") -> {parent: lambda}
    threshold: Threshold | None = None
    overrides: list[Override] = field(default_factory=list)
    dtype: str = "keep"
    shard_size: int = 5 * 10**9
    use_base_config: tuple[str, ...] = ()  # AGREE_KEYS where parents may differ (the child takes the base's)
    source: str = ""  # the recipe text as given, copied into the output
    lineage: dict | None = None  # set by `chimera convert`: the source's name and merge record (merge.convert)

    def __post_init__(self) -> None:
        self.parents = {str(k): resolve_model(v, strict=False) for k, v in self.parents.items()}

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return load(path)

    @classmethod
    def from_dict(cls, d: dict, root: str | Path | None = None) -> "Recipe":
        return from_dict(d, "recipe", Path(root) if root is not None else None)

    def lambdas(self, name: str, cls: str | None) -> dict[str, float] | None:
        """The lambda vector for one tensor: first matching override, else its class, else default."""
        for o in self.overrides:
            if o.matches(name):
                return o.weights
        if cls is None:
            return None
        return self.weights.get(cls, self.weights["default"])

    def to_dict(self) -> dict:
        d: dict = {"parents": {k: str(v) for k, v in self.parents.items()}, "base": self.base,
                   "weights": self.weights}
        if self.threshold:
            d["threshold"] = {"delta": self.threshold.delta, "metric": self.threshold.metric}
        if self.overrides:
            d["overrides"] = [{"match": o.match, "weights": o.weights} for o in self.overrides]
        d["output"] = {"dtype": self.dtype, "shard_size": self.shard_size}
        if self.use_base_config:
            d["use_base_config"] = list(self.use_base_config)
        return d


def parse_size(v: object, where: str) -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes."""
    if isinstance(v, int) and v > 0:
        return v
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(v), re.I)
    if not m:
        raise ChimeraError(f"{where}: shard_size {v!r} is not a size like 5GB")
    unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    n = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit)
    if n <= 0:
        raise ChimeraError(f"{where}: shard_size must be positive")
    return n


def _lambda_vector(v: object, parents: dict, where: str, normalize: bool) -> dict[str, float]:
    if not isinstance(v, dict) or not v:
        raise ChimeraError(f"{where}: expected a mapping {{parent: lambda}}, got {v!r}")
    out: dict[str, float] = {}
    for p, lam in v.items():
        if p not in parents:
            raise ChimeraError(f"{where}: unknown parent {p!r} (parents: {', '.join(parents)})")
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise ChimeraError(f"{where}: lambda for {p} is not a number: {lam!r}") from None
        if not math.isfinite(lam) or lam < 0:
            raise ChimeraError(f"{where}: lambda for {p} must be a finite number >= 0, got {lam}")
        out[str(p)] = lam
    total = sum(out.values())
    if normalize and total > 0:
        out = {p: lam / total for p, lam in out.items()}
    elif abs(total - 1.0) > 1e-6:
        raise ChimeraError(f"{where}: lambdas sum to {total:g}, not 1 (set `normalize: true` to rescale)")
    return {p: lam for p, lam in out.items() if lam != 0.0}


def from_dict(d: dict, where: str = "recipe", root: Path | None = None) -> Recipe:
    """Validate a chimera recipe mapping. Relative parent paths resolve against `root`."""
    if not isinstance(d, dict):
        raise ChimeraError(f"{where}: a recipe is a YAML mapping")
    if "merge_method" in d or "models" in d:
        return from_mergekit(d, where, root)
    known = {"parents", "base", "weights", "threshold", "overrides", "output", "normalize", "use_base_config"}
    extra = set(d) - known
    if extra:
        raise ChimeraError(f"{where}: unknown key(s) {', '.join(sorted(extra))} (known: {', '.join(sorted(known))})")
    parents_raw = d.get("parents")
    if not isinstance(parents_raw, dict) or len(parents_raw) < 1:
        raise ChimeraError(f"{where}: `parents` must map names to checkpoint directories")
    root = root or Path.cwd()
    parents = {str(k): resolve_model(str(v), root, strict=False, where=f"{where}: parents.{k}")
               for k, v in parents_raw.items()}
    base = str(d.get("base", next(iter(parents))))
    if base not in parents:
        raise ChimeraError(f"{where}: base {base!r} is not a parent (parents: {', '.join(parents)})")
    normalize = bool(d.get("normalize", False))
    weights_raw = d.get("weights") or {}
    if not isinstance(weights_raw, dict):
        raise ChimeraError(f"{where}: `weights` must map tensor classes to {{parent: lambda}}")
    weights: dict[str, dict[str, float]] = {}
    for cls, v in weights_raw.items():
        if cls != "default" and cls not in CLASSES:
            raise ChimeraError(f"{where}: unknown tensor class {cls!r} in weights (classes: default, {', '.join(CLASSES)})")
        weights[str(cls)] = _lambda_vector(v, parents, f"{where}: weights.{cls}", normalize)
    weights.setdefault("default", {base: 1.0})
    threshold = None
    if d.get("threshold") is not None:
        t = d["threshold"]
        if not isinstance(t, dict):
            raise ChimeraError(f"{where}: threshold must be a mapping with delta and metric")
        metric = str(t.get("metric", "relative"))
        if metric not in METRICS:
            raise ChimeraError(f"{where}: threshold.metric {metric!r} unknown (one of {', '.join(METRICS)})")
        try:
            delta = float(t.get("delta", 0.0))
        except (TypeError, ValueError):
            raise ChimeraError(f"{where}: threshold.delta must be a number") from None
        if not delta >= 0:
            raise ChimeraError(f"{where}: threshold.delta must be >= 0")
        threshold = Threshold(delta, metric)
    overrides = []
    for i, o in enumerate(d.get("overrides") or []):
        if not isinstance(o, dict) or "match" not in o or "weights" not in o:
            raise ChimeraError(f"{where}: overrides[{i}] needs `match` (a glob) and `weights`")
        overrides.append(Override(str(o["match"]), _lambda_vector(o["weights"], parents, f"{where}: overrides[{i}]", normalize)))
    out = d.get("output") or {}
    dtype = str(out.get("dtype", "keep"))
    if dtype not in OUT_DTYPES:
        raise ChimeraError(f"{where}: output.dtype {dtype!r} unknown (one of {', '.join(OUT_DTYPES)})")
    shard_size = parse_size(out.get("shard_size", "5GB"), f"{where}: output")
    ubc = d.get("use_base_config") or []
    if not isinstance(ubc, list) or any(k not in AGREE_KEYS for k in ubc):
        raise ChimeraError(f"{where}: use_base_config must list config keys from: {', '.join(AGREE_KEYS)}")
    return Recipe(parents, base, weights, threshold, overrides, dtype, shard_size, tuple(ubc))


def from_mergekit(d: dict, where: str = "recipe", root: Path | None = None) -> Recipe:
    """A mergekit `merge_method: linear` config: models with scalar `weight` parameters.

    mergekit's linear merge normalizes the weights by default (`parameters.normalize: true`).
    Parent names are the model directory names. Per-tensor weight lists are not translated:
    use chimera's `overrides` for that.
    """
    method = d.get("merge_method")
    if method != "linear":
        raise ChimeraError(f"{where}: mergekit merge_method {method!r} not supported (only linear)")
    models = d.get("models")
    if not isinstance(models, list) or not models:
        raise ChimeraError(f"{where}: mergekit config needs a `models` list")
    root = root or Path.cwd()
    parents: dict[str, Path] = {}
    lambdas: dict[str, float] = {}
    for i, m in enumerate(models):
        path = m.get("model") if isinstance(m, dict) else None
        if not isinstance(path, str):
            raise ChimeraError(f"{where}: models[{i}].model must be a local directory path")
        p = resolve_model(path, root, strict=False, where=f"{where}: models[{i}]")
        name = p.name or f"model{i}"
        while name in parents:
            name += "_"
        w = (m.get("parameters") or {}).get("weight", 1.0)
        if not isinstance(w, (int, float)):
            raise ChimeraError(f"{where}: models[{i}].parameters.weight must be a number (per-tensor lists: use chimera overrides)")
        parents[name], lambdas[name] = p, float(w)
    params = d.get("parameters") or {}
    normalize = bool(params.get("normalize", True))
    base_path = d.get("base_model")
    base = next(iter(parents))
    if base_path is not None:
        bp = resolve_model(str(base_path), root, strict=False, where=f"{where}: base_model")
        matches = [n for n, p in parents.items() if p == bp]
        if not matches:
            raise ChimeraError(f"{where}: base_model {base_path} is not one of the models")
        base = matches[0]
    dtype = {"bfloat16": "bfloat16", "float32": "float32"}.get(str(d.get("dtype", "keep")), "keep")
    chimera = {"parents": {k: str(v) for k, v in parents.items()}, "base": base,
               "weights": {"default": lambdas}, "normalize": normalize, "output": {"dtype": dtype}}
    return from_dict(chimera, where, root)


def load(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file (chimera schema or mergekit linear)."""
    p = Path(path)
    try:
        text = p.read_text()
        d = yaml.safe_load(text)
    except OSError as e:
        raise ChimeraError(f"{p}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ChimeraError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    r = from_dict(d, str(p), p.resolve().parent)
    r.source = text
    return r
