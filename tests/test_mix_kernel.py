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



# ------------------------------------------------------------------ kernels in the stored dtype
# chimera.merge.kernels (fused C kernels, chimera/merge/native.py) against float64 references and
# against the torch path they replace without a compiler (same bytes), on shapes that are not
# multiples of the 128 block.
import math
import os
import subprocess
import sys

import numpy as np

from chimera.merge import kernels, native
from chimera.checkpoint.fp8 import pow2_ceil

TAG = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's stored bytes as the kernels take them (bf16 as uint16, FP8 as uint8)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float8_e4m3fn:
        return t.contiguous().view(torch.uint8).numpy()
    return t.contiguous().numpy()


def tensor(a: np.ndarray, tag: str) -> torch.Tensor:
    t = torch.from_numpy(a.copy())
    return {"BF16": lambda: t.view(torch.bfloat16), "FP8": lambda: t.view(torch.float8_e4m3fn)}.get(tag, lambda: t)()


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
    tags = [TAG[dtype]] * len(xs)
    out, bad = kernels.mix_float([raw(x) for x in xs], tags, lams, TAG[dtype])
    got = tensor(out, TAG[dtype])
    assert got.dtype == dtype and got.shape == (301, 333) and not bad
    lf = torch.tensor(lams, dtype=torch.float32).double()   # the kernel's float32 lambdas
    exact = sum(lf[i] * xs[i].double() for i in range(len(xs)))
    terms = sum((lf[i] * xs[i].double()).abs() for i in range(len(xs)))
    assert _nearest_error_ok(got, exact, terms, mant)
    with native.disabled():
        ref, ref_bad = kernels.mix_float([raw(x) for x in xs], tags, lams, TAG[dtype])
    assert ref.tobytes() == out.tobytes() and not ref_bad


def test_mix_float_mixed_dtypes_and_nonfinite():
    xs = [torch.randn(7, 5).to(torch.bfloat16), torch.randn(7, 5)]
    out, bad = kernels.mix_float([raw(x) for x in xs], ["BF16", "F32"], [0.5, 0.5], "F32")
    assert out.dtype == np.float32 and not bad
    assert torch.allclose(torch.from_numpy(out).double(), 0.5 * xs[0].double() + 0.5 * xs[1].double(),
                          rtol=2**-23, atol=0)
    xs[1][3, 2] = float("nan")
    assert kernels.mix_float([raw(x) for x in xs], ["BF16", "F32"], [0.5, 0.5], "BF16")[1]
    with native.disabled():
        assert kernels.mix_float([raw(x) for x in xs], ["BF16", "F32"], [0.5, 0.5], "BF16")[1]


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
    q_np, s_np, bad = kernels.mix_fp8([raw(q) for q in qs], [s.numpy() for s in ss], lams, ue8m0)
    q, s = tensor(q_np, "FP8"), torch.from_numpy(s_np)
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
        q2, s2, bad2 = kernels.mix_fp8([raw(q) for q in qs], [s.numpy() for s in ss], lams, ue8m0)
    assert q2.tobytes() == q_np.tobytes() and s2.tobytes() == s_np.tobytes() and not bad2


def test_fused_fp8_mix_flags_nan_code():
    qs, ss, lams = _fp8_parents(2, (130, 260))
    qs[1].view(torch.uint8)[129, 259] = 0x7F                # e4m3fn NaN
    args = ([raw(q) for q in qs], [s.numpy() for s in ss], lams)
    assert kernels.mix_fp8(*args)[2]
    with native.disabled():
        assert kernels.mix_fp8(*args)[2]


def test_decode_and_encode_match_reference():
    import ckpt

    qs, ss, _ = _fp8_parents(1, (300, 200))
    want = ckpt.dequant_ref(qs[0], ss[0]).float()            # q * s is exact in float64: one rounding
    assert np.array_equal(kernels.decode_fp8(raw(qs[0]), ss[0].numpy()), want.numpy())
    w = torch.randn(300, 200) * torch.logspace(-6, 2, 200)    # a wide range of magnitudes per block
    for ue8m0 in (False, True):
        q, s, bad = kernels.encode_fp8(w.numpy(), ue8m0=ue8m0)
        with native.disabled():
            q2, s2, _ = kernels.encode_fp8(w.numpy(), ue8m0=ue8m0)
        assert q.tobytes() == q2.tobytes() and s.tobytes() == s2.tobytes() and not bad
        if not ue8m0:  # chimera.checkpoint.fp8.quantize (DeepSeek's float scales) gives the same bytes
            rq, rs = fp8.quantize(w)
            assert q.tobytes() == raw(rq).tobytes() and np.array_equal(s, rs.numpy())
    assert kernels.encode_fp8(np.full((3, 3), np.inf, dtype=np.float32))[2]


