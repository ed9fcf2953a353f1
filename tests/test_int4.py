"""compressed-tensors pack-quantized INT4 against the compressed-tensors library itself (packing, scales,
rounding, decompression) and the float64 formula, on shapes that are not multiples of 8 or 32."""
import pytest
import torch

from chimera.checkpoint import int4



def _args():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)


@pytest.mark.parametrize("cols", [7, 64, 100, 33])
def test_packing_matches_library(cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (5, cols), generator=g, dtype=torch.int64).to(torch.int8)
    packed = int4.pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 8))
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(int4.unpack(packed, cols), q)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size((5, cols))), q)


@pytest.mark.parametrize("shape", [(6, 96), (3, 100), (4, 40)])
def test_quantize_matches_library(shape):
    """Scales (amax / 7.5), round-half-even, clamp to [-8, 7] and packing: byte for byte with float32 scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g)
    w[0, :32] = 0.0                                              # an all-zero group: scale eps
    w[1, :2] = torch.tensor([2.0, -2.0])                         # |W| / s reaches ~7.5: +max clamps to 7
    packed, scale = int4.quantize(w, torch.float32)
    G = -(-shape[1] // 32)
    assert packed.shape == (shape[0], -(-shape[1] // 8)) and scale.shape == (shape[0], G)
    wp = torch.nn.functional.pad(w, (0, G * 32 - shape[1])).reshape(shape[0], G, 32)
    s_ref, zp = calculate_qparams(wp.amin(-1), wp.amax(-1), _args())
    assert torch.equal(scale, s_ref)
    if shape[1] % 32 == 0:  # the library's group quantization needs whole groups
        q_ref = quantize(w, s_ref, zp, _args(), dtype=torch.int8)
        assert torch.equal(packed, pack_to_int32(q_ref, 4))
    q = int4.unpack(packed, shape[1])
    assert int(q[1, 0]) == 7 and int(q[1, 1]) in (-7, -8) and int(q[0, :32].abs().max()) == 0
    s_full = scale.repeat_interleave(32, 1)[:, : shape[1]]
    want = torch.round(w / s_full).clamp(-8, 7)                  # the rule, elementwise
    assert torch.equal(q.float(), want)


def test_bf16_release_layout_decompresses_like_the_library():
    """K2-Thinking stores bf16 scales: our float32 dequantization rounds to the library's bf16 result."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    g = torch.Generator().manual_seed(9)
    w = torch.randn(10, 70, generator=g) * 0.02
    packed, scale = int4.quantize(w, torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    ours = int4.dequantize(packed, scale, (10, 70))
    # float64 formula: q * s, element by element
    q = int4.unpack(packed, 70).double()
    ref = torch.stack([q[:, j] * scale[:, j // 32].double() for j in range(70)], dim=1)
    assert torch.equal(ours.double(), ref)
    w96 = torch.randn(10, 96, generator=g) * 0.02
    packed, scale = int4.quantize(w96, torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], weights=_args())
    out = PackedQuantizationCompressor.decompress({"weight_packed": packed, "weight_scale": scale,
                                                   "weight_shape": torch.tensor([10, 96])}, scheme)
    ours = int4.dequantize(packed, scale, (10, 96))
    assert out["weight"].dtype == torch.bfloat16 and torch.equal(ours.to(torch.bfloat16), out["weight"])
    err = (ours - w96).abs() / scale.float().repeat_interleave(32, 1)
    # half a step, plus the clamp at 7 of a group maximum whose bf16 scale rounded down (|W| / s <= 7.5 (1 + 2^-8))
    assert float(err.max()) <= 0.5 + 7.5 * 2**-8


def test_shape_mismatch_and_non_finite():
    packed, scale = int4.quantize(torch.randn(4, 64), torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        int4.dequantize(packed, scale, (4, 65 + 64))
    w = torch.zeros(2, 32)
    w[0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        int4.quantize(w)
