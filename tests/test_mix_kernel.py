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
def test_eager_kernel_matches_reference(k, ue8m0):
    qs, ss, lams = parents(k)
    ref = sum(lams[i].double() * fp8.dequantize(qs[i], ss[i]).double() for i in range(k))
    q, s, amax = mix_fp8_blocks(qs, ss, lams, ue8m0)
    rq, rs = fp8.quantize(ref.float(), ue8m0=ue8m0)
    assert torch.allclose(s, rs, rtol=1e-5)
    deq = fp8.dequantize(q, s).double()
    s_full = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
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


# ------------------------------------------------------------------ kernels in the stored dtype
# The fused C kernels (chimera/merge/native.py) against float64 references and against the torch path
# they replace (same bytes), on shapes that are not multiples of the 128 block.
import math
import subprocess
import sys

from chimera.merge import mix, native


def test_native_kernels_are_built_here():
    assert native.lib() is not None, native.build_error  # CI has a C compiler: the fast path is what's tested


SUBNORMAL_ULP = {7: 2.0**-133, 10: 2.0**-24, 23: 2.0**-149}  # bf16, f16, f32


def _nearest_error_ok(got: torch.Tensor, exact: torch.Tensor, terms: torch.Tensor, mant_bits: int) -> bool:
    """|got - exact| <= half an ulp of got's format at |exact|, plus the float32 rounding of the sum's
    terms (`terms` = sum_i |lambda_i x_i|: a float32 sum can't be closer than that)."""
    e = torch.frexp(exact)[1]                               # exact = m * 2^e, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(exact), e - 1 - mant_bits).clamp(min=SUBNORMAL_ULP[mant_bits])
    err = (got.double() - exact).abs()
    return bool(torch.all(err <= 0.5 * ulp + 3 * 2.0**-24 * terms + 1e-300))


@pytest.mark.parametrize("dtype, mant", [(torch.bfloat16, 7), (torch.float16, 10), (torch.float32, 23)])
@pytest.mark.parametrize("lams", [[0.3, 0.7], [0.2, 0.3, 0.5], [1.0], [0.6, 0.6]])
def test_mix_float_rounds_once_to_nearest(dtype, mant, lams):
    g = torch.Generator().manual_seed(len(lams))
    xs = [torch.randn(301, 333, generator=g).to(dtype) for _ in lams]
    out, bad = mix.mix_float(xs, lams, dtype)
    assert out.dtype == dtype and out.shape == (301, 333) and not bad
    lf = torch.tensor(lams, dtype=torch.float32).double()   # the kernel's float32 lambdas
    exact = sum(lf[i] * xs[i].double() for i in range(len(xs)))
    terms = sum((lf[i] * xs[i].double()).abs() for i in range(len(xs)))
    assert _nearest_error_ok(out, exact, terms, mant)
    with native.disabled():
        ref, ref_bad = mix.mix_float(xs, lams, dtype)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)) and not ref_bad


def test_mix_float_other_output_dtype_and_nonfinite():
    xs = [torch.randn(7, 5).to(torch.bfloat16), torch.randn(7, 5)]
    out, bad = mix.mix_float(xs, [0.5, 0.5], torch.float32)
    assert out.dtype == torch.float32 and not bad
    assert torch.allclose(out.double(), 0.5 * xs[0].double() + 0.5 * xs[1].double(), rtol=2**-23, atol=0)
    xs[1][3, 2] = float("nan")
    assert mix.mix_float(xs, [0.5, 0.5], torch.bfloat16)[1]
    with native.disabled():
        assert mix.mix_float(xs, [0.5, 0.5], torch.bfloat16)[1]


