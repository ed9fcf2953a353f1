"""The grid of a sweep: `--vary` axes -> feasible child recipes, plus the parents as reference points.

Grid axes (`--vary AXIS=SPEC`, SPEC is `start:stop:step` with an inclusive, rounding-safe stop, or a
comma list):

- `CLASS.PARENT=x` (CLASS a tensor class or `default`): PARENT gets lambda x for that class. The
  remaining mass 1 - x goes to the class's other parents in proportion to their lambdas in the base
  recipe's vector for that class (the class's own vector, else `default`); with two parents the other
  simply gets 1 - x. Several axes on the same class fix several parents at once (a simplex sweep over
  three parents); grid points whose fixed lambdas sum above 1 are infeasible and skipped. A vary that
  can't be satisfied (the rest would have to be split among several parents that all have lambda 0
  in the base vector) is an error. `default` applies to classes without their own vector; overrides
  are left as they are.
- `threshold.delta=d`: the recipe's threshold delta (metric from the recipe, else `relative`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import product

from chimera.checkpoint.arch import CLASSES
from chimera.errors import ChimeraError
from chimera.merge.recipe import Recipe, from_dict

EPS = 1e-9


@dataclass(frozen=True)
class Axis:
    """One `--vary`: `cls.parent` (lambda) or `threshold.delta`, with its values."""

    name: str                  # e.g. "routed_experts.r1" or "threshold.delta"
    cls: str | None            # tensor class or "default"; None for the threshold axis
    parent: str | None
    values: tuple[float, ...]


@dataclass
class Point:
    id: str
    kind: str                  # "child" | "parent"
    label: str
    coords: dict[str, float] = field(default_factory=dict)
    recipe: dict | None = None   # the child's recipe (absolute parent paths); None for a parent
    model: str | None = None     # a parent's directory


def parse_values(spec: str, where: str) -> list[float]:
    """`0:1:0.1` (inclusive stop, rounding-safe) or `0,0.25,1` -> sorted unique floats."""
    spec = spec.strip()
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ChimeraError(f"{where}: a range is start:stop:step, got {spec!r}")
            start, stop, step = (float(p) for p in parts)
            if not step > 0:
                raise ChimeraError(f"{where}: step must be > 0, got {step:g}")
            if stop < start:
                raise ChimeraError(f"{where}: stop {stop:g} is below start {start:g}")
            k = int(math.floor((stop - start) / step + 1e-6))
            vals = [start + i * step for i in range(k + 1)]
            if abs(vals[-1] - stop) > 1e-6 * max(1.0, abs(step)) and vals[-1] < stop:
                vals.append(stop)  # a step that doesn't land on stop: stop is still included
            if len(vals) > 10000:
                raise ChimeraError(f"{where}: {len(vals)} values is too many")
        else:
            vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ChimeraError(f"{where}: values must be numbers (start:stop:step or a comma list), got {spec!r}") from None
    if not vals:
        raise ChimeraError(f"{where}: no values given")
    vals = [round(v, 10) + 0.0 for v in vals]
    if any(not math.isfinite(v) for v in vals):
        raise ChimeraError(f"{where}: values must be finite")
    return sorted(set(vals))


def parse_vary(text: str, recipe: Recipe) -> Axis:
    """One `--vary` argument, validated against the recipe's parents and the tensor classes."""
    where = f"--vary {text}"
    if "=" not in text:
        raise ChimeraError(f"{where}: expected CLASS.PARENT=VALUES or threshold.delta=VALUES")
    name, spec = (s.strip() for s in text.split("=", 1))
    if "." not in name:
        raise ChimeraError(f"{where}: expected CLASS.PARENT=VALUES (e.g. routed_experts.r1=0:1:0.1)")
    cls, parent = name.split(".", 1)
    values = parse_values(spec, where)
    if cls == "threshold":
        if parent != "delta":
            raise ChimeraError(f"{where}: only threshold.delta can be varied")
        if any(v < 0 for v in values):
            raise ChimeraError(f"{where}: threshold.delta must be >= 0")
        return Axis(name, None, None, tuple(values))
    if cls != "default" and cls not in CLASSES:
        raise ChimeraError(f"{where}: unknown tensor class {cls!r} (classes: default, {', '.join(CLASSES)})")
    if parent not in recipe.parents:
        raise ChimeraError(f"{where}: unknown parent {parent!r} (parents: {', '.join(recipe.parents)})")
    bad = [v for v in values if v < -EPS or v > 1 + EPS]
    if bad:
        raise ChimeraError(f"{where}: lambda {bad[0]:g} is outside [0, 1]")
    if len(recipe.parents) < 2:
        raise ChimeraError(f"{where}: a lambda sweep needs at least two parents")
    return Axis(name, cls, parent, tuple(values))


