"""MXFP4 (OCP Microscaling Formats v1.0): blocks of 32 FP4 (e2m1) codes sharing one E8M0 exponent.

A block of 32 consecutive values along the last axis is stored as 32 four-bit codes and one scale byte:

    code c      bit 3 = sign, bits 0-2 index the magnitudes  0, 0.5, 1, 1.5, 2, 3, 4, 6
    scale e     E8M0: 2^(e - 127), e in 0..254 (255 is NaN, rejected)
    value       v = (-1)^sign * fp4[c & 7] * 2^(e - 127)

Two codes share a byte: element 2j in the low nibble, element 2j+1 in the high nibble. Layouts on disk:
gpt-oss `X_blocks` uint8 `[..., G, 16]` + `X_scales` uint8 `[..., G]` (rows = output features, so the
in-memory `[E, in, out]` parameter is the transpose); DeepSeek-V4 experts `weight` int8 `[..., N/2]` + `scale`
float8_e8m0 `[..., N/32]`. A last axis that is not a multiple of 32 is padded with zeros to whole blocks
(`dequantize(..., n=)` trims it back).

Quantization, per block (OCP MX v1.0, section 6.3):

    X = floor(log2(max_i |v_i|)) - 2          2 = exponent of the largest e2m1 value (6 = 1.5 * 2^2)
    X = clamp(X, -127, 127); an all-zero block gets X = -127 (scale byte 0)
    c_i = e2m1(v_i / 2^X)                     round to nearest, ties to the even code (mantissa bit 0),
                                              saturating: |v_i / 2^X| in (6, 8) becomes 6

Ties, explicitly: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (the rule of the
spec's round-to-nearest-even and of compressed-tensors' FP4 cast). The sign bit is the value's sign bit, so a
negative value that rounds to zero is stored as -0 (code 8), as compressed-tensors does. NaN/Inf inputs are
rejected (FloatingPointError).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

BLOCK = 32
EMAX_ELEM = 2
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# boundaries between consecutive magnitudes, and whether a value exactly on one rounds up (to the even code)
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)
_LUT = np.array(FP4_VALUES, dtype=np.float32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8 `[..., m]` (two codes per byte) -> codes uint8 `[..., 2m]` (low nibble first)."""
    import torch

    u = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    return torch.stack((u & 0x0F, u >> 4), dim=-1).reshape(*u.shape[:-1], 2 * u.shape[-1])


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 `[..., 2m]` -> uint8 `[..., m]`."""
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def dequantize_np(blocks: np.ndarray, scales: np.ndarray, n: int | None = None) -> np.ndarray:
    """numpy: packed codes (uint8/int8 `[..., G, 16]` or `[..., G*16]`) and E8M0 scale bytes `[..., G]` ->
    float32 `[..., G*32]` (trimmed to `n` columns). Exact: every value is an e2m1 number times a power of two."""
    e = np.asarray(scales).view(np.uint8)
    if (e == 255).any():
        raise ValueError("E8M0 scale 255 (NaN)")
    b = np.asarray(blocks).view(np.uint8)
    if b.size != e.size * BLOCK // 2:
        raise ValueError(f"{tuple(b.shape)} codes do not fit {tuple(e.shape)} scales of {BLOCK}-element blocks")
    b = b.reshape(*e.shape, BLOCK // 2)
    codes = np.stack((b & 0x0F, b >> 4), axis=-1).reshape(*e.shape, BLOCK)       # [..., G, 32]
    w = np.ldexp(_LUT[codes], (e.astype(np.int32) - 127)[..., None])              # float32, exact
    w = w.reshape(*e.shape[:-1], -1)
    return w if n is None else w[..., :n]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """torch wrapper of `dequantize_np` (any uint8/int8/float8_e8m0 storage of the same bytes)."""
    import torch

    as_np = lambda t: t.contiguous().view(torch.uint8).numpy()  # noqa: E731
    return torch.from_numpy(np.ascontiguousarray(dequantize_np(as_np(blocks), as_np(scales), n)))


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float `[..., n]` -> (codes uint8 `[..., G, 16]`, E8M0 scales uint8 `[..., G]`), G = ceil(n / 32)."""
    import torch

    w = w.to(torch.float32)
    n = w.shape[-1]
    g = -(-n // BLOCK)
    if g * BLOCK != n:
        w = torch.nn.functional.pad(w, (0, g * BLOCK - n))
    wb = w.reshape(*w.shape[:-1], g, BLOCK)                           # [..., G, 32]
    amax = wb.abs().amax(dim=-1)                                      # [..., G]
    if not bool(torch.isfinite(amax).all()):
        raise FloatingPointError("non-finite value")
    x = torch.where(amax > 0, torch.floor(torch.log2(amax)) - EMAX_ELEM, torch.full_like(amax, -127.0))
    x = x.clamp(-127, 127)
    t = torch.ldexp(wb, -x.unsqueeze(-1))                            # v / 2^X, exact
    mag = t.abs()
    code = torch.zeros(mag.shape, dtype=torch.uint8)
    for b, up in zip(_BOUNDS, _TIE_UP):
        code += (mag >= b) if up else (mag > b)
    code |= torch.signbit(t).to(torch.uint8) << 3
    return pack(code), (x + 127).to(torch.uint8)
