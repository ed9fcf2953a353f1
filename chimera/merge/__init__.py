"""Assembly of Experts: recipe -> plan -> per-shard jobs -> child checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

from chimera.merge.execute import MergeResult, run_merge
from chimera.merge.plan import Plan, build_plan
from chimera.merge.recipe import Recipe, load


def merge(recipe: Recipe | str | os.PathLike, out: str | os.PathLike, resume: bool = False,
          force: bool = False, workers: int = 2, distances: bool = True, **kw) -> MergeResult:
    """Build the child checkpoint described by `recipe` (a Recipe or a YAML path) in `out`
    (`kw`: the rest of `run_merge`'s options, e.g. executor="ray", device="cuda")."""
    if not isinstance(recipe, Recipe):
        recipe = load(Path(recipe))
    return run_merge(build_plan(recipe), out, resume=resume, force=force, workers=workers, distances=distances, **kw)


__all__ = ["merge", "build_plan", "run_merge", "load", "Recipe", "Plan", "MergeResult"]
