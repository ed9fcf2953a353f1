"""FP8 <-> BF16/FP32 conversion with DeepSeek's block semantics (`chimera convert`).

A conversion is a one-parent merge whose only operation is `cast`: every tensor is read, dequantized
if FP8 (`W = q * s[i//128, j//128]`), and written as bfloat16/float32, or, for `float8`, the
attention/MLP/expert projections are quantized per 128x128 block with fresh scales (embeddings,
lm_head, norms and router stay in their dtype, as in DeepSeek's own checkpoints).

Provenance survives: the output of converting a merged child keeps the child's card, recipe and
`chimera_merge.json` record, with a `conversions` entry saying what was converted (`chimera.merge.card`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from chimera.errors import ChimeraError
from chimera.merge.execute import MergeResult, run_merge
from chimera.merge.output import REPORT
from chimera.merge.plan import build_plan
from chimera.merge.recipe import Recipe
from chimera.resolve import model_name, resolve_model

DTYPES = ("bfloat16", "float32", "float8")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def lineage(src: Path) -> dict:
    """The source's name and, when it was written by chimera, its record, card and recipe text."""
    record = None
    text = _read(src / REPORT)
    if text is not None:
        try:
            record = json.loads(text)
        except ValueError:
            raise ChimeraError(f"{src / REPORT}: not valid JSON; move it aside to convert without it") from None
        if not isinstance(record, dict):
            raise ChimeraError(f"{src / REPORT}: not a chimera merge record (a JSON object)")
    return {"source": model_name(src), "record": record,
            "card": _read(src / "README.md") if record is not None else None,
            "recipe": _read(src / "chimera_recipe.yaml") if record is not None else None}


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16", force: bool = False,
            shard_size: int = 5 * 10**9, workers: int = 2, on_bytes=None) -> MergeResult:
    """Convert `src` (a directory or bundled name) into `out` as `dtype`."""
    if dtype not in DTYPES:
        raise ChimeraError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    path = resolve_model(src)
    lin = lineage(path)
    name = lin["source"]
    recipe = Recipe(parents={name: path}, base=name, weights={"default": {name: 1.0}}, dtype=dtype,
                    shard_size=shard_size, lineage=lin)
    recipe.source = f"# chimera convert {name} --dtype {dtype}\n"
    return run_merge(build_plan(recipe), out, force=force, workers=workers, on_bytes=on_bytes)
