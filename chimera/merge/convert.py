"""FP8 <-> BF16/FP32 conversion with DeepSeek's block semantics (`chimera convert`).

A conversion is a one-parent merge whose only operation is `cast`: every tensor is read, dequantized
if FP8 (`W = q * s[i//128, j//128]`), and written as bfloat16/float32, or, for `float8`, the
attention/MLP/expert projections are quantized per 128x128 block with fresh scales (embeddings,
lm_head, norms and router stay in their dtype, as in DeepSeek's own checkpoints).
"""
from __future__ import annotations

import os
from pathlib import Path

from chimera.errors import ChimeraError
from chimera.merge.execute import MergeResult, run_merge
from chimera.merge.plan import build_plan
from chimera.merge.recipe import Recipe

DTYPES = ("bfloat16", "float32", "float8")


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16", force: bool = False,
            shard_size: int = 5 * 10**9, workers: int = 2, on_bytes=None) -> MergeResult:
    if dtype not in DTYPES:
        raise ChimeraError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    recipe = Recipe(parents={"model": Path(src).resolve()}, base="model", weights={"default": {"model": 1.0}},
                    dtype=dtype, shard_size=shard_size)
    recipe.source = f"# chimera convert {src} --dtype {dtype}\n"
    return run_merge(build_plan(recipe), out, force=force, workers=workers, on_bytes=on_bytes)
