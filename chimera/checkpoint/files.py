"""A checkpoint directory on disk: config, shard index, safetensors headers, lazy tensor reads.

Only safetensors are read (never pickle) and no code from the directory is run. Every tensor is
located by (file, byte range) from its shard's header, so a read touches just that tensor's bytes and
a verbatim copy never decodes them.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from chimera.errors import ChimeraError

# safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
TAGS: dict[torch.dtype, str] = {dt: tag for tag, (dt, _) in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = ".weight_scale_inv"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte range, dtype tag, shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every byte range lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ChimeraError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ChimeraError(f"{path}: corrupt safetensors file (header length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ChimeraError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})".splitlines()[0]) from None
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (a, b) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ChimeraError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if dtype not in DTYPES:
            raise ChimeraError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        info = TensorInfo(name, path, dtype, shape, base + a, base + b)
        if info.nbytes != info.numel * DTYPES[dtype][1] or a < 0 or b < a:
            raise ChimeraError(f"{path}: corrupt safetensors header: tensor {name} has a byte range that does not fit its shape")
        if info.end > size:
            raise ChimeraError(f"{path}: truncated safetensors file: tensor {name} ends at byte {info.end} of {size}")
        out[name] = info
    return out


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or a row range of a 2-D+ tensor) from disk into a fresh CPU tensor."""
    dtype, width = DTYPES[info.dtype]
    shape = list(info.shape)
    start, nbytes = info.start, info.nbytes
    if rows is not None:
        row_bytes = info.nbytes // max(shape[0], 1)
        start += rows[0] * row_bytes
        nbytes = (rows[1] - rows[0]) * row_bytes
        shape[0] = rows[1] - rows[0]
    buf = bytearray(nbytes)
    with open(info.file, "rb", buffering=0) as f:
        got = _pread_into(f, buf, start)
    if got != nbytes:
        raise ChimeraError(f"{info.file}: short read of tensor {info.name}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def _pread_into(f, buf: bytearray, offset: int) -> int:
    f.seek(offset)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def scale_name(weight: str) -> str:
    """`x.weight` -> `x.weight_scale_inv`, the name of an FP8 weight's block scales."""
    return weight[: -len(".weight")] + SCALE_SUFFIX


class Checkpoint:
    """A Hugging Face model directory: `config.json` plus one or more safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise ChimeraError(f"{path}: not a model directory")
        if not (self.path / "config.json").is_file():
            raise ChimeraError(f"{self.path}: no config.json")

    @cached_property
    def config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ChimeraError(f"{self.path / 'config.json'}: unreadable ({e})".splitlines()[0]) from None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @cached_property
    def files(self) -> list[Path]:
        """The shard files, in index order; each is checked to lie inside the directory."""
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ChimeraError(f"{index}: not a valid safetensors index (no weight_map)") from None
            files: list[Path] = []
            for tensor, fname in weight_map.items():
                p = (self.path / fname).resolve()
                if p.parent != self.path:
                    raise ChimeraError(f"{index}: tensor {tensor} points to {fname}, outside the model directory")
                if not p.is_file():
                    raise ChimeraError(f"{index}: tensor {tensor} points to missing file {fname}")
                if p not in files:
                    files.append(p)
            self._weight_map = weight_map
            return files
        single = sorted(self.path.glob("*.safetensors"))
        if not single:
            bins = list(self.path.glob("*.bin")) + list(self.path.glob("*.pt"))
            what = " (only pickle weights, which chimera never loads)" if bins else ""
            raise ChimeraError(f"{self.path}: no safetensors weights{what}")
        self._weight_map = None
        return single

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor of the checkpoint, by on-disk name, from the shard headers."""
        out: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in read_header(f).items():
                if name in out:
                    raise ChimeraError(f"{f}: tensor {name} also stored in {out[name].file.name}")
                out[name] = info
        wm = getattr(self, "_weight_map", None)
        if wm is not None:
            for name, fname in wm.items():
                if name not in out:
                    raise ChimeraError(f"{self.path / INDEX}: tensor {name} is not in {fname}")
                if out[name].file.name != Path(fname).name:
                    raise ChimeraError(f"{self.path / INDEX}: tensor {name} is in {out[name].file.name}, not {fname}")
        return out

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def ue8m0(self) -> bool:
        q = self.quantization or {}
        return q.get("scale_fmt") == "ue8m0"

    def block_size(self) -> tuple[int, int]:
        q = self.quantization or {}
        bs = q.get("weight_block_size", [128, 128])
        return int(bs[0]), int(bs[1])

    def scale_of(self, name: str) -> TensorInfo | None:
        """The `weight_scale_inv` companion of an FP8 weight, or None for an unquantized tensor."""
        if not name.endswith(".weight"):
            return None
        return self.tensors.get(scale_name(name))

    def logical(self) -> dict[str, TensorInfo]:
        """Tensors without their scale companions (what a merge is planned over).

        Raises if an FP8 weight lacks its scale or a scale lacks its weight.
        """
        out = {}
        for name, info in self.tensors.items():
            if name.endswith(SCALE_SUFFIX):
                w = name[: -len(SCALE_SUFFIX)] + ".weight"
                if w not in self.tensors:
                    raise ChimeraError(f"{info.file}: scale {name} has no weight {w}")
                continue
            if info.dtype.startswith("F8") and self.scale_of(name) is None:
                raise ChimeraError(f"{info.file}: FP8 tensor {name} has no weight_scale_inv")
            out[name] = info
        return out

    def read_float(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor as float32, dequantized if it is FP8. `rows` must be block-aligned for FP8."""
        return read_float(self.tensors[name], self.scale_of(name), self.block_size()[0], rows)


def read_float(info: TensorInfo, scale: TensorInfo | None, block: int = 128,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One stored tensor (or a block-aligned row range of it) as float32; FP8 is dequantized."""
    from chimera.checkpoint import fp8

    t = read_tensor(info, rows)
    if not info.dtype.startswith("F8"):
        return t.to(torch.float32)
    if scale is None:
        raise ChimeraError(f"{info.file}: FP8 tensor {info.name} has no weight_scale_inv")
    s = read_tensor(scale)
    if rows is not None:
        s = s[rows[0] // block: -(-rows[1] // block)]
    try:
        return fp8.dequantize(t, s, block)
    except ValueError as e:
        raise ChimeraError(f"{info.file}: tensor {info.name}: {e}") from None
