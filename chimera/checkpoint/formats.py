"""How a logical tensor is stored: the tensor itself plus its companions, and how they are checked.

This is the one place that knows which companion tensors a stored weight has. A merge plans over logical
tensors (the names the architecture classifies); each is stored in one format:

| format | stored tensors of a logical weight `x.weight` | releases |
| --- | --- | --- |
| plain | `x.weight` (F32/F16/BF16, or an integer table) | everything unquantized |
| fp8_block | `x.weight` float8_e4m3 `[M, N]` + `x.weight_scale_inv` float32 or `x.scale` E8M0, `[ceil(M/B), ceil(N/B)]` | DeepSeek V3/R1/V3.1/V3.2/V4, Kimi K2, Qwen3/GLM FP8 |
| mxfp4 | gpt-oss: `X_blocks` uint8 `[E, out, in/32, 16]` + `X_scales` uint8 `[E, out, in/32]` for the fused parameter `X` (logical: transformers' `[E, in, out]`); DeepSeek-V4: `x.weight` int8 `[M, N/2]` + `x.scale` E8M0 `[M, N/32]` | gpt-oss, DeepSeek-V4 routed experts |
| int4_pack | `x.weight_packed` int32 `[M, N/8]` + `x.weight_scale` `[M, N/32]` + `x.weight_shape` `[2]` (compressed-tensors pack-quantized, symmetric, group 32) | Kimi K2-Thinking / K2.5 routed experts |
| opaque | `x.weight` plus companions chimera has no codec for (`weight_scale_2`, `input_scale`, `weight_zero_point`, a per-tensor `weight_scale`, ...) | NVFP4, asymmetric INT4, ... |

Every format is copied byte for byte (all its stored tensors travel together). `chimera.checkpoint.decode`
reads plain, fp8_block, mxfp4 and int4_pack as float32; an opaque tensor is never read as numbers (a mix of
one is refused at plan time, naming it). `OutFormat` says how an output tensor is written (the parts and
their names); the encoders live with the merge arithmetic (`chimera.merge.mix`). Plain data only: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chimera.errors import ChimeraError

if TYPE_CHECKING:
    from pathlib import Path

    from chimera.checkpoint.files import TensorInfo

SCALE_SUFFIX = ".weight_scale_inv"
BLOCK = 128
MX_BLOCK = 32
FORMATS = ("plain", "fp8_block", "mxfp4", "int4_pack", "opaque")
E8M0_TAGS = ("F8_E8M0", "U8")
SCALE_TAGS = ("F32", "BF16", "F16") + E8M0_TAGS  # FP8 block scales: DeepSeek f32, Qwen3 bf16/f16, DeepSeek-V4 E8M0
_OPAQUE = ("weight_scale_2", "input_scale", "weight_zero_point", "weight_global_scale", "input_global_scale",
           "k_scale", "v_scale", "weight_scale")


def scale_name(weight: str) -> str:
    """`x.weight` -> `x.weight_scale_inv`, the name of an FP8 weight's block scales."""
    return weight[: -len(".weight")] + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    """The scale grid of an [M, N] weight: [ceil(M/block), ceil(N/block)]."""
    m, n = shape
    return (math.ceil(m / block), math.ceil(n / block))


def is_companion(name: str) -> bool:
    """True for a tensor that only belongs to another one by its name alone (planned with its weight)."""
    return name.endswith((SCALE_SUFFIX, "_scales", ".weight_scale", ".weight_shape", ".weight_scale_2",
                          ".input_scale", ".weight_zero_point"))


