"""DeepSeek block FP8 (e4m3 codes, one float32 `weight_scale_inv` per 128x128 block).

For a weight `q` of shape [M, N] stored as float8_e4m3fn and its scale `s` of shape
[ceil(M/128), ceil(N/128)] (float32), dequantization *multiplies* (edge blocks are partial and use
their own scale):

    W[i, j] = float(q[i, j]) * s[i // 128, j // 128]

Quantization of a float32 W, per block b (the inverse used by DeepSeek's `act_quant`/`weight_quant`):

    s_b = max(amax(|W_b|), 1e-4) / 448                      (448 = largest finite e4m3 value)
    s_b = 2 ** ceil(log2(s_b))                              (only for `scale_fmt: ue8m0`)
    q_b = float8_e4m3fn(clamp(W_b / s_b, -448, 448))        (round to nearest even)
"""
from __future__ import annotations

import math

import torch

from chimera.checkpoint.formats import BLOCK, scale_shape  # noqa: F401  (re-exported)

FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad an [M, N] tensor to whole blocks and view it as [Mb, block, Nb, block]."""
    m, n = x.shape
    mb, nb = math.ceil(m / block), math.ceil(n / block)
    if (mb * block, nb * block) != (m, n):
        x = torch.nn.functional.pad(x, (0, nb * block - n, 0, mb * block - m))
    return x.view(mb, block, nb, block), m, n


def dequantize(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float8 codes [M, N] x block scales [Mb, Nb] -> float32 [M, N]."""
    if q.dim() != 2 or s.shape != scale_shape(tuple(q.shape), block):
        raise ValueError(f"scale shape {tuple(s.shape)} does not fit weight shape {tuple(q.shape)}")
    qb, m, n = _blocks(q.to(torch.float32), block)          # [Mb, B, Nb, B]
    w = qb * s.to(torch.float32)[:, None, :, None]          # [Mb, B, Nb, B]
    return w.view(qb.shape[0] * block, qb.shape[2] * block)[:m, :n]


def quantize(w: torch.Tensor, block: int = BLOCK, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, N] -> (float8_e4m3fn codes [M, N], float32 scales [Mb, Nb]).

    Raises FloatingPointError if `w` holds NaN or Inf (found through the block maxima, no extra pass).
    """
    wb, m, n = _blocks(w.to(torch.float32), block)          # [Mb, B, Nb, B]
    amax = wb.abs().amax(dim=(1, 3))                        # [Mb, Nb]
    if not bool(torch.isfinite(amax).all()):
        raise FloatingPointError("non-finite value")
    s = amax.clamp(min=1e-4) / FP8_MAX                      # [Mb, Nb]
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (wb / s[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.view(wb.shape[0] * block, wb.shape[2] * block)[:m, :n].contiguous()
    return q, s
