"""DeepSeek block FP8 against the formula, on shapes that are not multiples of 128."""
import pytest
import torch

from ckpt import dequant_ref
from chimera.checkpoint import fp8


@pytest.mark.parametrize("shape", [(200, 300), (576, 700), (130, 129), (1, 5), (128, 256)])
def test_dequantize_is_the_formula(shape):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(shape, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(fp8.scale_shape(shape), generator=g) * 1e-2 + 1e-5
    got = fp8.dequantize(q, s)
    ref = dequant_ref(q, s)
    assert got.dtype == torch.float32 and got.shape == shape
    # one float32 rounding of the exact product q * s
    assert torch.all((got.double() - ref).abs() <= ref.abs() * 2**-24)
    # and bitwise equal to the product computed in float32
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert torch.equal(got, q.float() * s_full)


@pytest.mark.parametrize("shape", [(200, 300), (576, 700), (5, 130)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_blocks(shape, ue8m0):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape, generator=g, dtype=torch.float64)
    w[:3, :3] = 0.0
    q, s = fp8.quantize(w.float(), ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and s.shape == fp8.scale_shape(shape)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            want = max(float(blk.abs().max()), 1e-4) / 448
            if ue8m0:
                got = float(s[bi, bj])
                assert got >= want * (1 - 1e-6) and got < 2 * want and (got == 2.0 ** round(torch.log2(torch.tensor(got)).item()))
            else:
                assert abs(float(s[bi, bj]) - want) <= want * 1e-6
    deq = dequant_ref(q, s)
    s_full = s.double().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals, absolute <= s * 2^-10 for subnormals
    assert torch.all((deq - w).abs() <= w.abs() * 2**-4 + s_full * 2**-9 + 1e-12)
    assert float((q.float().abs()).max()) <= 448


def test_quantize_rejects_non_finite():
    w = torch.zeros(10, 10)
    w[3, 4] = float("inf")
    with pytest.raises(FloatingPointError):
        fp8.quantize(w)