@dataclass(frozen=True)
class Stored:
    """One logical tensor as a checkpoint stores it: its main tensor, its companions, its format."""

    name: str
    weight: TensorInfo                  # the main stored tensor (FP8/plain weight, MXFP4 codes, INT4 words)
    scale: TensorInfo | None = None     # FP8 block scales (`weight_scale_inv`, or V4's E8M0 `scale`)
    block: int = BLOCK                  # the checkpoint's weight_block_size
    ue8m0: bool = False                 # scales are powers of two (`scale_fmt: ue8m0`, or E8M0 bytes)
    fmt: str = ""                       # mxfp4 | int4_pack | opaque; "" = plain / fp8_block (by `scale`)
    extra: tuple[tuple[str, TensorInfo], ...] = ()   # other companions by role (scales, shape, ...)
    logical_shape: tuple[int, ...] | None = None
    transposed: bool = False            # gpt-oss MXFP4: the codes run along the logical tensor's axis -2

    @property
    def format(self) -> str:
        return self.fmt or ("fp8_block" if self.scale is not None else "plain")

    @property
    def parts(self) -> tuple[TensorInfo, ...]:
        return (self.weight,) + ((self.scale,) if self.scale is not None else ()) + tuple(t for _, t in self.extra)

    def part(self, role: str) -> TensorInfo:
        return dict(self.extra)[role]

    def roles(self) -> list[tuple[str, TensorInfo]]:
        """Every stored tensor by role, in the order `OutFormat.parts` lists a format's parts."""
        return [("weight", self.weight)] + ([("scale", self.scale)] if self.scale is not None else []) \
            + list(self.extra)

    @property
    def dtype(self) -> str:
        return self.weight.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.logical_shape if self.logical_shape is not None else self.weight.shape

    @property
    def file(self) -> Path:
        return self.weight.file

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def numeric(self) -> bool:
        """Whether chimera can read it as numbers (every format but opaque) and mix it (floats only)."""
        return self.format != "opaque" and (self.format != "plain" or self.dtype in FLOAT_TAGS)

    def signature(self) -> tuple:
        """Format, names' suffixes, dtypes and shapes of every part: equal signatures copy into each other."""
        return (self.format, self.block if self.scale is not None else 0,
                tuple((p.name[len(self.name.rsplit(".", 1)[0]):], p.dtype, p.shape) for p in self.parts))

    def describe(self) -> str:
        f = self.format
        if f == "plain":
            return self.dtype.lower()
        if f == "fp8_block":
            kind = "e8m0" if self.scale.dtype in E8M0_TAGS else ("ue8m0" if self.ue8m0 else self.scale.dtype.lower())
            return f"fp8 e4m3 {self.block}x{self.block} blocks ({kind} scales)"
        if f == "mxfp4":
            return "mxfp4 " + ("(gpt-oss _blocks/_scales)" if self.transposed else "(int8 + e8m0 scale)")
        if f == "int4_pack":
            return f"int4 pack-quantized (group 32, {self.part('scale').dtype.lower()} scales)"
        return "opaque (" + ", ".join(sorted(p.name.rsplit(".", 1)[-1] for p in self.parts)) + ")"


FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def block_format(quant: dict | None, where: str) -> tuple[int, bool]:
    """(block size, ue8m0?) from a config's `quantization_config` (128 and float scales if absent)."""
    q = quant or {}
    bs = q.get("weight_block_size", [BLOCK, BLOCK])
    try:
        bm, bn = int(bs[0]), int(bs[1])
    except (TypeError, ValueError, IndexError):
        raise ChimeraError(f"{where}: quantization_config.weight_block_size {bs!r} is not [rows, cols]") from None
    if bm != bn or bm <= 0:
        raise ChimeraError(f"{where}: FP8 blocks {bm}x{bn} are not supported (square blocks only)")
    return bm, q.get("scale_fmt") == "ue8m0"


def check_fp8_block(w: TensorInfo, s: TensorInfo, block: int) -> None:
    """An FP8 weight's scale must be a float (F32, BF16, F16) or E8M0 bytes with the grid [ceil(M/block),
    ceil(N/block)]."""
    if len(w.shape) != 2:
        raise ChimeraError(f"{w.file}: FP8 tensor {w.name} has shape {list(w.shape)}; block FP8 weights are 2-D")
    if s.dtype not in SCALE_TAGS:
        raise ChimeraError(f"{s.file}: tensor {s.name} is {s.dtype}; FP8 block scales must be float32 (F32), "
                           f"BF16, F16 or E8M0 (F8_E8M0)")
    want = scale_shape(w.shape, block)
    if tuple(s.shape) != want:
        m, n = w.shape
        raise ChimeraError(f"{s.file}: tensor {s.name} has shape {list(s.shape)}, expected {list(want)} "
                           f"(ceil({m}/{block}) x ceil({n}/{block}) for {w.name} {list(w.shape)})")


def _int4_cols(packed: TensorInfo, scale: TensorInfo, shape: TensorInfo) -> int:
    """Columns of a pack-quantized weight: from the packed and scale widths when they pin one value,
    else from the stored `weight_shape` (two integers, read here: the only data a plan reads)."""
    words, groups = packed.shape[1], scale.shape[-1]
    lo, hi = max(8 * (words - 1), MX_BLOCK * (groups - 1)) + 1, min(8 * words, MX_BLOCK * groups)
    if lo == hi:
        return hi
    import numpy as np

    from chimera.checkpoint.files import read_bytes

    buf, _ = read_bytes(shape)
    vals = np.frombuffer(buf, {"I64": np.int64, "I32": np.int32}.get(shape.dtype, np.int64)).tolist()
    if len(vals) != 2 or vals[0] != packed.shape[0] or not lo <= vals[1] <= hi:
        raise ChimeraError(f"{shape.file}: {shape.name} {vals} does not fit {packed.name} {list(packed.shape)}")
    return int(vals[1])


