"""Read a tensor's chunks one step ahead of the arithmetic.

    with Prefetcher(plan_of_reads, pinned=False) as chunks:     # or Mapped(plan_of_reads)
        for parts in chunks:          # parts[k]: the bytes of read k of this chunk (numpy uint8 view)
            ...                       # while this runs, the next chunk is being read

`Mapped` (the CPU path) maps each parent file read-only and hands out views of the page cache, so
no byte is copied before the kernel reads it; the next chunk is requested with
`madvise(MADV_WILLNEED)`, which makes the kernel read it from disk in the background when it is not
cached, and the chunk before is dropped from the mapping (`MADV_DONTNEED`: its pages stay in the page cache
but leave this process's resident memory). A parent file truncated by someone else during the merge makes
the next access past its new end a SIGBUS: inside the C kernels (`kernels.c`, which do every read of mapped
bytes when they are built) it is caught and becomes a one-line error naming the file; on the torch fallback
(no C compiler) it still ends the process. Parents must not change while they are merged.
`Prefetcher` (a device: pinned buffers for asynchronous uploads) reads into buffers:

Each chunk is a list of reads `(TensorInfo, rows)` (a parent's weight rows, its scale rows). A reader
thread fills chunk i+1 while the caller computes chunk i (`os.preadv` releases the GIL, so reading and
computing overlap on two cores). Buffers are reused in two slots, so memory is two chunks of stored
bytes whatever the tensor size. With `pinned=True` the buffers are page-locked host memory (torch,
CUDA), so a device copy from them can run asynchronously; the caller must be done with chunk i's
buffers (its device copy finished) before it asks for chunk i+2, which iteration order guarantees
when it synchronizes before the next step.
"""
from __future__ import annotations

import mmap
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


class Mapped:
    """Iterate over chunks of reads as views of read-only file mappings; the next chunk is advised in."""

    def __init__(self, chunks: list[list[Read]]):
        self.chunks = chunks
        self.maps: dict = {}

    def __enter__(self) -> "Mapped":
        return self

    def __exit__(self, *exc) -> None:
        for mm in self.maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a view: the map closes when that goes
                pass
        self.maps.clear()

    def _map(self, info: TensorInfo) -> mmap.mmap:
        mm = self.maps.get(info.file)
        if mm is None:
            try:
                with open(info.file, "rb") as f:
                    if os.fstat(f.fileno()).st_size < info.end:
                        raise ChimeraError(f"{info.file}: short file: tensor {info.name} ends past its end "
                                           "(file changed while merging?)")
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise ChimeraError(f"{info.file}: cannot read tensor {info.name} ({e.strerror or e})") from None
            self.maps[info.file] = mm
        return mm

    def view(self, info: TensorInfo, rows: tuple[int, int] | None) -> np.ndarray:
        """The stored bytes of rows [r0, r1) of a tensor, as a read-only view of its mapped file."""
        start, nbytes = row_span(info, rows)
        return np.frombuffer(self._map(info), np.uint8, count=nbytes, offset=start) if nbytes else np.empty(0, np.uint8)

    def _views(self, i: int) -> list[np.ndarray]:
        return [self.view(info, rows) for info, rows in self.chunks[i]]

    def _advise(self, i: int, advice: int) -> None:
        page = mmap.PAGESIZE
        for info, rows in self.chunks[i]:
            start, nbytes = row_span(info, rows)
            a = start // page * page
            if nbytes:
                try:
                    self._map(info).madvise(advice, a, start + nbytes - a)
                except (OSError, AttributeError, ValueError):
                    return

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for i in range(len(self.chunks)):
            if i + 1 < len(self.chunks):
                self._advise(i + 1, mmap.MADV_WILLNEED)
            yield self._views(i)
            # the caller is done with chunk i: drop its pages from this process's mappings (they stay in the
            # page cache), so resident memory stays a chunk or two whatever the tensor size
            self._advise(i, mmap.MADV_DONTNEED)
