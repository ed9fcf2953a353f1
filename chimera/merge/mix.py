"""The per-chunk arithmetic of a merge: W = sum_i lambda_i * W_i, then re-encode.

Generic path (any dtypes, any shape): dequantize each parent's rows to float32, accumulate, encode.
Fast path (every parent FP8, rows and columns whole 128-blocks, FP8 output) fuses the block math so
each element is touched a few times in cache-sized chunks:

    acc[b] = sum_i q_i[b] * (lambda_i * s_i[b])           # [Rb, 128, Nb, 128] float32
    s[b]   = max(amax|acc[b]|, 1e-4) / 448 ;  q[b] = e4m3(acc[b] / s[b])

Under `torch.compile` (C++ codegen on CPU) the fast path runs several times faster than eager
torch; it is used only when the merge is big enough to repay the ~15-45 s first compile.
"""
from __future__ import annotations

import threading

import torch

from chimera.checkpoint.fp8 import FP8, FP8_MAX


def mix_fp8_blocks(qs: list[torch.Tensor], ss: list[torch.Tensor], lams: torch.Tensor, ue8m0: bool = False,
                   block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 parents' row chunk [R, N] (R, N multiples of `block`) -> (q [R, N], s [R/b, N/b], amax)."""
    r, n = qs[0].shape
    rb, nb = r // block, n // block
    acc = qs[0].to(torch.float32).view(rb, block, nb, block).mul_((ss[0] * lams[0])[:, None, :, None])
    for i in range(1, len(qs)):
        acc.addcmul_(qs[i].to(torch.float32).view(rb, block, nb, block), (ss[i] * lams[i])[:, None, :, None])
    amax = torch.maximum(acc.amax(dim=(1, 3)), -acc.amin(dim=(1, 3)))      # [Rb, Nb]
    s = amax.clamp(min=1e-4) / FP8_MAX
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = acc.div_(s[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(r, n)
    return q, s, amax


_compiled = None
_lock = threading.Lock()


def compiled_mix_fp8_blocks():
    """`mix_fp8_blocks` under torch.compile (dynamic shapes), compiled once per process."""
    global _compiled
    with _lock:
        if _compiled is None:
            fn = torch.compile(mix_fp8_blocks, dynamic=True)
            q = torch.zeros(256, 384, dtype=FP8)  # warm up here, not concurrently in worker threads
            s = torch.ones(2, 3)
            for k in (1, 2, 3):
                fn([q] * k, [s] * k, torch.full((k,), 1.0 / k))
            _compiled = fn
    return _compiled
