"""Stored formats: how one logical weight sits on disk, and how to read it as float32 or write it back.

A merge plans over logical tensors (the names the architecture classifies); each is stored in one format:

| format | stored tensors (logical name W) | releases |
| --- | --- | --- |
| plain | `W` (F32/F16/BF16, or an integer table) | everything unquantized |
| fp8_block | `W` float8_e4m3 `[M, N]` + `W_scale_inv` or `W.scale`\\* float32/E8M0 `[ceil(M/b), ceil(N/b)]` | DeepSeek V3/R1/V3.1/V3.2/V4, Kimi K2, Qwen3/GLM FP8 |
| mxfp4 | gpt-oss: `W_blocks` uint8 `[..., G, 16]` + `W_scales` uint8 `[..., G]`; DeepSeek-V4: `W` int8 `[M, N/2]` + `W.scale`\\* E8M0 `[M, N/32]` | gpt-oss, DeepSeek-V4 experts |
| int4_pack | `W_packed` int32 + `W_scale` + `W_shape` (compressed-tensors pack-quantized, symmetric, group 32) | Kimi K2-Thinking / K2.5 |
| opaque | `W` plus companions chimera has no codec for (`weight_scale_2`, `input_scale`, `weight_zero_point`, a per-tensor FP8 scale...) | NVFP4, asymmetric INT4, ... |

\\* `W.scale` is `x.scale` for `W = x.weight` (DeepSeek-V4's naming). Names with `.weight` are shown as
`W_scale_inv` = `x.weight_scale_inv`, `W_packed` = `x.weight_packed`, etc.

Every format can be copied byte for byte (all its stored tensors travel together). `read_float` dequantizes
plain, fp8_block, mxfp4 and int4_pack; an opaque tensor can't be read as float (a mix names it and refuses).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chimera.checkpoint.files import TensorInfo, read_tensor
from chimera.errors import ChimeraError

FORMATS = ("plain", "fp8_block", "mxfp4", "int4_pack", "opaque")
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
_OPAQUE_SUFFIXES = ("weight_scale_2", "input_scale", "weight_zero_point", "weight_global_scale",
                    "input_global_scale", "k_scale", "v_scale")


@dataclass(frozen=True)
class Stored:
    """One logical tensor as stored: its format, logical (dequantized, stored-orientation) shape and parts."""

    name: str
    format: str
    shape: tuple[int, ...]
    parts: dict[str, TensorInfo] = field(hash=False)   # role -> stored tensor (weight, scale, blocks, ...)
    block: int = 128                                     # fp8_block: block edge
    transposed: bool = False                             # gpt-oss MXFP4: blocks run along the logical axis -2

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def dtype(self) -> str:
        """The main stored tensor's dtype tag."""
        return next(iter(self.parts.values())).dtype

    def describe(self) -> str:
        if self.format == "plain":
            return self.dtype.lower()
        if self.format == "fp8_block":
            s = self.parts["scale"].dtype
            return f"fp8 e4m3 {self.block}x{self.block} blocks ({'ue8m0' if s in ('F8_E8M0', 'U8') else 'f32'} scales)"
        if self.format == "mxfp4":
            return "mxfp4 (e2m1, 32-blocks, e8m0)"
        if self.format == "int4_pack":
            return f"int4 pack-quantized (group 32, {self.parts['scale'].dtype.lower()} scales)"
        return "opaque (" + ", ".join(sorted(self.parts)) + ")"


def _base(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) else None