def test_e4m3_rounding_matches_torch_everywhere():
    """Every e4m3 value, every midpoint between neighbours (ties to even) and a float32 ulp either side,
    subnormals included, plus random floats: one block per row with 448 in it, so the scale is 1."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(math.inf)),
                      torch.nextafter(mids, torch.tensor(-math.inf))])
    g = torch.Generator().manual_seed(1)
    rnd = (torch.rand(200_000, generator=g) * 2 - 1) * torch.logspace(-12, math.log10(448), 200_000)
    x = torch.cat([vals, near, rnd]).clamp(-448, 448)
    x = torch.cat([x, torch.zeros(-x.numel() % 127)]).view(-1, 127)
    w = torch.cat([x, torch.full((x.shape[0], 1), 448.0)], dim=1)  # [rows, 128]
    q, s, _ = kernels.encode_fp8(w.numpy())
    assert np.all(s == 1.0)
    assert q.tobytes() == raw(w.to(torch.float8_e4m3fn)).tobytes()


def test_pow2_ceil_is_exact():
    s = torch.tensor([1.0, 0.75, 2**-20, 2**-20 * (1 + 2**-23), 3.0, 2.0 * (1 - 2**-24)], dtype=torch.float32)
    assert pow2_ceil(s).tolist() == [1.0, 1.0, 2**-20, 2**-19, 4.0, 2.0]


def _ue8m0_rule(amax: float) -> float:
    """The DeepSeek rule in exact rational arithmetic: the smallest power of two >= max(amax, 1e-4) / 448."""
    from fractions import Fraction

    x = Fraction(max(amax, float(np.float32(1e-4)))) / 448
    p = Fraction(2) ** (x.numerator.bit_length() - x.denominator.bit_length() - 1)
    while p < x:
        p *= 2
    while p / 2 >= x:
        p /= 2
    return float(p)


def test_ue8m0_scales_agree_on_every_path():
    """One ue8m0 rule everywhere: block amax values at and a few float32 ulps around 448 * 2^k (where
    exp2(ceil(log2(s))) rounds down) give the same bytes from fp8.quantize (generic encode, convert), the C
    encode and block mix, their torch fallbacks, torch's block kernel and the device path, and the scales are
    the exact rule's."""
    ks = range(-22, 4)
    steps = (-3, -1, 0, 1, 2, 5)
    targets = []
    for k in ks:
        for st in steps:
            t = np.float32(448.0 * 2.0**k)
            for _ in range(abs(st)):
                t = np.nextafter(t, np.float32(np.inf if st > 0 else -np.inf))
            targets.append(float(t))
    targets += [1e-6, 5e-5]                                      # below the 1e-4 floor
    nb_c = 2
    rb = -(-len(targets) // nb_c)
    shape = (rb * 128 - 61, nb_c * 128 - 37)                   # partial edge blocks in both directions
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(shape, generator=g) * 2 - 1)                # [-1, 1): scaled per block below
    amax = torch.zeros(rb, nb_c, dtype=torch.float32)
    for i, t in enumerate(targets):
        r, c = divmod(i, nb_c)
        rows, cols = slice(r * 128, min(r * 128 + 128, shape[0])), slice(c * 128, min(c * 128 + 128, shape[1]))
        w[rows, cols] *= t * 0.99
        w[r * 128, c * 128] = t if i % 2 else -t               # the block's largest |value|, either sign
        amax[r, c] = t
    # (an exp2(ceil(log2(s))) implementation fails on these inputs: the test can tell the rules apart)
    s_lin = torch.clamp(amax, min=1e-4) / 448
    assert bool((torch.exp2(torch.ceil(torch.log2(s_lin))) < s_lin).any())
    want = np.array([[_ue8m0_rule(float(a)) for a in row] for row in amax], dtype=np.float32)

    q_t, s_t = fp8.quantize(w, ue8m0=True)                                  # generic encode / convert
    assert np.array_equal(s_t.numpy(), want)
    q_c, s_c, _ = kernels.encode_fp8(w.numpy(), ue8m0=True)                 # C encode
    with native.disabled():
        q_f, s_f, _ = kernels.encode_fp8(w.numpy(), ue8m0=True)             # its torch fallback
    for q, s in ((q_c, s_c), (q_f, s_f)):
        assert np.array_equal(s, want) and q.tobytes() == raw(q_t).tobytes()

    # block mixes (a one-parent FP8 -> ue8m0 cast): parents whose decoded block maxima sit around 448 * 2^k
    shape2 = (rb * 128 - 61, nb_c * 128)                        # torch's block kernel needs whole column blocks
    q_in = torch.rand(shape2, generator=g).mul(400).to(torch.float8_e4m3fn)
    q_in[::128, ::128] = 448.0
    s_in = torch.from_numpy(np.array(targets + [1.0] * (rb * nb_c - len(targets)), dtype=np.float32)
                            .reshape(rb, nb_c) / np.float32(448))
    deq = fp8.dequantize(q_in, s_in)
    rq, rs = fp8.quantize(deq, ue8m0=True)
    args = ([raw(q_in)], [s_in.numpy()], [1.0], True, 128)
    outs = [kernels.mix_fp8(*args)[:2], mixer("torch:cpu").mix_fp8(*args)[:2]]
    with native.disabled():
        outs.append(kernels.mix_fp8(*args)[:2])
    from chimera.merge.mix import mix_fp8_blocks

    q_b, s_b, _ = mix_fp8_blocks([q_in], [s_in], torch.tensor([1.0]), True)
    outs.append((raw(q_b), s_b.numpy()))
    exact = np.array([[_ue8m0_rule(float(a)) for a in row]
                      for row in fp8._blocks(deq.abs(), 128)[0].amax(dim=(1, 3))], dtype=np.float32)
    assert np.array_equal(rs.numpy(), exact)
    for q, s in outs:
        assert np.array_equal(s, rs.numpy()) and q.tobytes() == raw(rq).tobytes()


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    code = ("import numpy as np; from chimera.merge import kernels, native; "
            "x = np.full((3, 5), 0x3F80, np.uint16); y = np.zeros((3, 5), np.uint16); "  # bf16 1.0 and 0.0
            "out, bad = kernels.mix_float([x, y], ['BF16', 'BF16'], [0.25, 0.75], 'BF16'); "
            "print(native.lib() is None, native.build_error is not None, sorted(set(out.ravel().tolist())), bad)")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "CHIMERA_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", f"[{0x3E80}]", "False"]   # bf16 0.25


