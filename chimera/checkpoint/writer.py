"""Sharded safetensors output: precomputed header, streamed tensor bytes, temp file + atomic rename.

A shard's header (names, dtypes, shapes, byte offsets) is known from the plan before any tensor is
computed, so the file is laid out up front and each tensor (or row range of one) is written at its
offset as soon as it is ready: memory holds one piece at a time, never a shard. The file is written
as `.NAME.partial` and renamed to NAME only when complete, so a file with a final name is whole.
`progress.json` in `.chimera/` records finished shards for `--resume`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from chimera.checkpoint.files import DTYPES, INDEX

STATE_DIR = ".chimera"


@dataclass(frozen=True)
class Slot:
    """One output tensor's place in its shard."""

    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
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


class ShardFile:
    """A shard being written: `write(name, tensor, row_offset_bytes)` at precomputed offsets."""

    def __init__(self, path: Path, slots: list[Slot]):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.slots = {s.name: s for s in slots}
        head, self.offsets = layout(slots)
        self.size = len(head) + sum(s.nbytes for s in slots)
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, head, 0)

    def write(self, name: str, t: torch.Tensor, at: int = 0) -> None:
        """Write tensor bytes for `name`, starting `at` bytes into that tensor's data."""
        slot = self.slots[name]
        want = DTYPES[slot.dtype][0]
        if t.dtype != want:
            raise TypeError(f"{name}: got {t.dtype}, slot is {want}")
        data = t.contiguous().view(torch.uint8).reshape(-1).numpy()
        if at + data.nbytes > slot.nbytes:
            raise ValueError(f"{name}: write past the end of the tensor")
        mv = memoryview(data)
        off = self.offsets[name] + at
        while len(mv):
            n = os.pwrite(self.fd, mv, off)
            mv, off = mv[n:], off + n

    def copy_from(self, name: str, src: Path, start: int, nbytes: int, at: int = 0) -> None:
        """Copy `nbytes` raw bytes from `src` (at `start`) into `name`'s data: no decode, kernel copy."""
        off = self.offsets[name] + at
        with open(src, "rb") as f:
            fd_in = f.fileno()
            left, src_off = nbytes, start
            while left:
                try:
                    n = os.copy_file_range(fd_in, self.fd, left, src_off, off)
                except OSError:
                    n = os.pwrite(self.fd, os.pread(fd_in, min(left, 64 << 20), src_off), off)
                if n <= 0:
                    raise OSError(f"short copy from {src}")
                left, src_off, off = left - n, src_off + n, off + n

    def commit(self) -> None:
        """fsync, close and atomically rename the finished shard to its final name."""
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_index(out: Path, shards: dict[str, list[Slot]]) -> None:
    """`model.safetensors.index.json` for a multi-shard output (HF layout)."""
    total = sum(s.nbytes for slots in shards.values() for s in slots)
    weight_map = {s.name: fname for fname, slots in shards.items() for s in slots}
    write_json_atomic(out / INDEX, {"metadata": {"total_size": total},
                                    "weight_map": dict(sorted(weight_map.items()))})


class Progress:
    """`.chimera/progress.json`: the plan's id and the shards already finished (for --resume)."""

    def __init__(self, out: Path, plan_id: str):
        self.dir = out / STATE_DIR
        self.path = self.dir / "progress.json"
        self.plan_id = plan_id
        self.done: dict[str, int] = {}
        self.compiled: bool | None = None

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return json.loads(self.path.read_text())
        except ValueError:
            return None

    def mark(self, shard: str, size: int) -> None:
        self.done[shard] = size
        self.dir.mkdir(exist_ok=True)
        write_json_atomic(self.path, {"plan_id": self.plan_id, "compiled": self.compiled, "done": self.done})
