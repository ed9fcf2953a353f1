"""Block FP8 (e4m3 codes, one `weight_scale_inv` per 128x128 block: float32 in DeepSeek's releases, bfloat16 or
float16 in Qwen3's, E8M0 powers of two in DeepSeek-V4's `scale`).

For a weight `q` of shape [M, N] stored as float8_e4m3fn and its scale `s` of shape
[ceil(M/128), ceil(N/128)] (float32), dequantization *multiplies* (edge blocks are partial and use
their own scale):

    W[i, j] = float(q[i, j]) * s[i // 128, j // 128]

Quantization of a float32 W, per block b (the inverse used by DeepSeek's `act_quant`/`weight_quant`):

    s_b = max(amax(|W_b|), 1e-4) / 448                      (448 = largest finite e4m3 value)
    s_b = pow2_ceil(s_b)                                    (only for `scale_fmt: ue8m0`: the smallest power of
                                                             two >= s_b, exactly; see `pow2_ceil`)
    s_b = float(bf16(s_b))                                  (only for bf16/f16 stored scales: q uses the
                                                             scale as stored; a rounded-down scale can push
                                                             a block maximum past 448, which saturates)
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


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s, for float32 s > 0 (DeepSeek's `ue8m0` scale rule), exactly.

    With s = m * 2^e, m in [0.5, 1) (`frexp`, exact on the float32 bits): s itself when m == 0.5 (s is a power
    of two), else 2^e. This is what the C kernels compute on the bits (`kernels.c: block_scale`: a non-zero
    mantissa rounds the exponent up). `exp2(ceil(log2(s)))` is not: log2 rounds, so an s just above 2^k can
    give 2^k (the scale then rounds *down* and the block's largest value saturates at 448).
    Since 448 = 7 * 2^6 has three significant bits, s = fl(amax / 448) is above 2^k exactly when amax / 448 is,
    so this is also the smallest power of two >= amax / 448 itself.
    """
    m, e = torch.frexp(s)
    return torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))


def e8m0_bytes(s: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales -> their E8M0 bytes (the biased exponent): 2^k -> k + 127."""
    return (torch.frexp(s)[1] - 1 + 127).to(torch.uint8)


def quantize(w: torch.Tensor, block: int = BLOCK, ue8m0: bool = False,
             scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, N] -> (float8_e4m3fn codes [M, N], scales [Mb, Nb] in `scale_dtype`).

    Raises FloatingPointError if `w` holds NaN or Inf (found through the block maxima, no extra pass).
    """
    wb, m, n = _blocks(w.to(torch.float32), block)          # [Mb, B, Nb, B]
    amax = wb.abs().amax(dim=(1, 3))                        # [Mb, Nb]
    if not bool(torch.isfinite(amax).all()):
        raise FloatingPointError("non-finite value")
    s = amax.clamp(min=1e-4) / FP8_MAX                      # [Mb, Nb]
    if ue8m0:
        s = pow2_ceil(s)
    stored = s.to(scale_dtype)
    q = (wb / stored.to(torch.float32)[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.view(wb.shape[0] * block, wb.shape[2] * block)[:m, :n].contiguous()
    return q, stored
