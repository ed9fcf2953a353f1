"""MXFP4 against transformers' own dequantization (gpt-oss and DeepSeek-V4 layouts), compressed-tensors' FP4
packing, and a float64 reference of the OCP MX rules, on shapes that are not multiples of 32."""
import math

import pytest
import torch

from chimera.checkpoint import mxfp4

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _random_packed(shape_g, seed, lo=110, hi=135):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape_g, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(lo, hi, shape_g, generator=g, dtype=torch.int64).to(torch.uint8)
    return blocks, scales


def _ref_dequant(blocks, scales):
    """float64, element by element: low nibble first, sign bit 3, 2^(e - 127)."""
    flat_b, flat_s = blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist()
    out = []
    for row, e in zip(flat_b, flat_s):
        vals = []
        for byte in row:
            for c in (byte & 0xF, byte >> 4):
                vals.append((-1.0 if c & 8 else 1.0) * GRID[c & 7] * 2.0 ** (e - 127))
        out.append(vals)
    return torch.tensor(out, dtype=torch.float64).reshape(*scales.shape[:-1], -1)


def test_dequantize_matches_transformers_gpt_oss_layout():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_packed((3, 5, 4), 0)          # [E, rows, G, 16]: 5 output rows, 128 inputs
    ours = mxfp4.dequantize(blocks, scales)                 # [E, rows, 128], stored orientation
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)   # [E, in, out] (in-memory)
    assert ours.dtype == torch.float32 and ours.shape == (3, 5, 128)
    assert torch.equal(ours.transpose(1, 2), theirs)
    assert torch.equal(ours.double(), _ref_dequant(blocks, scales))


def test_dequantize_matches_transformers_deepseek_v4_layout():
    """V4 experts: int8 weight [rows, cols/2] (two e2m1 per byte) + E8M0 scale [rows, cols/32]."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    blocks, scales = _random_packed((6, 3), 1)             # rows 6, cols 96
    weight = blocks.reshape(6, 48).view(torch.int8)
    ours = mxfp4.dequantize(weight, scales)
    theirs = Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=torch.float32)
    assert ours.shape == (6, 96) and torch.equal(ours, theirs)
    e8m0 = scales.view(torch.float8_e8m0fnu)               # the safetensors F8_E8M0 dtype reads as this
    assert torch.equal(mxfp4.dequantize(weight, e8m0), ours)


def _ref_quantize(v: list[float]) -> tuple[list[int], int]:
    """One block by the OCP rules in float64: X = floor(log2 amax) - 2, nearest e2m1 value with ties to the
    even code, saturation at 6, sign bit from the value."""
    amax = max(abs(x) for x in v)
    if amax == 0:
        X = -127
    else:
        m, ex = math.frexp(amax)           # amax = m * 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
        X = max(-127, min(127, ex - 1 - 2))
    codes = []
    for x in v:
        t = abs(x) / 2.0 ** X
        best = min(range(8), key=lambda k: (abs(t - GRID[k]), k % 2))   # nearest, ties to the even code
        if t > 6:
            best = 7
        codes.append(best | (8 if math.copysign(1.0, x) < 0 else 0))
    return codes, X + 127


@pytest.mark.parametrize("shape", [(7, 100), (3, 5, 33), (1, 31), (2, 64)])
def test_quantize_matches_ocp_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    w.view(-1)[:40] = 0.0                                    # an all-zero block
    if shape[-1] >= 64:   # a block of exact ties (k + 1/2 grid steps) and one beyond 6 (saturates)
        row = w.view(-1, shape[-1])[1]
        row[32:40] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.75]) * 2.0 ** -3
        row[40:64] = torch.tensor([-0.01] * 24) * 2.0 ** -3
    blocks, scales = mxfp4.quantize(w)
    G = -(-shape[-1] // 32)
    assert blocks.shape == (*shape[:-1], G, 16) and scales.shape == (*shape[:-1], G)
    codes = mxfp4.unpack(blocks).reshape(-1, 32).tolist()
    padded = torch.nn.functional.pad(w.double(), (0, G * 32 - shape[-1])).reshape(-1, 32).tolist()
    for i, (blk, c) in enumerate(zip(padded, codes)):
        want_c, want_e = _ref_quantize(blk)
        assert int(scales.reshape(-1)[i]) == want_e, i
        assert c == want_c, i
    deq = mxfp4.dequantize(blocks, scales, n=shape[-1])
    assert deq.shape == w.shape
    if shape[-1] >= 64:
        assert deq.view(-1, shape[-1])[1, 32:40].tolist() == [x * 2.0 ** -3 for x in (0, 1, 1, 2, 2, 4, 4, 6)]
    # error bound: half the e2m1 spacing at the value (<= 1 * 2^X), saturation up to 2 * 2^X
    step = torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.to(torch.int32) - 127)
    bound = torch.repeat_interleave(step, 32, dim=-1)[..., : shape[-1]] * 2.0
    assert torch.all((deq - w).abs() <= bound)


def test_packing_matches_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 64), generator=g, dtype=torch.int64).to(torch.uint8)
    values = torch.tensor(mxfp4.FP4_VALUES)[codes.long()]
    assert torch.equal(pack_fp4_to_uint8(values), mxfp4.pack(codes))
    assert torch.equal(mxfp4.unpack(mxfp4.pack(codes)), codes)


def test_rejects_nan_scale_and_non_finite():
    blocks, scales = _random_packed((2, 1), 4)
    scales[1, 0] = 255
    with pytest.raises(ValueError, match="NaN"):
        mxfp4.dequantize(blocks, scales)
    w = torch.zeros(2, 40)
    w[1, 3] = float("nan")
    with pytest.raises(FloatingPointError):
        mxfp4.quantize(w)
