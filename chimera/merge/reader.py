"""Read a tensor's chunks one step ahead of the arithmetic, into reused buffers.

    with Prefetcher(plan_of_reads, pinned=False) as chunks:
        for parts in chunks:          # parts[k]: the bytes of read k of this chunk (numpy uint8 view)
            ...                       # while this runs, the next chunk is being read

Each chunk is a list of reads `(TensorInfo, rows)` (a parent's weight rows, its scale rows). A reader
thread fills chunk i+1 while the caller computes chunk i (`os.preadv` releases the GIL, so reading and
computing overlap on two cores). Buffers are reused in two slots, so memory is two chunks of stored
bytes whatever the tensor size. With `pinned=True` the buffers are page-locked host memory (torch,
CUDA), so a device copy from them can run asynchronously; the caller must be done with chunk i's
buffers (its device copy finished) before it asks for chunk i+2, which iteration order guarantees
when it synchronizes before the next step.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from chimera.checkpoint.files import TensorInfo
from chimera.errors import ChimeraError

Read = tuple[TensorInfo, "tuple[int, int] | None"]


def row_span(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int]:
    """(absolute byte offset, byte count) of rows [r0, r1) of a stored tensor (all of it for None)."""
    if rows is None or not info.shape:
        return info.start, info.nbytes
    row = info.nbytes // max(info.shape[0], 1)
    return info.start + rows[0] * row, (rows[1] - rows[0]) * row


def read_into(info: TensorInfo, rows: tuple[int, int] | None, buf: np.ndarray) -> np.ndarray:
    """Read the rows' stored bytes into the front of `buf` (uint8); returns that view."""
    start, nbytes = row_span(info, rows)
    view = buf[:nbytes]
    try:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            got = 0
            mv = memoryview(view)
            while got < nbytes:
                k = os.preadv(fd, [mv[got:]], start + got)
                if k <= 0:
                    break
                got += k
        finally:
            os.close(fd)
    except OSError as e:
        raise ChimeraError(f"{info.file}: cannot read tensor {info.name} ({e.strerror or e})") from None
    if got != nbytes:
        raise ChimeraError(f"{info.file}: short read of tensor {info.name} (file changed while reading?)")
    return view


class Prefetcher:
    """Iterate over chunks of reads, each read into a reused buffer, the next chunk read ahead."""

    def __init__(self, chunks: list[list[Read]], pinned: bool = False):
        self.chunks = chunks
        self.pinned = pinned
        self.slots: list[list[tuple[np.ndarray, object]]] = [[], []]  # (buffer, pinned torch tensor behind it)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chimera-read")

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _buffer(self, slot: int, k: int, nbytes: int) -> np.ndarray:
        bufs = self.slots[slot]
        if k < len(bufs) and bufs[k][0].size >= nbytes:
            return bufs[k][0]
        if self.pinned:
            import torch

            t = torch.empty(max(nbytes, 1), dtype=torch.uint8).pin_memory()
            entry = (t.numpy(), t)  # torch.from_numpy of a view of it is pinned too
        else:
            entry = (np.empty(max(nbytes, 1), dtype=np.uint8), None)
        if k < len(bufs):
            bufs[k] = entry
        else:
            bufs.append(entry)
        return entry[0]

    def _read(self, i: int) -> list[np.ndarray]:
        slot = i % 2
        return [read_into(info, rows, self._buffer(slot, k, row_span(info, rows)[1]))
                for k, (info, rows) in enumerate(self.chunks[i])]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        if not self.chunks:
            return
        ahead: Future = self.pool.submit(self._read, 0)
        for i in range(len(self.chunks)):
            parts = ahead.result()
            if i + 1 < len(self.chunks):
                ahead = self.pool.submit(self._read, i + 1)
            yield parts
