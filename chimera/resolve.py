"""Where a model argument points, and what to call it: one resolver for every command, recipe and call.

A model is given as a checkpoint directory (a path; relative to the working directory, or in a recipe to
the recipe's folder) or as the name of a bundled model (`tiny-r1`, see `chimera.zoo.family`). An existing
directory wins over a bundled name, so a local folder called `tiny-r1` is never shadowed.

`model_name(path)` is how cards and records name a model without a local path: the hub id the config
records (`_name_or_path`), else the repository of a Hugging Face cache snapshot
(`.../models--org--name/snapshots/<rev>`), else the folder name.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from chimera.errors import ChimeraError

_HUB_CACHE_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _bundled(name: str) -> Path | None:
    from chimera.zoo import family

    if name in family.BF16_MODELS + family.FP8_MODELS:
        return family.model_path(name)  # a one-line error when the family member is not built
    return None


def resolve_model(spec: str | os.PathLike, root: str | os.PathLike | None = None, strict: bool = True,
                  where: str = "") -> Path:
    """The checkpoint directory `spec` names (absolute).

    `root`: the folder relative paths start from (default: the working directory). With `strict=False` a
    path that does not exist and is no bundled name comes back unchanged (absolute), for the caller to
    report in context (a recipe's parents are checked when the plan reads them).
    """
    prefix = f"{where}: " if where else ""
    text = os.fspath(spec)
    p = Path(text).expanduser()
    q = p if p.is_absolute() else Path(root or Path.cwd()) / p
    if q.exists():
        if not q.is_dir():
            raise ChimeraError(f"{prefix}{text}: not a model directory (a file)")
        if strict and not (q / "config.json").is_file():
            raise ChimeraError(f"{prefix}{text}: not a model directory (no config.json)")
        return q.resolve()
    if os.sep not in text and "/" not in text:
        bundled = _bundled(text)
        if bundled is not None:
            return bundled.resolve()
    if not strict:
        return q.resolve()
    from chimera.zoo import family

    near = difflib.get_close_matches(text, family.BF16_MODELS + family.FP8_MODELS, n=1, cutoff=0.75)
    hint = (f"; did you mean {near[0]!r}?" if near
            else f" (bundled models: {', '.join(family.available()) or 'none built'})")
    raise ChimeraError(f"{prefix}{text}: model directory not found, and not a bundled model{hint}")


def hub_id(path: str | os.PathLike) -> str | None:
    """The Hugging Face repository id a local checkpoint says it is, if any (see the module docstring)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    name = cfg.get("_name_or_path") if isinstance(cfg, dict) else None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    parts = path.absolute().parts
    for i in range(len(parts) - 2, 0, -1):  # .../models--org--name/snapshots/<rev>
        m = _HUB_CACHE_DIR.match(parts[i])
        if m and parts[i + 1] == "snapshots":
            return f"{m['org']}/{m['name']}"
    return None


def model_name(path: str | os.PathLike) -> str:
    """A name for a local checkpoint that carries no local path: its hub id, else its folder name."""
    return hub_id(path) or Path(path).absolute().name
