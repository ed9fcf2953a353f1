"""Assembly of Experts: recipe -> plan -> per-shard jobs -> child checkpoint.

    import chimera
    chimera.merge("recipe.yaml", "out/")                       # this package is callable
    recipe = chimera.merge.Recipe.from_dict({"parents": {"v3": "tiny-v3", "r1": "tiny-r1"}, "base": "v3",
                                             "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}})
    chimera.merge(recipe, "r1t/")

The names below are imported on first use, so `chimera.merge.recipe` (and the command line) load without
torch.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

_LAZY = {"build_plan": "plan", "Plan": "plan", "run_merge": "execute", "MergeResult": "execute",
         "load": "recipe", "Recipe": "recipe", "convert": "convert"}


def merge(recipe, out: str | os.PathLike, resume: bool = False, force: bool = False, workers: int = 2,
          distances: bool = True, **kw):
    """Build the child checkpoint described by `recipe` (a Recipe, a YAML path or a recipe mapping) in
    `out`; returns the `MergeResult` (`kw`: the rest of `run_merge`'s options, e.g. executor="ray",
    device="cuda")."""
    from chimera.merge.execute import run_merge
    from chimera.merge.plan import build_plan
    from chimera.merge.recipe import Recipe, from_dict, load

    if isinstance(recipe, dict):
        recipe = from_dict(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = load(Path(recipe))
    return run_merge(build_plan(recipe), out, resume=resume, force=force, workers=workers, distances=distances,
                     **kw)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"chimera.merge.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chimera.merge' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """`chimera.merge(...)` runs a merge, while `chimera.merge.Recipe` etc. stay attributes of the package."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["merge", "build_plan", "run_merge", "load", "Recipe", "Plan", "MergeResult", "convert"]