@pytest.mark.parametrize("tags", [("BF16", "BF16"), ("F32", "BF16"), ("F16", "F32")])
def test_norms_in_float64(tags):
    g = torch.Generator().manual_seed(3)
    dt = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
    a, b = (torch.randn(517, 301, generator=g).to(dt[t]) for t in tags)
    got = kernels.norms(raw(a), tags[0], raw(b), tags[1])
    a64, b64 = a.double(), b.double()
    want = [float(((a64 - b64) ** 2).sum()), float((a64 ** 2).sum()), float((b64 ** 2).sum())]
    assert got == pytest.approx(want, rel=1e-12)
    with native.disabled():
        assert kernels.norms(raw(a), tags[0], raw(b), tags[1]) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------ the device path (`--device`)
from chimera.errors import ChimeraError  # noqa: E402
from chimera.merge.device import CpuMixer, DeviceMixer, mixer  # noqa: E402


@pytest.mark.parametrize("shape", [(300, 200), (256, 384)])
def test_device_path_on_cpu_gives_the_cpu_bytes(shape):
    """The torch device path, run on the CPU, writes exactly the C kernels' bytes (FP8 and bf16)."""
    dev, cpu = mixer("torch:cpu"), mixer("cpu")
    assert isinstance(dev, DeviceMixer) and isinstance(cpu, CpuMixer)
    qs, ss, lams = _fp8_parents(3, shape, seed=7)
    args = ([raw(q) for q in qs], [s.numpy() for s in ss], lams, True, 128)
    (q1, s1, b1), (q2, s2, b2) = dev.mix_fp8(*args), cpu.mix_fp8(*args)
    assert q1.tobytes() == q2.tobytes() and s1.tobytes() == s2.tobytes() and b1 == b2 is False
    xs = [raw(torch.randn(shape).to(torch.bfloat16)) for _ in range(2)]
    for out_tag in ("BF16", "F32"):
        (o1, b1), (o2, b2) = dev.mix_float(xs, ["BF16", "BF16"], [0.3, 0.7], out_tag), \
            cpu.mix_float(xs, ["BF16", "BF16"], [0.3, 0.7], out_tag)
        assert o1.tobytes() == o2.tobytes() and not b1 and not b2


