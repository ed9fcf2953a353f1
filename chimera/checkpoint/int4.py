"""compressed-tensors `pack-quantized` INT4: symmetric 4-bit integers, one scale per group of 32 inputs.

The Kimi K2-Thinking / K2.5 routed experts. One linear weight `W [rows, cols]` is stored as

    weight_packed  int32 [rows, ceil(cols / 8)]   eight codes per word, element j of a row in bits 4(j % 8)..
                                                  of word j // 8, each code stored as q + 8 (0..15)
    weight_scale   float [rows, ceil(cols / 32)]  (bf16 in the releases) one scale per group of 32 columns
    weight_shape   int   [2]                      (rows, cols)

    W[i, j] = q[i, j] * s[i, j // 32],   q in -8..7

Quantization (compressed-tensors' symmetric INT rule, `calculate_qparams` + `quantize`), per group g:

    s_g = max_j |W[i, j]| / 7.5          (bit range 15 / 2), cast to the scale dtype; 0 becomes that dtype's eps
    q   = clamp(round_half_even(W / s_g), -8, 7)

so |W| / s reaches about 7.5 at a group's maximum: +max rounds to 7 or 8 (clamped to 7), -max to -7 or -8,
exactly as the library's arithmetic does. The padding of a partial last word is 0 (not q = 0, which would be 8),
matching `pack_to_int32`. Unpacking reads the int32 words as little-endian bytes (x86/ARM hosts).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

GROUP = 32
BITS = 4
PER_WORD = 32 // BITS


def unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 `[rows, words]` -> int8 q `[rows, cols]` in -8..7."""
    import torch

    u = packed.contiguous().view(torch.uint8)                         # little-endian: low byte first
    nib = torch.stack((u & 0x0F, u >> 4), dim=-1).reshape(packed.shape[0], -1)
    return (nib[:, :cols].to(torch.int8) - 8)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 q `[rows, cols]` in -8..7 -> int32 `[rows, ceil(cols / 8)]`."""
    import torch

    rows, cols = q.shape
    words = -(-cols // PER_WORD)
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if words * PER_WORD != cols:
        u = torch.nn.functional.pad(u, (0, words * PER_WORD - cols))   # padding nibbles are 0
    u = u.reshape(rows, words * 4, 2)
    return (u[..., 0] | (u[..., 1] << 4)).contiguous().view(torch.int32)


def dequantize_np(packed: np.ndarray, scale: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """numpy: (weight_packed int32, weight_scale as float32, weight_shape) -> float32 `[rows, cols]`; exact
    (q * s in float32)."""
    rows, cols = int(shape[0]), int(shape[1])
    if packed.shape != (rows, -(-cols // PER_WORD)) or scale.shape != (rows, -(-cols // GROUP)):
        raise ValueError(f"weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} do not fit "
                         f"weight_shape {(rows, cols)}")
    u = np.ascontiguousarray(packed).view(np.uint8)                    # little-endian: low byte first
    q = np.stack((u & 0x0F, u >> 4), axis=-1).reshape(rows, -1)[:, :cols].astype(np.float32) - 8
    return q * np.repeat(np.asarray(scale, dtype=np.float32), GROUP, axis=1)[:, :cols]


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """torch wrapper of `dequantize_np`."""
    import torch

    return torch.from_numpy(dequantize_np(packed.contiguous().numpy(), scale.to(torch.float32).numpy(), shape))


def quantize(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float `[rows, cols]` -> (weight_packed int32, weight_scale `scale_dtype`, bfloat16 by default)."""
    import torch

    scale_dtype = scale_dtype or torch.bfloat16
    w = w.to(torch.float32)
    rows, cols = w.shape
    g = -(-cols // GROUP)
    wp = torch.nn.functional.pad(w, (0, g * GROUP - cols)) if g * GROUP != cols else w
    amax = wp.reshape(rows, g, GROUP).abs().amax(dim=-1)              # [rows, G]
    if not bool(torch.isfinite(amax).all()):
        raise FloatingPointError("non-finite value")
    s = (amax / 7.5).to(scale_dtype)
    s = torch.where(s == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype), s)
    s_full = s.to(torch.float32).repeat_interleave(GROUP, dim=1)[:, :cols]
    q = torch.round(w / s_full).clamp_(-8, 7).to(torch.int8)
    return pack(q), s
