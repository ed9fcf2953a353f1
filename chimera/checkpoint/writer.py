"""Sharded safetensors output: precomputed header, streamed tensor bytes, temp file + atomic rename.

A shard's header (names, dtypes, shapes, byte offsets) is known from the plan before any tensor is
computed, so the file is laid out up front and each tensor (or row range of one) is written at its
offset as soon as it is ready: memory holds one piece at a time, never a shard. The file is written
as `.NAME.<run>.partial` (unique per run) and renamed to NAME only when complete and fsynced, so a
file with a final name is whole. Any OSError (a full disk, an I/O error) becomes one `ChimeraError`
line naming the file. Import-light: no torch (callers hand in bytes-like buffers).
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from chimera.checkpoint.files import INDEX, ITEMSIZE
from chimera.errors import ChimeraError


@dataclass(frozen=True)
class Slot:
    """One output tensor's place in its shard."""

    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def layout(slots: list[Slot]) -> tuple[bytes, dict[str, int]]:
    """The header bytes (8-byte length + JSON padded to 8) and each tensor's absolute data offset."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    rel: dict[str, int] = {}
    for s in slots:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        rel[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    return head, {k: len(head) + v for k, v in rel.items()}


def shard_size(slots: list[Slot]) -> int:
    """Bytes of the shard file that holds `slots` (header included)."""
    head, _ = layout(slots)
    return len(head) + sum(s.nbytes for s in slots)


def write_failed(path: Path, e: OSError) -> ChimeraError:
    return ChimeraError(f"{path}: cannot write ({e.strerror or e})")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardFile:
    """A shard being written: `write(name, buffer, at)` / `copy_from(...)` at precomputed offsets."""

    def __init__(self, path: Path, slots: list[Slot], run_id: str | None = None):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{run_id or os.getpid()}.partial")
        self.slots = {s.name: s for s in slots}
        head, self.offsets = layout(slots)
        self.size = len(head) + sum(s.nbytes for s in slots)
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise write_failed(self.tmp, e) from None
        try:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as e:
                raise write_failed(self.path, e) from None
            self._pwrite(memoryview(head), 0)
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, mv: memoryview, off: int) -> None:
        try:
            while len(mv):
                n = os.pwrite(self.fd, mv, off)
                mv, off = mv[n:], off + n
        except OSError as e:
            raise write_failed(self.path, e) from None

    def write(self, name: str, data, at: int = 0) -> None:
        """Write a bytes-like buffer (numpy array, bytearray) into `name`'s data, `at` bytes in."""
        slot = self.slots[name]
        mv = memoryview(data).cast("B")
        if at + len(mv) > slot.nbytes:
            raise ValueError(f"{name}: write past the end of the tensor")
        self._pwrite(mv, self.offsets[name] + at)

    def copy_from(self, name: str, src: Path, start: int, nbytes: int, at: int = 0) -> None:
        """Copy `nbytes` raw bytes from `src` (at `start`) into `name`'s data: no decode, kernel copy."""
        if at + nbytes > self.slots[name].nbytes:
            raise ValueError(f"{name}: copy past the end of the tensor")
        off = self.offsets[name] + at
        try:
            f = open(src, "rb")
        except OSError as e:
            raise ChimeraError(f"{src}: cannot read ({e.strerror or e})") from None
        with f:
            fd_in, left, src_off = f.fileno(), nbytes, start
            kernel = True
            while left:
                if kernel:
                    try:
                        n = os.copy_file_range(fd_in, self.fd, left, src_off, off)
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL,
                                           errno.EBADF, errno.EPERM):
                            raise ChimeraError(f"{self.path}: cannot copy {name} from {src} "
                                               f"({e.strerror or e})") from None
                        kernel = False
                        continue
                else:
                    try:
                        chunk = os.pread(fd_in, min(left, 64 << 20), src_off)
                    except OSError as e:
                        raise ChimeraError(f"{src}: cannot read ({e.strerror or e})") from None
                    self._pwrite(memoryview(chunk), off)
                    n = len(chunk)
                if n <= 0:
                    raise ChimeraError(f"{src}: short read while copying {name} (file changed?)")
                left, src_off, off = left - n, src_off + n, off + n

    def commit(self) -> None:
        """fsync, close and atomically rename the finished shard to its final name."""
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise write_failed(self.path, e) from None
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and remove the temp file (after an error)."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON durably: a temp file unique to this process, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(data)
            while len(mv):
                mv = mv[os.write(fd, mv):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_failed(path, e) from None
    fsync_dir(path.parent)


def write_index(out: Path, shards: dict[str, list[Slot]]) -> None:
    """`model.safetensors.index.json` for a multi-shard output (HF layout)."""
    total = sum(s.nbytes for slots in shards.values() for s in slots)
    weight_map = {s.name: fname for fname, slots in shards.items() for s in slots}
    write_json_atomic(out / INDEX, {"metadata": {"total_size": total},
                                    "weight_map": dict(sorted(weight_map.items()))})