def _fp8_parents(k: int, shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qs = [(torch.randn(shape, generator=g) * 30).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(k)]
    ss = [torch.rand(fp8.scale_shape(shape), generator=g) * 1e-2 + 1e-4 for _ in range(k)]
    lams = torch.rand(k, generator=g)
    return qs, ss, (lams / lams.sum()).tolist()


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (5, 3), (129, 1000)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fused_fp8_mix(shape, k, ue8m0):
    import ckpt

    qs, ss, lams = _fp8_parents(k, shape, seed=k)
    q, s, bad = mix.mix_fp8(qs, ss, lams, ue8m0)
    assert q.shape == shape and s.shape == fp8.scale_shape(shape) and not bad
    # float64 reference: independent block-loop dequantization, the mix, DeepSeek's block quantization
    ref = sum(float(torch.tensor(lams[i], dtype=torch.float32)) * ckpt.dequant_ref(qs[i], ss[i]) for i in range(k))
    amax = torch.nn.functional.pad(ref.abs(), (0, -shape[1] % 128, 0, -shape[0] % 128)).view(
        s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
    want_s = amax.clamp(min=1e-4) / 448
    if ue8m0:
        want_s = 2.0 ** torch.ceil(torch.log2(want_s))     # float64: exact for these magnitudes
        assert torch.equal(s.double(), want_s)
    else:
        assert torch.allclose(s.double(), want_s, rtol=1e-6, atol=0)
    s_full = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    deq = q.double() * s_full
    # within half an e4m3 step of the exact value (3 mantissa bits), plus float32 rounding of the sum
    assert torch.all((deq - ref).abs() <= ref.abs() * 2**-4 + s_full * 2**-10 + 1e-6 * s_full * 448)
    with native.disabled():
        q2, s2, bad2 = mix.mix_fp8(qs, ss, lams, ue8m0)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2) and not bad2


def test_fused_fp8_mix_flags_nan_code():
    qs, ss, lams = _fp8_parents(2, (130, 260))
    qs[1].view(torch.uint8)[129, 259] = 0x7F                # e4m3fn NaN
    assert mix.mix_fp8(qs, ss, lams)[2]
    with native.disabled():
        assert mix.mix_fp8(qs, ss, lams)[2]


def test_decode_and_encode_match_reference():
    import ckpt

    qs, ss, _ = _fp8_parents(1, (300, 200))
    assert torch.equal(mix.decode_fp8(qs[0], ss[0]), ckpt.dequant_ref(qs[0], ss[0]).float())  # q*s exact in f64
    w = torch.randn(300, 200) * torch.logspace(-6, 2, 200)    # a wide range of magnitudes per block
    q, s = mix.encode_fp8(w)
    rq, rs = fp8.quantize(w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    with pytest.raises(FloatingPointError):
        mix.encode_fp8(torch.full((3, 3), float("inf")))


def test_e4m3_rounding_matches_torch_everywhere():
    """Every e4m3 value, every midpoint between neighbours (ties to even) and a float32 ulp either side,
    subnormals included, plus random floats: one block per row with 448 in it, so the scale is 1."""
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf))])
    rnd = (torch.rand(200_000, generator=torch.Generator().manual_seed(1)) * 2 - 1) * torch.logspace(-12, math.log10(448), 200_000)
    x = torch.cat([vals, near, rnd]).clamp(-448, 448)
    x = torch.cat([x, torch.zeros(-x.numel() % 127)]).view(-1, 127)
    w = torch.cat([x, torch.full((x.shape[0], 1), 448.0)], dim=1)  # [rows, 128]
    q, s = mix.encode_fp8(w)
    assert torch.all(s == 1.0)
    assert torch.equal(q.view(torch.uint8), w.to(torch.float8_e4m3fn).view(torch.uint8))


def test_pow2_ceil_is_exact():
    s = torch.tensor([1.0, 0.75, 2**-20, 2**-20 * (1 + 2**-23), 3.0, 2.0 * (1 - 2**-24)], dtype=torch.float32)
    assert mix.pow2_ceil(s).tolist() == [1.0, 1.0, 2**-20, 2**-19, 4.0, 2.0]


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    code = ("import torch; from chimera.merge import mix, native; "
            "xs = [torch.ones(3, 5, dtype=torch.bfloat16), torch.zeros(3, 5, dtype=torch.bfloat16)]; "
            "out, bad = mix.mix_float(xs, [0.25, 0.75], torch.bfloat16); "
            "print(native.lib() is None, native.build_error is not None, out.float().unique().tolist(), bad)")
    env = {**__import__("os").environ, "CC": str(tmp_path / "no-such-cc"), "CHIMERA_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "[0.25]", "False"]