def group(tensors: dict[str, TensorInfo], block: int = 128) -> dict[str, Stored]:
    """Group a checkpoint's stored tensors into logical tensors with their formats.

    Raises ChimeraError (one line, naming the tensor) for a companion without its weight or a shape mismatch.
    """
    used: set[str] = set()
    out: dict[str, Stored] = {}

    def take(name, fmt, shape, parts, blk=block, transposed=False):
        used.update(p.name for p in parts.values())
        out[name] = Stored(name, fmt, tuple(shape), parts, blk, transposed)

    for name, info in tensors.items():
        # gpt-oss MXFP4: X_blocks [..., G, 16] + X_scales [..., G]
        b = _base(name, "_blocks")
        if b is not None and b + "_scales" in tensors:
            s = tensors[b + "_scales"]
            if info.dtype != "U8" or s.dtype != "U8" or info.shape[:-1] != s.shape or info.shape[-1] != 16:
                raise ChimeraError(f"{info.file}: {name} / {s.name} are not MXFP4 blocks [..., G, 16] and scales [..., G]")
            # blocks quantize the stored rows (output features); the logical tensor is transformers' in-memory
            # parameter, the transpose of the last two axes: [E, in, out]
            take(b, "mxfp4", (*s.shape[:-2], s.shape[-1] * 32, s.shape[-2]), {"blocks": info, "scales": s},
                 transposed=True)
            continue
        # compressed-tensors pack-quantized INT4
        b = _base(name, ".weight_packed")
        if b is not None:
            sc, sh = tensors.get(b + ".weight_scale"), tensors.get(b + ".weight_shape")
            if sc is None or sh is None:
                raise ChimeraError(f"{info.file}: {name} has no weight_scale / weight_shape")
            parts = {"packed": info, "scale": sc, "shape": sh}
            extra = {s: tensors[b + "." + s] for s in _OPAQUE_SUFFIXES if b + "." + s in tensors}
            if extra or info.dtype != "I32" or len(info.shape) != 2:
                take(b + ".weight", "opaque", info.shape, parts | extra)
            else:
                take(b + ".weight", "int4_pack", (info.shape[0], _int4_cols(info, sc, sh)), parts)
            continue
    for name, info in tensors.items():  # a weight and its companions
        if name in used or not name.endswith(".weight"):
            continue
        stem = name[: -len(".weight")]
        scale = tensors.get(name + "_scale_inv") or tensors.get(stem + ".scale")
        extra = {s: tensors[stem + "." + s] for s in _OPAQUE_SUFFIXES + ("weight_scale",) if stem + "." + s in tensors}
        if info.dtype == "F8_E4M3" and scale is not None and not extra and len(info.shape) == 2:
            take(name, "fp8_block", info.shape, {"weight": info, "scale": scale}, _fp8_block(info, scale, block))
        elif info.dtype in ("I8", "U8") and scale is not None and not extra and len(info.shape) >= 2 \
                and scale.shape == (*info.shape[:-1], -(-info.shape[-1] * 2 // 32)):
            take(name, "mxfp4", (*info.shape[:-1], info.shape[-1] * 2), {"weight": info, "scales": scale})
        elif scale is not None or extra or info.dtype.startswith("F8"):
            take(name, "opaque", info.shape, {"weight": info} | ({"scale": scale} if scale is not None else {}) | extra)
    for name, info in tensors.items():  # everything else is a plain tensor
        if name in used:
            continue
        if name.endswith((".weight_scale_inv", ".weight_packed")):
            raise ChimeraError(f"{info.file}: {name} is a quantization companion without its weight")
        take(name, "opaque" if info.dtype.startswith("F8") else "plain", info.shape, {"weight": info})
    return out


def _fp8_block(w: TensorInfo, s: TensorInfo, block: int) -> int:
    m, n = w.shape
    if len(s.shape) == 2 and s.shape == (-(-m // block), -(-n // block)):
        return block
    raise ChimeraError(f"{w.file}: FP8 tensor {w.name} {list(w.shape)} has a scale grid {list(s.shape)} that does not "
                       f"fit {block}x{block} blocks")


def _int4_cols(packed: TensorInfo, scale: TensorInfo, shape: TensorInfo) -> int:
    """Columns of a pack-quantized weight: from the packed and scale widths when they agree on one value,
    else from the stored `weight_shape` (two integers)."""
    words, groups = packed.shape[1], scale.shape[-1]
    lo, hi = max(8 * (words - 1), 32 * (groups - 1)) + 1, min(8 * words, 32 * groups)
    if lo == hi:
        return hi
    rows, cols = (int(x) for x in read_tensor(shape).reshape(-1).tolist())
    if rows != packed.shape[0] or not lo <= cols <= hi:
        raise ChimeraError(f"{packed.file}: {shape.name} {[rows, cols]} does not fit {packed.name} {list(packed.shape)}")
    return cols


def read_float(st: Stored, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A logical tensor (or a row range along its first axis) as float32, dequantized.

    fp8_block row ranges must be block-aligned; mxfp4 and int4 rows are any range (their blocks run along the
    last stored axis); for a fused `[E, ...]` tensor, rows are experts (gpt-oss MXFP4 is always read by expert)."""
    from chimera.checkpoint import fp8, int4, mxfp4

    if st.format == "plain":
        return read_tensor(st.parts["weight"], rows).to(torch.float32)
    try:
        if st.format == "fp8_block":
            q = read_tensor(st.parts["weight"], rows)
            s = _scale_f32(read_tensor(st.parts["scale"]), st.parts["scale"].dtype)
            if rows is not None:
                s = s[rows[0] // st.block: -(-rows[1] // st.block)]
            return fp8.dequantize(q, s, st.block)
        if st.format == "mxfp4":
            if "blocks" in st.parts:
                w = mxfp4.dequantize(read_tensor(st.parts["blocks"], rows), read_tensor(st.parts["scales"], rows))
                return w.transpose(-1, -2).contiguous()
            return mxfp4.dequantize(read_tensor(st.parts["weight"], rows), read_tensor(st.parts["scales"], rows))
        if st.format == "int4_pack":
            packed, scale = read_tensor(st.parts["packed"], rows), read_tensor(st.parts["scale"], rows)
            return int4.dequantize(packed, scale, (packed.shape[0], st.shape[1]))
    except ValueError as e:
        raise ChimeraError(f"{next(iter(st.parts.values())).file}: tensor {st.name}: {e}") from None
    raise ChimeraError(f"tensor {st.name}: {st.describe()} can't be read as numbers (no codec in chimera)")


def _scale_f32(s: torch.Tensor, tag: str) -> torch.Tensor:
    """FP8 block scales as float32: F32 as is, E8M0 bytes as 2^(e - 127)."""
    if tag in ("F8_E8M0", "U8"):
        e = s.view(torch.uint8).to(torch.int32)
        return torch.ldexp(torch.ones(e.shape), (e - 127).to(torch.float32))
    return s.to(torch.float32)


@dataclass(frozen=True)
class OutFormat:
    """How an output tensor is written. `like(stored)` keeps a parent's format (and its naming)."""

    format: str = "plain"          # plain | fp8_block | mxfp4 | int4_pack
    dtype: str = "BF16"            # plain: the tag; fp8_block: the scale's tag (F32 or F8_E8M0); int4_pack: scale's
    block: int = 128               # fp8_block
    ue8m0: bool = False            # fp8_block: power-of-two scales
    naming: str = ""               # fp8_block: scale_inv | scale; mxfp4: blocks (gpt-oss) | packed (DeepSeek-V4)

    @classmethod
    def like(cls, st: Stored, ue8m0: bool = False) -> "OutFormat":
        if st.format == "fp8_block":
            s = st.parts["scale"]
            naming = "scale_inv" if s.name.endswith("_scale_inv") else "scale"
            e8m0 = s.dtype in ("F8_E8M0", "U8")
            return cls("fp8_block", s.dtype, st.block, ue8m0 or e8m0, naming)
        if st.format == "mxfp4":
            return cls("mxfp4", "U8", naming="blocks" if "blocks" in st.parts else "packed")
        if st.format == "int4_pack":
            return cls("int4_pack", st.parts["scale"].dtype)
        if st.format == "plain":
            return cls("plain", st.dtype)
        raise ChimeraError(f"tensor {st.name}: {st.describe()} has no encoder in chimera")

    def describe(self) -> str:
        if self.format == "plain":
            return self.dtype.lower()
        if self.format == "fp8_block":
            return f"fp8 e4m3 {self.block}x{self.block} blocks ({'ue8m0' if self.ue8m0 else 'f32'} scales)"
        if self.format == "mxfp4":
            return "mxfp4 (" + ("gpt-oss _blocks/_scales" if self.naming == "blocks" else "int8 + e8m0 .scale") + ")"
        return f"int4 pack-quantized (group 32, {self.dtype.lower()} scales)"

    def parts(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, str, tuple[int, ...]]]:
        """(role, stored name, dtype tag, stored shape) of every tensor this format writes for `name`."""
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        if self.format == "plain":
            return [("weight", name, self.dtype, shape)]
        if self.format == "fp8_block":
            m, n = shape
            grid = (-(-m // self.block), -(-n // self.block))
            sname = name + "_scale_inv" if self.naming == "scale_inv" else stem + ".scale"
            return [("weight", name, "F8_E4M3", shape), ("scale", sname, self.dtype, grid)]
        if self.format == "mxfp4":
            if self.naming == "blocks":  # logical [..., in, out] -> blocks over [..., out, in]
                *lead, n_in, n_out = shape
                g = -(-n_in // 32)
                return [("blocks", name + "_blocks", "U8", (*lead, n_out, g, 16)),
                        ("scales", name + "_scales", "U8", (*lead, n_out, g))]
            *lead, n = shape
            g = -(-n // 32)
            return [("weight", name, "I8", (*lead, g * 16)), ("scales", stem + ".scale", "F8_E8M0", (*lead, g))]
        rows, cols = shape
        return [("packed", stem + ".weight_packed", "I32", (rows, -(-cols // 8))),
                ("scale", stem + ".weight_scale", self.dtype, (rows, -(-cols // 32))),
                ("shape", stem + ".weight_shape", "I64", (2,))]

    def rows_per(self, role: str) -> int:
        """How many logical rows one row of this part covers (the FP8 scale grid: `block`)."""
        return self.block if (self.format == "fp8_block" and role == "scale") else 1

    def encode(self, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """float32 rows of the logical tensor (whole `shape`) -> {role: stored tensor rows}.

        Raises FloatingPointError on NaN/Inf."""
        from chimera.checkpoint import fp8, int4, mxfp4
        from chimera.checkpoint.files import DTYPES

        if self.format == "plain":
            if w.is_floating_point() and not bool(torch.isfinite(w.sum())):
                raise FloatingPointError("non-finite value")
            return {"weight": w.to(DTYPES[self.dtype][0])}
        if self.format == "fp8_block":
            q, s = fp8.quantize(w, self.block, self.ue8m0)
            if self.dtype in ("F8_E8M0", "U8"):
                s = (torch.log2(s).round().to(torch.int32) + 127).to(torch.uint8)
                s = s.view(torch.float8_e8m0fnu) if self.dtype == "F8_E8M0" else s
            return {"weight": q, "scale": s}
        if self.format == "mxfp4":
            if self.naming == "blocks":
                blocks, scales = mxfp4.quantize(w.transpose(-1, -2))
                return {"blocks": blocks, "scales": scales}
            blocks, scales = mxfp4.quantize(w)
            return {"weight": blocks.reshape(*w.shape[:-1], -1).view(torch.int8),
                    "scales": scales.view(torch.float8_e8m0fnu)}
        packed, scale = int4.quantize(w, DTYPES[self.dtype][0])
        return {"packed": packed, "scale": scale, "shape": torch.tensor(list(shape or w.shape), dtype=torch.int64)}