def test_device_choice():
    with pytest.raises(ChimeraError, match="--device tpu: expected auto, cpu or cuda"):
        mixer("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ChimeraError, match="--device cuda: torch sees no CUDA device"):
            mixer("cuda")
        assert isinstance(mixer("auto"), CpuMixer)


def test_device_path_merge_writes_the_cpu_bytes(ds_pair, tmp_path):
    """A whole merge (FP8 block mixes, bf16 mixes, copies) through the device path on the CPU equals the
    default CPU path file for file."""
    import hashlib

    import yaml

    from chimera.merge import merge

    a, b, *_ = ds_pair
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                                   "weights": {"default": {"v3": 0.6, "r1": 0.4}, "routed_experts": {"r1": 1.0}}}))
    runs = {d: merge(rec, tmp_path / d.replace(":", "-"), device=d) for d in ("cpu", "torch:cpu")}
    kinds = {r.get("kernel") for r in runs["cpu"].records.values()}
    assert {"fused-fp8", "fused-float"} <= kinds

    def sha(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}

    assert sha(tmp_path / "cpu") == sha(tmp_path / "torch-cpu")


def test_norms_fp8_equal_norms_of_the_decoded_values():
    (qa, qb), (sa, sb), _ = _fp8_parents(2, (300, 200), seed=5)
    got = kernels.norms_fp8(raw(qa), sa.numpy(), raw(qb), sb.numpy())
    want = kernels.norms(kernels.decode_fp8(raw(qa), sa.numpy()), "F32", kernels.decode_fp8(raw(qb), sb.numpy()), "F32")
    a64, b64 = ckpt_dequant(qa, sa), ckpt_dequant(qb, sb)
    exact = [float(((a64 - b64) ** 2).sum()), float((a64 ** 2).sum()), float((b64 ** 2).sum())]
    assert got == pytest.approx(want, rel=1e-12) and got == pytest.approx(exact, rel=1e-12)


def ckpt_dequant(q, s):
    import ckpt

    return ckpt.dequant_ref(q, s).float().double()   # float32 values, as the merge reads them


def test_norms_fp8_vector_path_gives_the_portable_bits(tmp_path):
    """The FP8 distance kernel built for this CPU (an AVX-512 path where it has one: codes decoded with
    arithmetic, 16 at a time) and built portably (table lookups, 8 lanes) sum in the same order: the same bits,
    on partial blocks, every code value (subnormals included) and NaN codes."""
    import ctypes

    so = tmp_path / "portable.so"
    subprocess.run(["cc", *native.FALLBACK_FLAGS, str(native.SOURCE), "-o", str(so), "-lm"], check=True)
    portable = ctypes.CDLL(str(so))
    portable.norms_fp8.argtypes = native.SIGNATURES["norms_fp8"]
    g = np.random.default_rng(11)
    for shape in ((300, 200), (256, 384), (7, 1000), (129, 131)):
        qa, qb = (g.integers(0, 256, shape, dtype=np.uint8) for _ in range(2))
        nb = -(-shape[1] // 128)
        sa, sb = (g.random((-(-shape[0] // 128), nb), dtype=np.float32) * 1e-2 for _ in range(2))
        for nan in ((), ("a",), ("b",)):
            a, b = qa.copy(), qb.copy()
            a[(a & 0x7F) == 0x7F] = 0
            b[(b & 0x7F) == 0x7F] = 0
            if nan:
                (a if nan == ("a",) else b)[shape[0] - 1, shape[1] - 1] = 0xFF
            got = kernels.norms_fp8(a, sa, b, sb)
            sums = {}
            for name, lib in (("portable", portable), ("native", native.lib())):
                buf = (ctypes.c_double * 3)()
                lib.norms_fp8(0, shape[0], shape[1], a.ctypes.data, sa.ctypes.data, b.ctypes.data, sb.ctypes.data,
                              nb, 128, buf)
                sums[name] = np.array(list(buf))
            assert np.array_equal(sums["native"], sums["portable"], equal_nan=True), (shape, nan)
            if not nan:
                assert got == pytest.approx(list(sums["portable"]), rel=1e-12)
            else:
                assert math.isnan(got[0]) and math.isnan(got[1 if nan == ("a",) else 2])


def test_truncated_mapping_is_an_error_not_a_crash(tmp_path):
    """A SIGBUS inside a kernel call (a page of a mapped file past its new end) returns from the call as
    native.FileChanged; the process lives on and the kernels keep working."""
    import mmap

    f = tmp_path / "parent.bin"
    q = np.random.default_rng(0).integers(0, 0x7E, (512, 256), dtype=np.uint8)
    f.write_bytes(q.tobytes())
    s = np.full((4, 2), 1e-3, dtype=np.float32)
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, np.uint8).reshape(512, 256)
    assert kernels.norms_fp8(view, s, q, s)[0] == 0.0
    os.truncate(f, 4096)
    with pytest.raises(native.FileChanged):
        kernels.norms_fp8(view, s, q, s)
    with pytest.raises(native.FileChanged):
        kernels.mix_fp8([view, q], [s, s], [0.5, 0.5])
    assert kernels.norms_fp8(q, s, q, s)[0] == 0.0
    del view
    mm.close()
