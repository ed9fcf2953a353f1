"""The merge's per-chunk kernels in the stored formats, on numpy arrays of stored bytes (no torch).

    mix_float   bf16 / f16 / f32 parents -> sum_i lambda_i x_i in float32 -> one rounding to the output dtype
    mix_fp8     DeepSeek block-FP8 parents -> the mix, re-quantized per block (any shape; edge blocks partial)
    decode_fp8  block FP8 -> float32            encode_fp8  float32 -> block FP8

A format adds its own decode (stored -> float32) and encode (float32 -> stored) pair; the fused
kernels are the fast paths for the formats checkpoints are mostly in. Each runs the C kernels of
`kernels.c` (`native.py`) on `native.threads()` threads, or, without a C compiler, torch ops with
the same arithmetic and the same bytes (the float sums are fused multiply-adds, as torch's
vectorized `add_(x, alpha=l)` and `addcmul_` are on CPU):

    float mix   acc = x_0 * l_0 ; acc = fma(x_i, l_i, acc) ; out = round(acc)
    FP8 mix     acc = q_0 * (s_0 * l_0) ; acc = fma(q_i, s_i * l_i, acc)      per 128 x 128 block b
                s_b = max(amax_b |acc|, 1e-4) / 448   (ue8m0: the smallest power of two >= s_b)
                q = e4m3(clamp(acc / s_b, -448, 448))                          round to nearest even

Arrays: bf16 data travels as uint16 (numpy has no bfloat16), FP8 codes as uint8, scales as float32.
Every function also says whether a non-finite value came out (NaN/Inf in a parent).
"""
from __future__ import annotations

import ctypes

import numpy as np

from chimera.errors import ChimeraError
from chimera.merge import native

NATIVE = {"F32": native.F32, "BF16": native.BF16, "F16": native.F16}
NUMPY = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}
TILE = 1 << 16  # elements per float32 tile of the torch path (256 KB)


def non_finite(name: str) -> ChimeraError:
    return ChimeraError(f"tensor {name}: the mix produced NaN/Inf (non-finite values in a parent?)")


def fused_applies(it, srcs) -> bool:
    """The fused block kernel's case: DeepSeek block FP8 in and out (float32 scales, the output's block size),
    whole column blocks (its torch version, `mix.mix_fp8_blocks`, needs them; the C kernel would take partial
    ones too). Other scale dtypes (Qwen3's bf16, DeepSeek-V4's E8M0) take the generic path."""
    return (it.fp8_out and it.out.dtype == "F32" and len(it.shape) == 2 and it.shape[0] > 0
            and it.shape[1] % it.block == 0
            and all(s.scale is not None and s.scale.dtype == "F32" and s.weight.dtype == "F8_E4M3"
                    and s.block == it.block for s in srcs))


def fused_float_applies(it, srcs) -> bool:
    """The fused float kernel's case: plain bf16 / f16 / f32 in, one of them out."""
    return (it.out.format == "plain" and it.dtype in NATIVE
            and all(s.stored.format == "plain" and s.stored.dtype in NATIVE for s in srcs))


