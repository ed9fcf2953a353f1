"""Stored bytes -> float32 values with numpy (no torch): what distances and the generic mix read.

    plain float / int     the value, as float32 (bf16 widened exactly: its 16 bits are float32's top half)
    FP8 (e4m3fn, e5m2)    a 256-entry table of every code's exact value
    block FP8             W[i, j] = q[i, j] * s[i // B, j // B]    (one float32 rounding of the product,
                                                                    bitwise what torch computes)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from chimera.checkpoint.files import read_bytes
from chimera.checkpoint.formats import Stored

_PLAIN = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.uint8}
_FP8 = {"F8_E4M3": (4, 3, 7), "F8_E5M2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


@lru_cache(maxsize=None)
def fp8_table(tag: str) -> np.ndarray:
    """float32 [256]: the value of every code of an FP8 format (e4m3fn: no inf, NaN at S.1111.111;
    e5m2: IEEE-like, inf and NaN at exponent 31)."""
    ebits, mbits, bias = _FP8[tag]
    c = np.arange(256, dtype=np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e = (c >> mbits) & ((1 << ebits) - 1)
    m = c & ((1 << mbits) - 1)
    frac = m / (1 << mbits)
    v = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias))
    top = (1 << ebits) - 1
    if tag == "F8_E4M3":
        v = np.where((e == top) & (m == (1 << mbits) - 1), np.nan, v)
    else:
        v = np.where(e == top, np.where(m == 0, np.inf, np.nan), v)
    return (sign * v).astype(np.float32)


@lru_cache(maxsize=None)
def _fp8_pair_table(tag: str) -> np.ndarray:
    """float64-sized [65536]: the two float32 values of every little-endian pair of FP8 codes (one
    lookup decodes two codes: 40% faster than the 256-entry table)."""
    t, i = fp8_table(tag), np.arange(65536)
    return np.stack([t[i & 0xFF], t[i >> 8]], axis=1).astype(np.float32).view(np.float64).reshape(-1)


def to_float32(buf: bytearray, tag: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of one dtype -> a fresh float32 array of `shape`."""
    if tag == "BF16":
        x = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif tag in _FP8 and len(buf) % 2 == 0:
        x = np.take(_fp8_pair_table(tag), np.frombuffer(buf, np.uint16)).view(np.float32)
    elif tag in _FP8:
        x = np.take(fp8_table(tag), np.frombuffer(buf, np.uint8))
    elif tag == "F32":
        x = np.frombuffer(buf, np.float32).copy()
    else:
        x = np.frombuffer(buf, _PLAIN[tag]).astype(np.float32)
    return x.reshape(shape)


def read_array(s: Stored, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One stored tensor (or rows [r0, r1) of it; r0 block-aligned for FP8) as float32, dequantized."""
    buf, shape = read_bytes(s.weight, rows)
    x = to_float32(buf, s.dtype, shape)
    if s.scale is None:
        return x
    b = s.block
    r0, r1 = rows if rows is not None else (0, shape[0])
    sbuf, sshape = read_bytes(s.scale, (r0 // b, -(-r1 // b)))
    sc = np.frombuffer(sbuf, np.float32).reshape(sshape)                   # [rb, Nb]
    cols = np.repeat(sc, b, axis=1)[:, : shape[1]]                         # [rb, N]: 1/B of x
    whole = (r1 - r0) // b
    if whole:
        view = x[: whole * b].reshape(whole, b, shape[1])                  # [wb, B, N]
        view *= cols[:whole, None, :]
    if (r1 - r0) % b:
        x[whole * b:] *= cols[whole]
    return x