def fmt_value(v: float) -> str:
    """A lambda or delta as written in point ids and tables: `0.5`, `1`, `0.125`."""
    return f"{v:.6f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def point_id(coords: dict[str, float]) -> str:
    s = "__".join(f"{k}-{fmt_value(v)}" for k, v in coords.items())
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", s) or "point"


def child_weights(recipe: Recipe, cls: str, fixed: dict[str, float], where: str) -> dict[str, float] | None:
    """The lambda vector of `cls` with `fixed` parents set; None when infeasible (fixed sum > 1)."""
    total = sum(fixed.values())
    if total > 1 + 1e-9:
        return None
    base_vec = recipe.weights.get(cls, recipe.weights["default"])
    others = [p for p in recipe.parents if p not in fixed]
    rest = 1.0 - total
    out = dict(fixed)
    if rest <= 1e-12:
        out.update({p: 0.0 for p in others})
    elif not others:
        return None  # every parent fixed and they don't sum to 1
    else:
        mass = {p: base_vec.get(p, 0.0) for p in others}
        m = sum(mass.values())
        if m > 0:
            out.update({p: rest * mass[p] / m for p in others})
        elif len(others) == 1:
            out[others[0]] = rest
        else:
            raise ChimeraError(f"{where}: cannot split the remaining {fmt_value(rest)} among {', '.join(others)} "
                               f"(all have lambda 0 in the recipe's {cls} vector; give it one, or vary them too)")
    out = {p: round(out[p], 12) for p in recipe.parents if out.get(p, 0.0) > 1e-12}
    s = sum(out.values())
    return {p: v / s for p, v in out.items()}


def build_grid(recipe: Recipe, axes: list[Axis]) -> tuple[list[Point], int]:
    """(feasible child points in grid order, number of infeasible points skipped)."""
    if not axes:
        raise ChimeraError("a sweep needs at least one --vary")
    names = [a.name for a in axes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ChimeraError(f"--vary {sorted(dup)[0]} is given twice")
    base = recipe.to_dict()
    points, skipped = [], 0
    for combo in product(*(a.values for a in axes)):
        coords = {a.name: v for a, v in zip(axes, combo)}
        d = json.loads(json.dumps(base))
        by_cls: dict[str, dict[str, float]] = {}
        for a, v in zip(axes, combo):
            if a.cls is None:
                d["threshold"] = {"delta": v, "metric": (recipe.threshold.metric if recipe.threshold else "relative")}
            else:
                by_cls.setdefault(a.cls, {})[a.parent] = v
        feasible = True
        for cls, fixed in by_cls.items():
            vec = child_weights(recipe, cls, fixed, "--vary " + ",".join(f"{cls}.{p}" for p in fixed))
            if vec is None:
                feasible = False
                break
            d["weights"][cls] = vec
        if not feasible:
            skipped += 1
            continue
        pid = point_id(coords)
        child = from_dict(d, f"sweep point {pid}")  # validates the derived recipe
        points.append(Point(pid, "child", pid, coords, child.to_dict()))
    if not points:
        raise ChimeraError("every grid point is infeasible (lambdas fixed on one class sum above 1)")
    return points, skipped


def parent_points(recipe: Recipe) -> list[Point]:
    return [Point(f"parent-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}", "parent", name, {}, None, str(path))
            for name, path in recipe.parents.items()]
