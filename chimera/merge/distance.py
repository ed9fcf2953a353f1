"""Normalized distances between two parents' versions of a tensor (threshold delta, records, `chimera diff`).

On dequantized float32 values A (a parent) and B (the base), accumulated in float64 over row chunks:

    relative   d = ||A - B||_F / ||B||_F
    symmetric  d = 2 ||A - B||_F / (||A||_F + ||B||_F)
    rms        d = ||A - B||_F / sqrt(numel)

With more than two parents a tensor's distance is the largest of any parent to the base. Identical
tensors give 0; a zero denominator gives 0 if A == B, else inf. numpy only (no torch), so a merge
that only copies bytes records distances without importing torch. Memory: one row chunk per parent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from chimera.checkpoint.decode import read_array

CHUNK_ELEMS = 1 << 23  # elements per row chunk (32 MB of float32)


def row_chunks(shape: tuple[int, ...], block: int, elems: int = CHUNK_ELEMS) -> list[tuple[int, int] | None]:
    """Block-aligned row ranges of about `elems` elements covering a tensor; [None] for 0-d/1-d/empty."""
    if len(shape) < 2 or shape[0] == 0:
        return [None]
    row = 1
    for d in shape[1:]:
        row *= d
    step = max(block, (elems // max(row, 1)) // block * block)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


@dataclass
class Norms:
    """Running sums of squares: ||A-B||^2, ||A||^2, ||B||^2 and the element count."""

    diff2: float = 0.0
    a2: float = 0.0
    b2: float = 0.0
    numel: int = 0

    def add(self, a, b, b2: float | None = None) -> None:
        """Add one chunk (numpy arrays, or anything `np.asarray` takes, e.g. CPU torch tensors).

        Everything in float64, over 64K pieces with numpy's own loops (no BLAS threads: those thrash
        on a busy machine). `b2`: the chunk's ||B||^2 when the caller already has it (the base is
        shared by every parent).
        """
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        step = 1 << 16
        for i in range(0, a.size, step):
            d = a[i:i + step].astype(np.float64) - b[i:i + step]
            self.diff2 += float(np.einsum("i,i->", d, d))
            self.a2 += sum_squares(a[i:i + step])
        self.b2 += sum_squares(b) if b2 is None else b2
        self.numel += a.size

    def add_sums(self, diff2: float, a2: float, b2: float, numel: int) -> None:
        """Add one chunk's sums computed elsewhere (`kernels.norms` on stored values)."""
        self.diff2 += diff2
        self.a2 += a2
        self.b2 += b2
        self.numel += numel

    def distance(self, metric: str) -> float:
        diff = math.sqrt(self.diff2)
        if metric == "relative":
            den = math.sqrt(self.b2)
        elif metric == "symmetric":
            den = (math.sqrt(self.a2) + math.sqrt(self.b2)) / 2
        elif metric == "rms":
            den = math.sqrt(self.numel)
        else:
            raise ValueError(f"unknown metric {metric}")
        if den == 0:
            return 0.0 if diff == 0 else math.inf
        if math.isnan(diff):
            return math.inf
        return diff / den


def sum_squares(x) -> float:
    """sum(x^2) in float64 (see `Norms.add`)."""
    x = np.asarray(x).reshape(-1)
    total = 0.0
    for i in range(0, x.size, 1 << 16):
        p = x[i:i + (1 << 16)].astype(np.float64)
        total += float(np.einsum("i,i->", p, p))
    return total


def distance(a, b, metric: str = "relative") -> float:
    """Distance of two whole tensors (see module docstring)."""
    n = Norms()
    n.add(a, b)
    return n.distance(metric)


PLAIN_FLOATS = ("BF16", "F16", "F32")


