"""Stored formats on files written to the published layouts: grouping into logical tensors, reading as float32
against the formats' own libraries, and writing back."""
import json

import pytest
import torch
from safetensors.torch import save_file

import ckpt
import qfix
from chimera.checkpoint import formats, mxfp4
from chimera.checkpoint.arch import classify
from chimera.checkpoint.files import Checkpoint
from chimera.errors import ChimeraError
from moe_tiny import perturbed, save


def _grouped(path):
    ck = Checkpoint(path)
    return ck, formats.group(ck.tensors)


def test_gpt_oss_mxfp4_release(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    m = perturbed("gpt_oss", 0)
    d = qfix.gpt_oss_mxfp4(save(m, tmp_path / "oss", "gpt_oss"))
    ck, g = _grouped(d)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    st = g[name]
    assert st.format == "mxfp4" and st.transposed
    assert st.shape == tuple(m.state_dict()[name].shape) == (8, 32, 64)      # transformers' in-memory [E, H, 2I]
    assert set(p.name for p in st.parts.values()) == {name + "_blocks", name + "_scales"}
    from chimera.checkpoint.files import read_tensor

    want = convert_moe_packed_tensors(read_tensor(st.parts["blocks"]), read_tensor(st.parts["scales"]),
                                      dtype=torch.float32)
    assert torch.equal(formats.read_float(st), want)
    assert torch.equal(formats.read_float(st, (2, 5)), want[2:5])                # an expert range
    assert g["model.layers.1.mlp.router.weight"].format == "plain"
    assert {classify(n, ck.config) for n in g if "experts" in n} == {"routed_experts"}
    # re-encoding a dequantized MXFP4 tensor is lossless (its values are on the grid at that scale or finer)
    of = formats.OutFormat.like(st)
    assert [(r, n, t, s) for r, n, t, s in of.parts(name, st.shape)] == [
        ("blocks", name + "_blocks", "U8", (8, 64, 1, 16)), ("scales", name + "_scales", "U8", (8, 64, 1))]
    enc = of.encode(want)
    assert torch.equal(mxfp4.dequantize(enc["blocks"], enc["scales"]).transpose(1, 2), want)


def test_kimi_int4_release(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    d = qfix.kimi_int4(save(perturbed("kimi_k2", 0), tmp_path / "k", "kimi_k2"))
    ck, g = _grouped(d)
    up, down = g["model.layers.1.mlp.experts.3.up_proj.weight"], g["model.layers.2.mlp.experts.0.down_proj.weight"]
    assert up.format == down.format == "int4_pack"
    assert up.shape == (16, 32) and down.shape == (32, 16)       # down: 16 columns, half a group, read from weight_shape
    assert g["model.layers.1.mlp.shared_experts.up_proj.weight"].format == "plain"
    assert classify("model.layers.2.mlp.experts.0.down_proj.weight", ck.config) == "routed_experts"
    from chimera.checkpoint.files import read_tensor

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    sd = {k: read_tensor(up.parts[r]) for k, r in (("weight_packed", "packed"), ("weight_scale", "scale"),
                                                    ("weight_shape", "shape"))}
    lib = PackedQuantizationCompressor.decompress(sd, QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    ours = formats.read_float(up)
    assert torch.equal(ours.to(torch.bfloat16), lib)
    assert torch.equal(formats.read_float(down, (4, 9)), formats.read_float(down)[4:9])
    of = formats.OutFormat.like(down)
    enc = of.encode(formats.read_float(down), down.shape)
    assert enc["packed"].shape == (32, 2) and enc["scale"].dtype == torch.bfloat16
    assert enc["shape"].tolist() == [32, 16]


def test_fp8_block_and_opaque_and_orphans(tmp_path):
    sd, cfg = ckpt.ds_state(0, mtp=False)
    d = ckpt.write(tmp_path / "ds", sd, cfg, "fp8")
    ck, g = _grouped(d)
    st = g["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    assert st.format == "fp8_block" and st.block == 128
    assert torch.equal(formats.read_float(st), ck.read_float(st.name))
    assert g["model.embed_tokens.weight"].format == "plain"
    # NVFP4-style companions: copied together, never read as numbers
    q = tmp_path / "nv"
    q.mkdir()
    (q / "config.json").write_text(json.dumps(cfg))
    save_file({"a.weight": torch.zeros(4, 8, dtype=torch.uint8), "a.weight_scale": torch.ones(4, 1).to(torch.float8_e4m3fn),
               "a.weight_scale_2": torch.ones(()), "a.input_scale": torch.ones(()),
               "b.weight": torch.zeros(2, 2)}, str(q / "model.safetensors"))
    _, g = _grouped(q)
    assert g["a.weight"].format == "opaque" and len(g["a.weight"].parts) == 4 and g["b.weight"].format == "plain"
    with pytest.raises(ChimeraError, match="a.weight: opaque .* can't be read as numbers"):
        formats.read_float(g["a.weight"])
    save_file({"c.weight_scale_inv": torch.ones(1, 1)}, str(q / "model.safetensors"))
    with pytest.raises(ChimeraError, match="c.weight_scale_inv is a quantization companion without its weight"):
        _grouped(q)