def group(tensors: dict[str, TensorInfo], quant: dict | None, where: str) -> dict[str, Stored]:
    """Every logical tensor with its companions attached and checked.

    Raises (naming the file and tensor) if an FP8 weight lacks its scale, a scale lacks its weight or sits
    on a weight that is not FP8, or a scale has the wrong dtype or grid.
    """
    block, ue8m0 = block_format(quant, where)
    out: dict[str, Stored] = {}
    used: set[str] = set()

    def take(st: Stored) -> None:
        used.update(p.name for p in st.parts)
        out[st.name] = st

    for name, info in tensors.items():
        stem = name[: -len("_blocks")] if name.endswith("_blocks") else None
        if stem is not None and stem + "_scales" in tensors:            # gpt-oss MXFP4
            s = tensors[stem + "_scales"]
            if info.dtype != "U8" or s.dtype != "U8" or len(s.shape) < 2 or info.shape != (*s.shape, 16):
                raise ChimeraError(f"{info.file}: {name} / {s.name} are not MXFP4 blocks [..., G, 16] + scales [..., G]")
            take(Stored(stem, info, fmt="mxfp4", extra=(("scales", s),), transposed=True,
                        logical_shape=(*s.shape[:-2], s.shape[-1] * MX_BLOCK, s.shape[-2])))
        elif name.endswith(".weight_packed"):                           # compressed-tensors pack-quantized
            stem = name[: -len(".weight_packed")]
            sc, sh = tensors.get(stem + ".weight_scale"), tensors.get(stem + ".weight_shape")
            if sc is None or sh is None:
                raise ChimeraError(f"{info.file}: {name} has no weight_scale / weight_shape")
            extra = (("scale", sc), ("shape", sh)) + tuple(
                (s, tensors[f"{stem}.{s}"]) for s in _OPAQUE[:-1] if f"{stem}.{s}" in tensors)
            ok = len(extra) == 2 and info.dtype == "I32" and len(info.shape) == 2 and sc.shape[0] == info.shape[0]
            shape = (info.shape[0], _int4_cols(info, sc, sh)) if ok else info.shape
            take(Stored(stem + ".weight", info, fmt="int4_pack" if ok else "opaque", extra=extra, logical_shape=shape))
    for name, info in tensors.items():                                 # a weight and its companions
        if name in used or not name.endswith(".weight"):
            continue
        stem = name[: -len(".weight")]
        inv, dot = tensors.get(name + "_scale_inv"), tensors.get(stem + ".scale")
        extra = tuple((s, tensors[f"{stem}.{s}"]) for s in _OPAQUE if f"{stem}.{s}" in tensors)
        if info.dtype in ("I8", "U8") and dot is not None and not extra and len(info.shape) >= 2 \
                and dot.dtype in E8M0_TAGS and dot.shape == (*info.shape[:-1], -(-info.shape[-1] * 2 // MX_BLOCK)):
            take(Stored(name, info, fmt="mxfp4", extra=(("scales", dot),),
                        logical_shape=(*info.shape[:-1], info.shape[-1] * 2)))     # DeepSeek-V4 experts
        elif extra:
            parts = tuple(("scale", s) for s in (inv, dot) if s is not None) + extra
            take(Stored(name, info, fmt="opaque", extra=parts))
        elif info.dtype.startswith("F8"):
            scale = inv or dot
            if scale is None:
                raise ChimeraError(f"{info.file}: FP8 tensor {name} has no weight_scale_inv")
            check_fp8_block(info, scale, block)
            take(Stored(name, info, scale, block, ue8m0 or scale.dtype in E8M0_TAGS))
        elif inv is not None:
            raise ChimeraError(f"{inv.file}: tensor {inv.name} scales {name}, which is {info.dtype}, not FP8")
    for name, info in tensors.items():                                 # everything else is a plain tensor
        if name in used:
            continue
        if name.endswith(SCALE_SUFFIX):
            raise ChimeraError(f"{info.file}: scale {name} has no weight {name[: -len(SCALE_SUFFIX)]}.weight")
        if name.endswith((".weight_packed", "_blocks")):
            raise ChimeraError(f"{info.file}: {name} is a quantization companion without its weight")
        out[name] = Stored(name, info, block=block, ue8m0=ue8m0)
    return out


@dataclass(frozen=True)
class OutFormat:
    """How an output tensor is written. `like(stored)` keeps a parent's format (and its names)."""

    format: str = "plain"          # plain | fp8_block | mxfp4 | int4_pack
    dtype: str = "BF16"            # plain: the tag; fp8_block: the scale's tag (F32 or F8_E8M0); int4_pack: scale's
    block: int = BLOCK             # fp8_block
    ue8m0: bool = False            # fp8_block: power-of-two scales
    naming: str = ""               # fp8_block: scale_inv | scale; mxfp4: blocks (gpt-oss) | packed (DeepSeek-V4)

    @classmethod
    def like(cls, st: Stored) -> OutFormat:
        f = st.format
        if f == "fp8_block":
            naming = "scale_inv" if st.scale.name.endswith(SCALE_SUFFIX) else "scale"
            tag = "F8_E8M0" if st.scale.dtype in E8M0_TAGS else st.scale.dtype
            return cls("fp8_block", tag, st.block, st.ue8m0, naming)
        if f == "mxfp4":
            return cls("mxfp4", "U8", naming="blocks" if st.transposed else "packed")
        if f == "int4_pack":
            return cls("int4_pack", st.part("scale").dtype)
        if f == "plain":
            return cls("plain", st.dtype)
        return cls("opaque", st.dtype)

    @property
    def fp8(self) -> bool:
        return self.format == "fp8_block"

    def describe(self) -> str:
        if self.format == "plain":
            return self.dtype.lower()
        if self.format == "fp8_block":
            kind = "e8m0" if self.dtype in E8M0_TAGS else ("ue8m0" if self.ue8m0 else self.dtype.lower())
            return f"fp8 e4m3 {self.block}x{self.block} blocks ({kind} scales)"
        if self.format == "mxfp4":
            return "mxfp4 " + ("(gpt-oss _blocks/_scales)" if self.naming == "blocks" else "(int8 + e8m0 scale)")
        if self.format == "int4_pack":
            return f"int4 pack-quantized (group 32, {self.dtype.lower()} scales)"
        return "opaque"

    def parts(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, str, tuple[int, ...]]]:
        """(role, stored name, dtype tag, stored shape) of every tensor this format writes for `name`."""
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        if self.format in ("plain", "opaque"):
            return [("weight", name, self.dtype, shape)]
        if self.format == "fp8_block":
            sname = name + "_scale_inv" if self.naming == "scale_inv" else stem + ".scale"
            return [("weight", name, "F8_E4M3", shape), ("scale", sname, self.dtype, scale_shape(shape, self.block))]
        if self.format == "mxfp4":
            if self.naming == "blocks":  # logical [..., in, out] -> codes over [..., out, in]
                *lead, n_in, n_out = shape
                g = -(-n_in // MX_BLOCK)
                return [("weight", name + "_blocks", "U8", (*lead, n_out, g, 16)),
                        ("scales", name + "_scales", "U8", (*lead, n_out, g))]
            *lead, n = shape
            g = -(-n // MX_BLOCK)
            return [("weight", name, "I8", (*lead, g * 16)), ("scales", stem + ".scale", "F8_E8M0", (*lead, g))]
        rows, cols = shape
        return [("weight", stem + ".weight_packed", "I32", (rows, -(-cols // 8))),
                ("scale", stem + ".weight_scale", self.dtype, (rows, -(-cols // MX_BLOCK))),
                ("shape", stem + ".weight_shape", "I64", (2,))]

    def rows_per(self, role: str) -> int:
        """How many logical rows one row of a part covers (the FP8 scale grid: `block`; 0: written whole)."""
        if self.format == "fp8_block" and role == "scale":
            return self.block
        return 0 if role == "shape" else 1

    def accepts(self, st: Stored) -> bool:
        """True when a parent's stored bytes already are this format (so a selection copies them).

        Power-of-two (ue8m0) float32 scales are valid float scales, so they copy into a float-scale child;
        the reverse needs re-quantization."""
        if st.format != self.format:
            return False
        if self.format == "plain":
            return st.dtype == self.dtype
        if self.format == "fp8_block":
            same_kind = st.scale.dtype == self.dtype or (st.scale.dtype in E8M0_TAGS and self.dtype in E8M0_TAGS)
            naming = "scale_inv" if st.scale.name.endswith(SCALE_SUFFIX) else "scale"
            return same_kind and naming == self.naming and st.block == self.block and (st.ue8m0 or not self.ue8m0)
        if self.format == "mxfp4":
            return st.transposed == (self.naming == "blocks")
        if self.format == "int4_pack":
            return st.part("scale").dtype == self.dtype
        return False
