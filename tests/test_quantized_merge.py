"""Merges of quantized releases written to the published layouts: selections copy stored bytes in every format,
mixes re-encode in the output's format (checked against the formats' codecs and float64), parents stored in
different formats are converted to the recipe's output format, and what can't be done is refused before anything
is written."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import ckpt
import qfix
from chimera.checkpoint import fp8, int4, mxfp4
from chimera.checkpoint.arch import classify
from chimera.checkpoint.decode import read_array
from chimera.checkpoint.files import Checkpoint, read_tensor
from chimera.errors import ChimeraError
from chimera.merge import merge
from chimera.merge.plan import build_plan, formats_summary
from chimera.merge.recipe import load
from moe_tiny import load as load_model
from moe_tiny import logits, perturbed, save

RELEASES = {"gpt_oss": qfix.gpt_oss_mxfp4, "kimi_k2": qfix.kimi_int4, "deepseek_v4": qfix.deepseek_v4,
            "qwen3_moe": qfix.qwen3_fp8}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return {a: tuple(fn(save(perturbed(a, s), root / a / n, a)) for s, n in ((0, "p"), (1, "q")))
            for a, fn in RELEASES.items()}


def _recipe(tmp_path, name, d):
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


@pytest.mark.parametrize("arch", sorted(RELEASES))
def test_selection_copies_every_stored_byte(arch, releases, tmp_path):
    p, q = releases[arch]
    r = _recipe(tmp_path, "r1t", {"parents": {"p": str(p), "q": str(q)}, "base": "p",
                                  "weights": {"default": {"p": 1.0}, "routed_experts": {"q": 1.0}}})
    res = merge(r, tmp_path / "c")
    assert res.ops == {"copy": len(Checkpoint(p).stored)}
    got, rp, rq = ckpt.raw(tmp_path / "c"), ckpt.raw(p), ckpt.raw(q)
    ck = Checkpoint(p)
    assert set(got) == set(rp)
    for name, st in ck.stored.items():
        want = rq if classify(name, ck.config) == "routed_experts" else rp
        for part in st.parts:                       # MXFP4 blocks + scales, INT4 packed + scale + shape, FP8 scale
            assert got[part.name] == want[part.name], part.name
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"] == ck.config["quantization_config"]


@pytest.mark.parametrize("arch", sorted(RELEASES))
def test_mix_re_encodes_in_the_release_format(arch, releases, tmp_path):
    p, q = releases[arch]
    r = _recipe(tmp_path, "half", {"parents": {"p": str(p), "q": str(q)}, "base": "p",
                                   "weights": {"default": {"p": 0.5, "q": 0.5}},
                                   "overrides": [{"match": "*.tid2eid", "weights": {"p": 1.0}}]})
    merge(r, tmp_path / "c")
    cp, cq, cc = Checkpoint(p), Checkpoint(q), Checkpoint(tmp_path / "c")
    n = 0
    for name, st in cp.stored.items():
        if st.format == "plain":
            continue
        n += 1
        out = cc.stored[name]
        assert out.format == st.format and [x.dtype for x in out.parts] == [x.dtype for x in st.parts], name
        a, b = torch.from_numpy(read_array(st)), torch.from_numpy(read_array(cq.stored[name]))
        mixed = a * 0.5 + b * 0.5                   # the float32 mix chimera computes
        exact = a.double() * 0.5 + b.double() * 0.5
        got = torch.from_numpy(read_array(out))
        if st.format == "mxfp4":                    # the OCP encoder, byte for byte; error <= 2 steps of the block
            w = mixed.transpose(-1, -2) if st.transposed else mixed
            blocks, scales = mxfp4.quantize(w)
            assert np.array_equal(read_tensor(out.part("scales")).view(torch.uint8).numpy(), scales.numpy())
            assert read_tensor(out.weight).view(torch.uint8).reshape(-1).tolist() == blocks.reshape(-1).tolist()
            step = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127).repeat_interleave(32, -1)
            step = step[..., : w.shape[-1]]
            err = ((got.transpose(-1, -2) if st.transposed else got).double() - (exact.transpose(-1, -2) if st.transposed else exact)).abs()
            assert bool((err <= 2 * step + 1e-12).all()), name
        elif st.format == "fp8_block":   # fresh scales in the release's own scale dtype and name:
            e8 = st.scale.dtype == "F8_E8M0"  # DeepSeek-V4 E8M0 powers of two, Qwen3 bf16 `weight_scale_inv`
            q8, s8 = fp8.quantize(mixed, st.block, ue8m0=e8, scale_dtype=torch.float32 if e8 else torch.bfloat16)
            assert torch.equal(read_tensor(out.weight).view(torch.uint8), q8.view(torch.uint8)), name
            assert out.scale.dtype == st.scale.dtype and out.scale.name == st.scale.name
            assert torch.equal(read_tensor(out.scale).float(), s8.float()), name
            err = (got.double() - exact).abs()      # e4m3: 2^-4 relative, plus the bf16 scale's rounding
            assert bool((err <= exact.abs() * 2**-3 + 1e-6).all()), name
        elif st.format == "int4_pack":              # compressed-tensors' rule, bf16 scales like the release
            packed, scale = int4.quantize(mixed, torch.bfloat16)
            assert torch.equal(read_tensor(out.weight), packed) and torch.equal(read_tensor(out.part("scale")), scale)
            assert torch.equal(read_tensor(out.part("shape")), torch.tensor(list(st.shape)))
        else:
            raise AssertionError(st.format)
    assert n > 0


def test_mixed_format_parents_fp8_release_and_bf16_finetune(tmp_path, capsys):
    """An FP8 release and a bf16 fine-tune of it: the recipe's output format decides, the plan says so."""
    sd, cfg = ckpt.ds_state(0, mtp=False)
    v3 = ckpt.write(tmp_path / "v3", sd, cfg, "fp8")
    ft = ckpt.write(tmp_path / "ft", ckpt.perturb(sd, 3, 0.2, only="experts"), cfg, "bf16")
    base = {"parents": {"v3": str(v3), "ft": str(ft)}, "base": "v3",
            "weights": {"default": {"v3": 1.0}, "routed_experts": {"ft": 1.0}}}
    with pytest.raises(ChimeraError, match="quantization_config"):
        build_plan(load(_recipe(tmp_path, "r0", base)))
    plan = build_plan(load(_recipe(tmp_path, "r1", base | {"use_base_config": ["quantization_config"]})))
    summ = formats_summary(plan)
    experts = [it for it in plan.items if it.cls == "routed_experts"]
    assert summ["converted"] == {"bf16 -> fp8 e4m3 128x128 blocks (f32 scales)": len(experts)}
    assert {it.op for it in experts} == {"cast"}
    from typer.testing import CliRunner

    from chimera.cli import app

    r = CliRunner().invoke(app, ["plan", str(tmp_path / "r1.yaml")])
    assert r.exit_code == 0, r.output
    assert "output formats (output.dtype keep): fp8 e4m3 128x128 blocks (f32 scales) x" in r.output
    assert f"converted: {len(experts)} tensor(s) bf16 -> fp8 e4m3 128x128 blocks (f32 scales)" in r.output
    res = merge(_recipe(tmp_path, "r1", base | {"use_base_config": ["quantization_config"]}), tmp_path / "keep")
    cc, cft = Checkpoint(tmp_path / "keep"), Checkpoint(ft)
    for it in experts:                         # the fine-tune's bf16 values, quantized with fresh 128x128 blocks
        q, s = fp8.quantize(torch.from_numpy(read_array(cft.stored[it.name])))
        out = cc.stored[it.name]
        assert out.format == "fp8_block"
        assert torch.equal(read_tensor(out.weight).view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(read_tensor(out.scale), s)
    rv = ckpt.raw(v3)
    got = ckpt.raw(tmp_path / "keep")
    assert all(got[k] == rv[k] for k in rv if ".experts." not in k)
    assert res.ops == {"copy": len(plan.items) - len(experts), "cast": len(experts)}
    # bfloat16 output: every tensor dequantized; the child has no quantization_config
    bf = merge(_recipe(tmp_path, "r2", base | {"output": {"dtype": "bfloat16"}}), tmp_path / "bf")
    cb = Checkpoint(tmp_path / "bf")
    assert {st.format for st in cb.stored.values()} == {"plain"} and "quantization_config" not in cb.config
    assert {st.dtype for n, st in cb.stored.items() if "correction_bias" not in n} == {"BF16"}
    assert bf.ops.get("cast", 0) > 0


def test_unimplemented_mix_is_refused_before_writing(tmp_path):
    """A format chimera has no codec for (NVFP4-style companions) copies, but a mix is refused at plan time."""
    sd, cfg = ckpt.ds_state(0, mtp=False)
    dirs = []
    for i, name in enumerate(("a", "b")):
        d = ckpt.write(tmp_path / name, ckpt.perturb(sd, i, 0.1), cfg, "bf16")
        f = d / "model.safetensors"
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            t = {k: h.get_tensor(k) for k in h.keys()}
        w = "model.layers.1.mlp.experts.0.up_proj.weight"
        t[w] = torch.randint(0, 255, (t[w].shape[0], t[w].shape[1] // 2), dtype=torch.uint8)
        stem = w[: -len(".weight")]
        t[stem + ".weight_scale"] = torch.ones(t[w].shape[0], 1).to(torch.float8_e4m3fn)
        t[stem + ".weight_scale_2"] = torch.tensor(0.5 + i)
        f.unlink()
        save_file(t, str(f))
        dirs.append(d)
    base = {"parents": {"a": str(dirs[0]), "b": str(dirs[1])}, "base": "a"}
    sel = merge(_recipe(tmp_path, "sel", base | {"weights": {"default": {"a": 1.0}, "routed_experts": {"b": 1.0}}}),
                tmp_path / "sel")
    got, rb = ckpt.raw(tmp_path / "sel"), ckpt.raw(dirs[1])
    assert all(got[k] == rb[k] for k in rb if k.startswith("model.layers.1.mlp.experts.0.up_proj"))
    assert sel.ops == {"copy": len(Checkpoint(dirs[0]).stored)}
    r = _recipe(tmp_path, "mix", base | {"weights": {"default": {"a": 1.0}, "routed_experts": {"a": 0.5, "b": 0.5}}})
    with pytest.raises(ChimeraError, match=r"tensor model.layers.1.mlp.experts.0.up_proj.weight has opaque "
                                           r"\(weight, weight_scale, weight_scale_2\), which cannot be mixed") as ei:
        merge(r, tmp_path / "mix")
    assert "\n" not in str(ei.value) and not (tmp_path / "mix").exists()


def test_quantized_child_converts_and_loads_with_the_mixed_logits(releases, tmp_path):
    """A 0.5/0.5 float32 child of two gpt-oss MXFP4 releases loads in transformers and gives the logits of the
    same mix made in memory from the dequantized parents."""
    p, q = releases["gpt_oss"]
    r = _recipe(tmp_path, "half", {"parents": {"p": str(p), "q": str(q)}, "base": "p",
                                   "weights": {"default": {"p": 0.5, "q": 0.5}}, "output": {"dtype": "float32"}})
    merge(r, tmp_path / "c")
    assert "quantization_config" not in Checkpoint(tmp_path / "c").config
    child = load_model("gpt_oss", tmp_path / "c")
    ref = load_model("gpt_oss", tmp_path / "c")
    cp, cq = Checkpoint(p), Checkpoint(q)
    sd = {n: torch.from_numpy(read_array(st)) * 0.5 + torch.from_numpy(read_array(cq.stored[n])) * 0.5
          for n, st in cp.stored.items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m]
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits("gpt_oss", child, ids), logits("gpt_oss", ref, ids))
