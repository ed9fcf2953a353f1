"""A checkpoint directory on disk: config, shard index, safetensors headers, lazy tensor reads.

Only safetensors are read (never pickle) and no code from the directory is run. Every shard's header
is validated by the safetensors library itself (`safe_open` reads just the header) before chimera
takes the raw byte offsets from it, so a read touches just one tensor's bytes and a verbatim copy never
decodes them. Any directory a user has is a model: plain folders, single-file or sharded models, and
Hugging Face hub-cache snapshots whose files are relative symlinks into `../../blobs/`.

Import-light: plain data and the standard library; torch is imported only where tensors are read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from chimera.checkpoint import formats
from chimera.checkpoint.formats import SCALE_SUFFIX, Stored, scale_name  # noqa: F401  (re-exported)
from chimera.errors import ChimeraError

if TYPE_CHECKING:
    import torch

# safetensors dtype tag -> bytes per element (the tags chimera reads and writes)
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER = 100 * 1024 * 1024


def torch_dtype(tag: str) -> torch.dtype:
    """The torch dtype of a safetensors tag (imports torch)."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
            "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[tag]


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

    def row_range(self, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
        """(absolute start, byte count, shape) of rows [r0, r1) of a 2-D+ tensor; the whole tensor for None."""
        if rows is None:
            return self.start, self.nbytes, self.shape
        row_bytes = self.nbytes // max(self.shape[0], 1)
        return (self.start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes,
                (rows[1] - rows[0], *self.shape[1:]))


def _describe(path: Path, size: int) -> tuple[str, str]:
    """After the library refused a file: 'truncated' if its header's own length or offsets reach past
    the end of the file, else 'corrupt'; plus the first tensor whose byte length does not match its
    shape, when that is the problem (the library's message does not name it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "truncated", ""
            n = int.from_bytes(raw, "little")
            if n > MAX_HEADER:
                return "corrupt", ""
            if 8 + n > size:
                return "truncated", ""
            header = json.loads(f.read(n))
        entries = {k: h for k, h in header.items() if k != "__metadata__"}
        if entries and 8 + n + max(h["data_offsets"][1] for h in entries.values()) > size:
            return "truncated", ""
        for k, h in entries.items():
            numel = 1
            for d in h["shape"]:
                numel *= d
            a, b = h["data_offsets"]
            if h["dtype"] in ITEMSIZE and b - a != numel * ITEMSIZE[h["dtype"]]:
                return "corrupt", f"tensor {k}: {b - a} bytes for shape {h['shape']} of {h['dtype']}; "
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        pass
    return "corrupt", ""


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and absolute byte range in one safetensors file.

    The safetensors library validates the header first, as strictly as it does when loading (a JSON
    object; known dtypes; non-negative integer dims; offsets contiguous, in order, non-overlapping and
    covering the data exactly; byte length = numel x itemsize); chimera then keeps the raw offsets.
    """
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        with safe_open(str(path), framework="numpy"):
            pass
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except SafetensorError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind, detail = _describe(path, size)
        raise ChimeraError(f"{path}: {kind} safetensors file ({detail}{reason})") from None
    except OSError as e:
        raise ChimeraError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # the library accepted what json cannot parse: never seen, still one line
        raise ChimeraError(f"{path}: corrupt safetensors header ({e})".splitlines()[0]) from None
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        if h["dtype"] not in ITEMSIZE:
            raise ChimeraError(f"{path}: tensor {name} has dtype {h['dtype']}, which chimera does not read "
                               f"(supported: {', '.join(ITEMSIZE)})")
        a, b = h["data_offsets"]
        out[name] = TensorInfo(name, path, h["dtype"], tuple(int(d) for d in h["shape"]), base + a, base + b)
    return out


def read_bytes(info: TensorInfo, rows: tuple[int, int] | None = None) -> tuple[bytearray, tuple[int, ...]]:
    """The stored bytes of one tensor (or of rows [r0, r1) of a 2-D+ tensor) and their shape."""
    start, nbytes, shape = info.row_range(rows)
    buf = bytearray(nbytes)
    try:
        with open(info.file, "rb", buffering=0) as f:
            f.seek(start)
            view, got = memoryview(buf), 0
            while got < nbytes:
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
    except OSError as e:
        raise ChimeraError(f"{info.file}: cannot read tensor {info.name} ({e.strerror or e})") from None
    if got != nbytes:
        raise ChimeraError(f"{info.file}: short read of tensor {info.name} (file changed while reading?)")
    return buf, shape


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or a row range of a 2-D+ tensor) from disk into a fresh CPU tensor (imports torch)."""
    import torch

    buf, shape = read_bytes(info, rows)
    dtype = torch_dtype(info.dtype)
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


class Checkpoint:
    """A Hugging Face model directory: `config.json` plus one or more safetensors shards.

    Files may be symlinks (a hub-cache snapshot's are relative links into `../../blobs/`): a link is
    followed when its target stays inside the model directory or, for a snapshot
    (`.../snapshots/<rev>/`), inside that repository's cache folder. Index entries are plain relative
    names: one naming `../x` or an absolute path is refused.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise ChimeraError(f"{path}: not a model directory")
        if not (self.path / "config.json").is_file():
            raise ChimeraError(f"{self.path}: no config.json")
        self.hub_root = self.path.parent.parent if self.path.parent.name == "snapshots" else None
        self._check_inside(self.path / "config.json", self.path / "config.json")

    def _check_inside(self, p: Path, where: Path) -> Path:
        """`p` (a file of the model, maybe a symlink) if its target stays where links may point."""
        real = p.resolve()
        roots = [self.path] + ([self.hub_root] if self.hub_root else [])
        if not any(real == r or r in real.parents for r in roots):
            within = "the model directory" + (" and its hub cache folder" if self.hub_root else "")
            raise ChimeraError(f"{where}: {p.name} links to {real}, outside {within}")
        return p

    @cached_property
    def config(self) -> dict:
        try:
            cfg = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ChimeraError(f"{self.path / 'config.json'}: unreadable ({e})".splitlines()[0]) from None
        if not isinstance(cfg, dict):
            raise ChimeraError(f"{self.path / 'config.json'}: not a JSON object")
        return cfg

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @cached_property
    def _index(self) -> dict[str, str] | None:
        index = self.path / INDEX
        if not index.is_file():
            return None
        self._check_inside(index, index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ChimeraError(f"{index}: not a valid safetensors index (no weight_map)") from None
        return weight_map

    @cached_property
    def files(self) -> list[Path]:
        """The shard files, in index order; each must lie inside the directory (see the class doc)."""
        index = self.path / INDEX
        weight_map = self._index
        if weight_map is not None:
            files: dict[str, Path] = {}
            for tensor, fname in weight_map.items():
                if fname in files:
                    continue
                rel = Path(fname)
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise ChimeraError(f"{index}: tensor {tensor} points to {fname}, outside the model directory")
                p = self.path / rel
                if not p.is_file():
                    raise ChimeraError(f"{index}: tensor {tensor} points to missing file {fname}")
                files[fname] = self._check_inside(p, index)
            self._by_name = files
            return list(files.values())
        single = sorted(self.path.glob("*.safetensors"))
        if not single:
            bins = list(self.path.glob("*.bin")) + list(self.path.glob("*.pt"))
            what = " (only pickle weights, which chimera never loads)" if bins else ""
            raise ChimeraError(f"{self.path}: no safetensors weights{what}")
        return [self._check_inside(p, p) for p in single]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every stored tensor of the checkpoint, by on-disk name, from the validated shard headers."""
        out: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in read_header(f).items():
                if name in out:
                    raise ChimeraError(f"{f}: tensor {name} also stored in {out[name].file.name}")
                out[name] = info
        wm = self._index
        if wm is not None:
            for name, fname in wm.items():
                if name not in out:
                    raise ChimeraError(f"{self.path / INDEX}: tensor {name} is not in {fname}")
                if out[name].file is not self._by_name[fname]:
                    raise ChimeraError(f"{self.path / INDEX}: tensor {name} is in {out[name].file.name}, not {fname}")
        return out

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def ue8m0(self) -> bool:
        return formats.block_format(self.quantization, str(self.path / "config.json"))[1]

    def block_size(self) -> tuple[int, int]:
        b = formats.block_format(self.quantization, str(self.path / "config.json"))[0]
        return b, b

    @cached_property
    def stored(self) -> dict[str, Stored]:
        """Logical tensors (what a merge is planned over), each with its companions, checked."""
        return formats.group(self.tensors, self.quantization, str(self.path / "config.json"))

    def logical(self) -> dict[str, Stored]:
        return self.stored

    def scale_of(self, name: str) -> TensorInfo | None:
        """The `weight_scale_inv` companion of an FP8 weight, or None for an unquantized tensor."""
        s = self.stored.get(name)
        return s.scale if s is not None else None

    def side_files(self, skip: set[str] = frozenset()) -> list[Path]:
        """Files other than weights, index and hidden files (tokenizer, generation config, ...)."""
        out = []
        for p in sorted(self.path.iterdir()):
            if (p.name in skip or p.name == INDEX or p.name.startswith(".")
                    or p.name.endswith(WEIGHT_SUFFIXES) or not p.is_file()):
                continue
            out.append(self._check_inside(p, p))
        return out

    def read_float(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor as float32, dequantized if it is FP8. `rows` must be block-aligned for FP8."""
        return read_float(self.stored[name], rows)


def read_float(stored: Stored, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One stored tensor (or a block-aligned row range of it) as a float32 torch tensor (imports torch)."""
    import torch

    from chimera.checkpoint.decode import read_array

    return torch.from_numpy(read_array(stored, rows))