def stored_values(stored, rows: tuple[int, int] | None, mapped=None) -> tuple:
    """Rows of a stored tensor as the norms kernels read them: plain bf16/f16/f32 as stored (array, tag),
    block FP8 with float32 scales as (codes, "FP8", scales, block), anything else (other scale dtypes,
    MXFP4, INT4) as float32 through `read_array`.
    The bytes are views of the mapped parent files (`reader.Mapped`): nothing is copied."""
    from chimera.merge import kernels
    from chimera.merge.reader import Mapped

    mapped = mapped or Mapped([])
    shape = tuple(stored.weight.shape) if rows is None else (rows[1] - rows[0], *stored.weight.shape[1:])
    if stored.format == "plain" and stored.dtype in PLAIN_FLOATS:
        return mapped.view(stored.weight, rows).view(kernels.NUMPY[stored.dtype]).reshape(shape), stored.dtype
    if stored.format == "fp8_block" and stored.scale.dtype == "F32" and stored.dtype == "F8_E4M3":
        b = stored.block
        r0, r1 = rows if rows is not None else (0, shape[0])
        sc = mapped.view(stored.scale, (r0 // b, -(-r1 // b))).view(np.float32)
        return (mapped.view(stored.weight, rows).reshape(shape), "FP8",
                sc.reshape(-(-r1 // b) - r0 // b, -1), b)
    return read_array(stored, rows), "F32"


class ToBase:
    """max_i d(P_i, B) of one output tensor, fed chunk by chunk (`add`), for every non-base parent.

    `add_later` queues a chunk on `worker` (one thread: chunks are summed in the order they were queued, so
    the float64 sums are the same as `add`'s); `value` waits for the queued chunks. A copy uses it so the
    distance sums run on another core while the kernel copies the bytes."""

    def __init__(self, item, worker=None):
        from chimera.merge.reader import Mapped

        self.item = item
        self.norms = {s.parent: Norms() for s in item.others}
        self.mapped = Mapped([])  # the parents' files, mapped once per tensor
        self.worker = worker
        self.queued: list = []

    def add_later(self, rows: tuple[int, int] | None) -> None:
        if self.worker is None:
            self.add(rows)
        else:
            self.queued.append(self.worker.submit(self.add, rows))

    def close(self) -> None:
        """Unmap the parents' files (after the last chunk: queued behind it on the worker). Mapped pages count
        in the process's resident memory while they stay mapped."""
        if self.worker is None:
            self.mapped.__exit__()
        else:
            self.queued.append(self.worker.submit(self.mapped.__exit__))

    def add(self, rows: tuple[int, int] | None, arrays: dict | None = None) -> None:
        """Add rows [r0, r1); `arrays` may hold parents' values of those rows already read: float32
        arrays, or what `stored_values` returns."""
        from chimera.merge import kernels

        def values(p: str) -> tuple:
            v = (arrays or {}).get(p)
            if v is None:
                return stored_values(self.item.source(p).stored, rows, self.mapped)
            return v if isinstance(v, tuple) else (v, "F32")

        def as_float(v: tuple) -> tuple:
            return (kernels.decode_fp8(v[0], v[2], v[3]), "F32") if v[1] == "FP8" else v

        b = values(self.item.base)
        for p, n in self.norms.items():
            a = values(p)
            if a[1] == b[1] == "FP8" and a[3] == b[3]:
                sums = kernels.norms_fp8(a[0], a[2], b[0], b[2], a[3])     # straight from the codes
            else:
                (fa, ta), (fb, tb) = as_float(a), as_float(b)
                sums = kernels.norms(fa, ta, fb, tb)
            n.add_sums(*sums, a[0].size)
        a = b = None  # drop the views before unmapping
        self.mapped.__exit__()  # unmapped after each chunk: resident memory stays one chunk per parent

    def value(self, metric: str | None = None) -> float:
        for f in self.queued:
            f.result()
        self.queued.clear()
        metric = metric or self.item.metric
        return max((n.distance(metric) for n in self.norms.values()), default=0.0)


def distance_to_base(item, metric: str | None = None, chunk_elems: int = CHUNK_ELEMS) -> float:
    """max_i d(P_i, base) over the non-base parents, on dequantized values, chunk by chunk."""
    acc = ToBase(item)
    if acc.norms:
        for rows in row_chunks(item.shape, item.align, chunk_elems):
            acc.add(rows)
    acc.close()
    return acc.value(metric)
