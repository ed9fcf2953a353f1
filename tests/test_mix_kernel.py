"""The fused FP8 block kernel (eager and torch.compile) against the generic dequant-mix-quantize path."""
import pytest
import torch

from chimera.checkpoint import fp8
from chimera.merge.mix import compiled_mix_fp8_blocks, mix_fp8_blocks


def parents(k: int, shape=(384, 640)):
    g = torch.Generator().manual_seed(k)
    qs = [(torch.randn(shape, generator=g) * 30).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(k)]
    ss = [torch.rand(fp8.scale_shape(shape), generator=g) * 1e-2 + 1e-4 for _ in range(k)]
    lams = torch.rand(k, generator=g)
    return qs, ss, lams / lams.sum()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(384, 640), (200, 256)])  # whole row blocks; a partial last row block
def test_eager_kernel_matches_reference(k, ue8m0, shape):
    qs, ss, lams = parents(k, shape)
    ref = sum(lams[i].double() * fp8.dequantize(qs[i], ss[i]).double() for i in range(k))
    q, s, amax = mix_fp8_blocks(qs, ss, lams, ue8m0)
    rq, rs = fp8.quantize(ref.float(), ue8m0=ue8m0)
    assert torch.allclose(s, rs, rtol=1e-5)
    deq = fp8.dequantize(q, s).double()
    s_full = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert q.shape == shape and s.shape == fp8.scale_shape(shape)
    assert torch.all((deq - ref).abs() <= ref.abs() * 2**-4 + s_full * 2**-9 + 1e-9)


def test_compiled_kernel_equals_eager():
    f = compiled_mix_fp8_blocks()
    for k in (1, 2, 3):
        qs, ss, lams = parents(k, (256, 896))
        q1, s1, _ = mix_fp8_blocks(qs, ss, lams)
        q2, s2, _ = f(qs, ss, lams)
        assert torch.allclose(s1, s2, rtol=1e-6, atol=0)
        # at most a one-code difference where float32 rounding order differs (FMA in generated C++)
        d = (q1.float() - q2.float()).abs()
        assert float((d > 0).float().mean()) < 1e-3
        assert torch.all(d <= q1.float().abs() * 2**-3 + 2**-9)