def as_torch(a: np.ndarray, tag: str = ""):
    """A numpy array of stored values as a CPU torch tensor sharing its memory (bf16 reinterpreted). A
    read-only array (a view of a mapped parent file) is shared as it is: nothing here writes inputs."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if tag == "BF16" else t


def as_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy stored values (bf16 -> uint16, FP8 -> uint8)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8).numpy()
    return t.numpy()


def scratch(buf: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An output array of `shape` in the front of a reused buffer (fresh pages cost a fault and a zeroing
    each), or a new array when `buf` is None or too small."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if buf is None or buf.nbytes < n:
        return np.empty(shape, dtype=dtype)
    return buf.reshape(-1).view(np.uint8)[:n].view(dtype).reshape(shape)


def mix_float(xs: list[np.ndarray], tags: list[str], lams: list[float], out_tag: str,
              buf: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """sum_i lams[i] * xs[i] (stored as `tags`, one shape) in float32, rounded once to `out_tag`
    (written into the front of `buf` when it is big enough)."""
    xs = [np.ascontiguousarray(x) for x in xs]
    out = scratch(buf, xs[0].shape, NUMPY[out_tag])
    n = out.size
    lib = native.lib()
    if n == 0:
        return out, False
    if lib is not None:
        if len(xs) == 2 and tags == ["BF16", "BF16"] and out_tag == "BF16":
            a, b, o = native.ptr(xs[0]), native.ptr(xs[1]), native.ptr(out)
            bad = native.split(lambda i, j: lib.mix2_bf16(i, j, a, b, lams[0], lams[1], o), n)
        else:
            k = len(xs)
            p, dts = native.ptrs(xs), (ctypes.c_int * k)(*[NATIVE[t] for t in tags])
            lam_c, o = (ctypes.c_float * k)(*lams), native.ptr(out)
            bad = native.split(lambda i, j: lib.mix_float(i, j, k, p, dts, lam_c, o, NATIVE[out_tag]), n)
        return out, bool(bad)
    out_t, bad = torch_mix_float([as_torch(x, t) for x, t in zip(xs, tags)], lams, out_tag, TILE)
    return as_numpy(out_t), bad


def torch_mix_float(xs: list, lams: list[float], out_tag: str, tile: int | None = TILE):
    """`mix_float` in torch ops on the tensors' device, `tile` elements of float32 at a time (None:
    the whole chunk at once). Returns (tensor in the output dtype, any non-finite)."""
    import torch

    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[out_tag]
    out = torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device)
    n = out.numel()
    step = tile or max(n, 1)
    src, flat = [x.reshape(-1) for x in xs], out.view(-1)
    bad = torch.zeros((), dtype=torch.bool, device=out.device)
    for a in range(0, n, step):
        acc = src[0][a:a + step].to(torch.float32) * lams[0]             # [step] float32, a new tensor
        for x, lam in zip(src[1:], lams[1:]):
            acc.add_(x[a:a + step].to(torch.float32), alpha=lam)
        bad |= ~torch.isfinite(acc.sum())
        flat[a:a + step] = acc
    return out, bool(bad)


def mix_fp8(qs: list[np.ndarray], ss: list[np.ndarray], lams: list[float], ue8m0: bool = False,
            block: int = 128, buf: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """FP8 parents' codes [R, N] (rows from a block boundary) and scales [ceil(R/b), ceil(N/b)] ->
    (codes [R, N], scales, any non-finite), mixed and re-quantized block by block (codes written into
    the front of `buf` when it is big enough)."""
    r, n = qs[0].shape
    rb, nb = -(-r // block), -(-n // block)
    lib = native.lib()
    if lib is not None and len(qs) <= 16 and block <= 256 and r * n:
        qs = [np.ascontiguousarray(q, dtype=np.uint8) for q in qs]
        ss = [np.ascontiguousarray(s, dtype=np.float32) for s in ss]
        q_out = scratch(buf, (r, n), np.uint8)
        s_out = np.empty((rb, nb), dtype=np.float32)
        qp, sp, k = native.ptrs(qs), native.ptrs(ss), len(qs)
        lam_c, qo, so = (ctypes.c_float * k)(*lams), native.ptr(q_out), native.ptr(s_out)
        bad = native.split(lambda i, j: lib.mix_fp8(i, j, r, n, k, qp, sp, lam_c, int(ue8m0), block, qo, so), rb)
        return q_out, s_out, bool(bad)
    import torch

    from chimera.merge.mix import mix_fp8_blocks

    q, s, bad = torch_mix_fp8([as_torch(q) for q in qs], [as_torch(s.astype(np.float32, copy=False)) for s in ss],
                              torch.tensor(lams, dtype=torch.float32), ue8m0, block, mix_fp8_blocks)
    return q.numpy(), s.numpy(), bad


def torch_mix_fp8(qs: list, ss: list, lams, ue8m0: bool, block: int, kernel):
    """`mix_fp8` with torch's block kernel (`mix.mix_fp8_blocks`, or it compiled) on the tensors'
    device; codes as uint8 tensors, padded to whole blocks here. Returns (codes uint8, scales, bad)."""
    import torch

    r, n = qs[0].shape
    pad = (0, -n % block, 0, -r % block)
    qt = [torch.nn.functional.pad(q, pad).view(torch.float8_e4m3fn) for q in qs]
    q, s, amax = kernel(qt, ss, lams, ue8m0, block)
    return q[:r, :n].contiguous().view(torch.uint8), s, not bool(torch.isfinite(amax).all())


def decode_fp8(q: np.ndarray, s: np.ndarray, block: int = 128) -> np.ndarray:
    """FP8 codes [R, N] x block scales -> float32 [R, N]: W[i, j] = value(q[i, j]) * s[i // b, j // b]."""
    r, n = q.shape
    lib = native.lib()
    if lib is None or not q.size:
        import torch

        from chimera.checkpoint import fp8

        qt = as_torch(q).view(torch.float8_e4m3fn)
        return fp8.dequantize(qt, as_torch(s.astype(np.float32, copy=False)), block).numpy()
    q, s = np.ascontiguousarray(q, dtype=np.uint8), np.ascontiguousarray(s, dtype=np.float32)
    out = np.empty((r, n), dtype=np.float32)
    qp, sp, o = native.ptr(q), native.ptr(s), native.ptr(out)
    native.split(lambda i, j: lib.decode_fp8(i, j, n, qp, sp, s.shape[1], block, o), r)
    return out


def encode_fp8(w: np.ndarray, block: int = 128, ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """float32 [R, N] -> (FP8 codes [R, N], block scales, any non-finite): DeepSeek's block quantization."""
    r, n = w.shape
    rb, nb = -(-r // block), -(-n // block)
    lib = native.lib()
    if lib is None or not w.size:
        import torch

        from chimera.checkpoint import fp8

        wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        wb, _, _ = fp8._blocks(wt, block)                                     # [Rb, B, Nb, B]
        amax = wb.abs().amax(dim=(1, 3))
        bad = not bool(torch.isfinite(amax).all())
        s = amax.clamp(min=1e-4) / fp8.FP8_MAX
        s = fp8.pow2_ceil(s) if ue8m0 else s
        q = (wb / s[:, None, :, None]).clamp_(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
        q = q.view(rb * block, nb * block)[:r, :n].contiguous()
        return q.view(torch.uint8).numpy(), s.numpy(), bad
    w = np.ascontiguousarray(w, dtype=np.float32)
    q_out = np.empty((r, n), dtype=np.uint8)
    s_out = np.empty((rb, nb), dtype=np.float32)
    wp, qo, so = native.ptr(w), native.ptr(q_out), native.ptr(s_out)
    bad = native.split(lambda i, j: lib.encode_fp8(i, j, r, n, wp, int(ue8m0), block, qo, so), rb)
    return q_out, s_out, bool(bad)


def norms(a: np.ndarray, a_tag: str, b: np.ndarray, b_tag: str) -> tuple[float, float, float]:
    """(sum (a - b)^2, sum a^2, sum b^2) in float64 over two same-shape float chunks (bf16/f16/f32
    stored values), for `chimera.merge.distance.Norms`."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    lib = native.lib()
    if lib is not None and a.size:
        pa, pb, ta, tb = native.ptr(a), native.ptr(b), NATIVE[a_tag], NATIVE[b_tag]
        d2, a2, b2 = native.split_sums(lambda i, j, out: lib.norms_float(i, j, pa, ta, pb, tb, out), a.size, 3)
        return d2, a2, b2
    d2 = a2 = b2 = 0.0
    fa, fb = a.reshape(-1), b.reshape(-1)
    for i in range(0, fa.size, TILE):
        x, y = (_float64(v[i:i + TILE], t) for v, t in ((fa, a_tag), (fb, b_tag)))
        d = x - y
        d2, a2, b2 = d2 + float(d @ d), a2 + float(x @ x), b2 + float(y @ y)
    return d2, a2, b2


def _float64(x: np.ndarray, tag: str) -> np.ndarray:
    if tag == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def norms_fp8(qa: np.ndarray, sa: np.ndarray, qb: np.ndarray, sb: np.ndarray, block: int = 128
              ) -> tuple[float, float, float]:
    """`norms` of two block-FP8 chunks (codes [R, N], scales [ceil(R/b), ceil(N/b)]) on their decoded
    values, without decoding them into float32 arrays."""
    lib = native.lib()
    r, n = qa.shape
    if lib is None or not qa.size or block > 256:
        return norms(decode_fp8(qa, sa, block), "F32", decode_fp8(qb, sb, block), "F32")
    qa, qb = np.ascontiguousarray(qa, dtype=np.uint8), np.ascontiguousarray(qb, dtype=np.uint8)
    sa, sb = np.ascontiguousarray(sa, dtype=np.float32), np.ascontiguousarray(sb, dtype=np.float32)
    p = [native.ptr(x) for x in (qa, sa, qb, sb)]
    nb = sa.shape[1]
    step = max(1, native.SUM_PIECE // max(n, 1))          # rows per partial sum (fixed: thread-independent)
    pieces = list(range(0, r, step)) + [r]
    bufs = [(ctypes.c_double * 3)() for _ in range(len(pieces) - 1)]
    native.split(lambda i, j: native.combine([lib.norms_fp8(pieces[k], pieces[k + 1], n, p[0], p[1], p[2], p[3], nb,
                                                            block, bufs[k]) for k in range(i, j)]), len(bufs))
    return tuple(sum(b[k] for b in bufs) for k in range(3))
