"""The per-chunk arithmetic of a merge: W = sum_i lambda_i * W_i, then re-encode.

Generic path (any dtypes, any shape): dequantize each parent's rows to float32, accumulate, encode.
Fast path (every parent FP8, rows and columns whole 128-blocks, FP8 output) fuses the block math so
each element is touched a few times in cache-sized chunks:

    acc[b] = sum_i q_i[b] * (lambda_i * s_i[b])           # [Rb, 128, Nb, 128] float32
    s[b]   = max(amax|acc[b]|, 1e-4) / 448 ;  q[b] = e4m3(acc[b] / s[b])

Under `torch.compile` (C++ codegen on CPU, one compile per chunk shape) the fast path runs about 5x
faster than eager torch; it is used only when a merge is big enough to repay ~10-15 s of compile per
distinct tensor width.
"""
from __future__ import annotations

import ctypes
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
        s = pow2_ceil(s)
    q = acc.div_(s[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(r, n)
    return q, s, amax


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s (s > 0), exactly: s = m * 2^e with m in [0.5, 1)."""
    m, e = torch.frexp(s)
    return torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))


_compiled = None
_seen: set[tuple] = set()
_lock = threading.Lock()


def compiled_mix_fp8_blocks():
    """`mix_fp8_blocks` under torch.compile, specialized per chunk shape (static shapes vectorize
    far better on CPU than dynamic ones: measured 5x over eager, while `dynamic=True` was slower
    than eager). A new shape compiles once (~10-15 s), under a lock so worker threads don't race."""
    global _compiled
    with _lock:
        if _compiled is None:
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            _compiled = torch.compile(mix_fp8_blocks, dynamic=False)
    fn = _compiled

    def run(qs, ss, lams, ue8m0=False, block=128):
        key = (tuple(qs[0].shape), len(qs), ue8m0, block)
        if key not in _seen:
            with _lock:
                out = fn(qs, ss, lams, ue8m0, block)
                _seen.add(key)
            return out
        return fn(qs, ss, lams, ue8m0, block)

    return run


# ------------------------------------------------------------------ kernels in the stored dtype
# Each takes a chunk of rows and returns the output chunk; the fused C kernels (`native.py`) run when
# they can be built, else torch ops with the same arithmetic (same bytes, slower). Parent-by-parent
# order and rounding are those of the module docstring; the sums use fused multiply-adds, as torch's
# vectorized `add_(x, alpha=l)` / `addcmul_` do on CPU.

TILE = 1 << 16  # elements per float32 tile of the torch fallback (256 KB: stays in L2)
NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def mix_float(xs: list[torch.Tensor], lams: list[float], out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """sum_i lams[i] * xs[i] for bf16/f16/f32 parents of one shape, in float32 arithmetic, written in
    `out_dtype` (bf16/f16/f32) with one rounding: (out, any non-finite). No float32 copy of the chunk."""
    from chimera.merge import native

    out = torch.empty(xs[0].shape, dtype=out_dtype)
    n = out.numel()
    xs = [x.contiguous() for x in xs]
    lib = native.lib()
    if lib is not None and n and out_dtype in NATIVE_DTYPES and all(x.dtype in NATIVE_DTYPES for x in xs):
        lam_c = (ctypes.c_float * len(xs))(*lams)
        if len(xs) == 2 and xs[0].dtype == xs[1].dtype == out_dtype == torch.bfloat16:
            p = [x.data_ptr() for x in xs]
            bad = native.split(lambda a, b: lib.mix2_bf16(a, b, p[0], p[1], lams[0], lams[1], out.data_ptr()), n)
        else:
            dts = (ctypes.c_int * len(xs))(*[NATIVE_DTYPES[x.dtype] for x in xs])
            ptr = native.ptrs(xs)
            bad = native.split(lambda a, b: lib.mix_float(a, b, len(xs), ptr, dts, lam_c, out.data_ptr(),
                                                          NATIVE_DTYPES[out_dtype]), n)
        return out, bool(bad)
    flat, src = out.view(-1), [x.view(-1) for x in xs]
    bad = False
    for a in range(0, n, TILE):
        acc = src[0][a:a + TILE].to(torch.float32).mul_(lams[0])          # [TILE] float32
        for x, lam in zip(src[1:], lams[1:]):
            acc.add_(x[a:a + TILE].to(torch.float32), alpha=lam)
        bad = bad or not bool(torch.isfinite(acc.sum()))
        flat[a:a + TILE] = acc
    return out, bad


def _pad_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad an [R, N] tensor to whole blocks."""
    r, n = x.shape
    pr, pn = -r % block, -n % block
    if pr or pn:
        x = torch.nn.functional.pad(x.view(torch.uint8) if x.dtype == FP8 else x, (0, pn, 0, pr))
    return x.view(FP8) if x.dtype == torch.uint8 else x


def mix_fp8(qs: list[torch.Tensor], ss: list[torch.Tensor], lams: list[float], ue8m0: bool = False,
            block: int = 128) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """FP8 parents' rows [R, N] (R a multiple of `block` unless it is the tensor's last chunk; any N)
    with scales [ceil(R/b), ceil(N/b)] -> (codes [R, N], scales, any non-finite), fused per block."""
    from chimera.merge import native

    r, n = qs[0].shape
    rb, nb = -(-r // block), -(-n // block)
    lib = native.lib()
    if lib is not None and len(qs) <= 16 and block <= 256 and r * n:
        qs = [q.contiguous() for q in qs]
        ss = [s.to(torch.float32).contiguous() for s in ss]
        q_out = torch.empty((r, n), dtype=FP8)
        s_out = torch.empty((rb, nb), dtype=torch.float32)
        qp, sp = native.ptrs(qs), native.ptrs(ss)
        lam_c = (ctypes.c_float * len(qs))(*lams)
        bad = native.split(lambda a, b: lib.mix_fp8(a, b, r, n, len(qs), qp, sp, lam_c, int(ue8m0), block,
                                                    q_out.data_ptr(), s_out.data_ptr()), rb)
        return q_out, s_out, bool(bad)
    q, s, amax = mix_fp8_blocks([_pad_blocks(q, block) for q in qs], ss,
                                torch.tensor(lams, dtype=torch.float32), ue8m0, block)
    return q[:r, :n].contiguous(), s, not bool(torch.isfinite(amax).all())


def decode_fp8(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 codes [R, N] x block scales -> float32 [R, N] (`fp8.dequantize`, one fused pass)."""
    from chimera.checkpoint import fp8
    from chimera.merge import native

    lib = native.lib()
    r, n = q.shape
    if lib is None or not q.numel() or s.shape != fp8.scale_shape((r, n), block):
        return fp8.dequantize(q, s, block)
    q, s = q.contiguous(), s.to(torch.float32).contiguous()
    out = torch.empty((r, n), dtype=torch.float32)
    native.split(lambda a, b: lib.decode_fp8(a, b, n, q.data_ptr(), s.data_ptr(), s.shape[1], block,
                                             out.data_ptr()), r)
    return out


def encode_fp8(w: torch.Tensor, block: int = 128, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [R, N] -> (FP8 codes, block scales) (`fp8.quantize`, one fused pass); raises
    FloatingPointError on NaN/Inf like `fp8.quantize`."""
    from chimera.checkpoint import fp8
    from chimera.merge import native

    lib = native.lib()
    r, n = w.shape
    if lib is None or not w.numel():
        return fp8.quantize(w, block, ue8m0)
    w = w.to(torch.float32).contiguous()
    rb, nb = -(-r // block), -(-n // block)
    q_out = torch.empty((r, n), dtype=FP8)
    s_out = torch.empty((rb, nb), dtype=torch.float32)
    bad = native.split(lambda a, b: lib.encode_fp8(a, b, r, n, w.data_ptr(), int(ue8m0), block,
                                                   q_out.data_ptr(), s_out.data_ptr()), rb)
    if bad:
        raise FloatingPointError("non-finite value")
    return q_out, s_out
