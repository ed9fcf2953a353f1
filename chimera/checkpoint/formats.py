"""How a logical tensor is stored: the tensor itself plus its companions, and how they are checked.

This is the one place that knows which companion tensors a stored weight has. Today there is one
quantized format, DeepSeek block FP8:

    x.weight            float8_e4m3fn [M, N]
    x.weight_scale_inv  float32       [ceil(M/B), ceil(N/B)]     (B = weight_block_size, 128)

A plain tensor has no companions. A new format (MXFP4 `*_blocks` + `*_scales`, compressed-tensors INT4
`weight_packed` + `weight_scale` + `weight_shape`) adds its companion names and its check here; the
plan, the copy path and the distance reader then carry every part of a stored tensor (`Stored.parts`).
Plain data only: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chimera.errors import ChimeraError

if TYPE_CHECKING:
    from pathlib import Path

    from chimera.checkpoint.files import TensorInfo

SCALE_SUFFIX = ".weight_scale_inv"
BLOCK = 128


def scale_name(weight: str) -> str:
    """`x.weight` -> `x.weight_scale_inv`, the name of an FP8 weight's block scales."""
    return weight[: -len(".weight")] + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    """The scale grid of an [M, N] weight: [ceil(M/block), ceil(N/block)]."""
    m, n = shape
    return (math.ceil(m / block), math.ceil(n / block))


def is_companion(name: str) -> bool:
    """True for a tensor that only belongs to another one (it is planned with its weight)."""
    return name.endswith(SCALE_SUFFIX)


@dataclass(frozen=True)
class Stored:
    """One logical tensor as a checkpoint stores it: the tensor and its companions, in one format."""

    name: str
    weight: TensorInfo
    scale: TensorInfo | None = None     # FP8 block scales (`weight_scale_inv`)
    block: int = BLOCK                  # the checkpoint's weight_block_size
    ue8m0: bool = False                 # scales are powers of two (`scale_fmt: ue8m0`)

    @property
    def format(self) -> str:
        return "fp8_block" if self.scale is not None else "plain"

    @property
    def parts(self) -> tuple[TensorInfo, ...]:
        return (self.weight,) if self.scale is None else (self.weight, self.scale)

    @property
    def dtype(self) -> str:
        return self.weight.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def file(self) -> Path:
        return self.weight.file

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def block_format(quant: dict | None, where: str) -> tuple[int, bool]:
    """(block size, ue8m0?) from a config's `quantization_config` (128 and float scales if absent)."""
    q = quant or {}
    bs = q.get("weight_block_size", [BLOCK, BLOCK])
    try:
        bm, bn = int(bs[0]), int(bs[1])
    except (TypeError, ValueError, IndexError):
        raise ChimeraError(f"{where}: quantization_config.weight_block_size {bs!r} is not [rows, cols]") from None
    if bm != bn or bm <= 0:
        raise ChimeraError(f"{where}: FP8 blocks {bm}x{bn} are not supported (square blocks only)")
    return bm, q.get("scale_fmt") == "ue8m0"


def check_fp8_block(w: TensorInfo, s: TensorInfo, block: int) -> None:
    """An FP8 weight's scale must be float32 with the grid [ceil(M/block), ceil(N/block)]."""
    if len(w.shape) != 2:
        raise ChimeraError(f"{w.file}: FP8 tensor {w.name} has shape {list(w.shape)}; block FP8 weights are 2-D")
    if s.dtype != "F32":
        raise ChimeraError(f"{s.file}: tensor {s.name} is {s.dtype}; FP8 block scales must be float32 (F32)")
    want = scale_shape(w.shape, block)
    if tuple(s.shape) != want:
        m, n = w.shape
        raise ChimeraError(f"{s.file}: tensor {s.name} has shape {list(s.shape)}, expected {list(want)} "
                           f"(ceil({m}/{block}) x ceil({n}/{block}) for {w.name} {list(w.shape)})")


def group(tensors: dict[str, TensorInfo], quant: dict | None, where: str) -> dict[str, Stored]:
    """Every logical tensor with its companions attached and checked.

    Raises (naming the file and tensor) if an FP8 weight lacks its scale, a scale lacks its weight or
    sits on a weight that is not FP8, or a scale has the wrong dtype or grid.
    """
    block, ue8m0 = block_format(quant, where)
    out: dict[str, Stored] = {}
    for name, info in tensors.items():
        if is_companion(name):
            w = name[: -len(SCALE_SUFFIX)] + ".weight"
            if w not in tensors:
                raise ChimeraError(f"{info.file}: scale {name} has no weight {w}")
            continue
        scale = tensors.get(scale_name(name)) if name.endswith(".weight") else None
        if info.dtype.startswith("F8"):
            if scale is None:
                raise ChimeraError(f"{info.file}: FP8 tensor {name} has no weight_scale_inv")
            check_fp8_block(info, scale, block)
        elif scale is not None:
            raise ChimeraError(f"{scale.file}: tensor {scale.name} scales {name}, which is {info.dtype}, not FP8")
        out[name] = Stored(name, info, scale, block, ue8m0)
    return out
