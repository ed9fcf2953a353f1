"""Stored formats on files written to the published layouts: grouping into logical tensors, reading as float32
against the formats' own libraries, and writing back."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ckpt
import qfix
from chimera.checkpoint import mxfp4
from chimera.checkpoint.arch import classify
from chimera.checkpoint.decode import read_array
from chimera.checkpoint.files import Checkpoint, read_tensor
from chimera.checkpoint.formats import OutFormat
from chimera.errors import ChimeraError
from chimera.merge.mix import encode_rows
from moe_tiny import perturbed, save


def f32(st, rows=None):
    return torch.from_numpy(read_array(st, rows))


def test_gpt_oss_mxfp4_release(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    m = perturbed("gpt_oss", 0)
    d = qfix.gpt_oss_mxfp4(save(m, tmp_path / "oss", "gpt_oss"))
    ck = Checkpoint(d)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    st = ck.stored[name]
    assert st.format == "mxfp4" and st.transposed
    assert st.shape == tuple(m.state_dict()[name].shape) == (8, 32, 64)      # transformers' in-memory [E, H, 2I]
    assert {p.name for p in st.parts} == {name + "_blocks", name + "_scales"}
    want = convert_moe_packed_tensors(read_tensor(st.weight), read_tensor(st.part("scales")), dtype=torch.float32)
    assert torch.equal(f32(st), want)
    assert torch.equal(f32(st, (2, 5)), want[2:5])                                   # an expert range
    assert ck.stored["model.layers.1.mlp.router.weight"].format == "plain"
    assert {classify(n, ck.config) for n in ck.stored if "experts" in n} == {"routed_experts"}
    # re-encoding a dequantized MXFP4 tensor is lossless (its values are on the grid at that scale or finer)
    of = OutFormat.like(st)
    assert of.parts(name, st.shape) == [("weight", name + "_blocks", "U8", (8, 64, 1, 16)),
                                        ("scales", name + "_scales", "U8", (8, 64, 1))]
    enc = encode_rows(want, of, st.shape)
    assert torch.equal(mxfp4.dequantize(enc["weight"], enc["scales"]).transpose(1, 2), want)


def test_kimi_int4_release(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    d = qfix.kimi_int4(save(perturbed("kimi_k2", 0), tmp_path / "k", "kimi_k2"))
    ck = Checkpoint(d)
    up, down = ck.stored["model.layers.1.mlp.experts.3.up_proj.weight"], ck.stored["model.layers.2.mlp.experts.0.down_proj.weight"]
    assert up.format == down.format == "int4_pack"
    assert up.shape == (16, 32) and down.shape == (32, 16)       # down: 16 columns, half a group, read from weight_shape
    assert ck.stored["model.layers.1.mlp.shared_experts.up_proj.weight"].format == "plain"
    assert classify("model.layers.2.mlp.experts.0.down_proj.weight", ck.config) == "routed_experts"
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    sd = {"weight_packed": read_tensor(up.weight), "weight_scale": read_tensor(up.part("scale")),
          "weight_shape": read_tensor(up.part("shape"))}
    lib = PackedQuantizationCompressor.decompress(sd, QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    assert torch.equal(f32(up).to(torch.bfloat16), lib)
    assert torch.equal(f32(down, (4, 9)), f32(down)[4:9])
    of = OutFormat.like(down)
    enc = encode_rows(f32(down), of, down.shape)
    assert enc["weight"].shape == (32, 2) and enc["scale"].dtype == torch.bfloat16 and enc["shape"].tolist() == [32, 16]


def test_deepseek_v4_release(tmp_path):
    """V4: routed experts MXFP4 (int8 + F8_E8M0 `scale`), projections FP8 with E8M0 `scale` 128x128 blocks."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    d = qfix.deepseek_v4(save(perturbed("deepseek_v4", 0), tmp_path / "v4", "deepseek_v4"))
    ck = Checkpoint(d)
    w1 = ck.stored["model.layers.1.ffn.experts.2.w1.weight"]
    w2 = ck.stored["model.layers.1.ffn.experts.2.w2.weight"]
    assert w1.format == w2.format == "mxfp4" and w1.shape == (32, 32) and w2.shape == (32, 32)
    assert w1.part("scales").dtype == "F8_E8M0"
    deq = Fp8Dequantize(None)._dequantize_one
    assert torch.equal(f32(w1), deq(read_tensor(w1.weight), read_tensor(w1.part("scales")), output_dtype=torch.float32))
    wq = ck.stored["model.layers.1.attn.wq_a.weight"]
    assert wq.format == "fp8_block" and wq.scale.dtype == "F8_E8M0" and wq.ue8m0
    assert torch.equal(f32(wq), deq(read_tensor(wq.weight), read_tensor(wq.scale), output_dtype=torch.float32))
    assert classify("model.layers.1.ffn.experts.2.w1.weight", ck.config) == "routed_experts"
    of = OutFormat.like(w2)
    assert [p[1:] for p in of.parts(w2.name, w2.shape)] == [(w2.name, "I8", (32, 16)),
                                                             ("model.layers.1.ffn.experts.2.w2.scale", "F8_E8M0", (32, 1))]
    enc = encode_rows(f32(w2), of, w2.shape)
    assert torch.equal(mxfp4.dequantize(enc["weight"], enc["scales"]), f32(w2))


def test_fp8_block_and_opaque_and_orphans(tmp_path):
    sd, cfg = ckpt.ds_state(0, mtp=False)
    d = ckpt.write(tmp_path / "ds", sd, cfg, "fp8")
    ck = Checkpoint(d)
    st = ck.stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    assert st.format == "fp8_block" and st.block == 128
    assert np.array_equal(read_array(st), ckpt.dequant_ref(read_tensor(st.weight), read_tensor(st.scale)).float().numpy())
    assert ck.stored["model.embed_tokens.weight"].format == "plain"
    # NVFP4-style companions: copied together, never read as numbers
    q = tmp_path / "nv"
    q.mkdir()
    (q / "config.json").write_text(json.dumps(cfg))
    save_file({"a.weight": torch.zeros(4, 8, dtype=torch.uint8), "a.weight_scale": torch.ones(4, 1).to(torch.float8_e4m3fn),
               "a.weight_scale_2": torch.ones(()), "a.input_scale": torch.ones(()),
               "b.weight": torch.zeros(2, 2)}, str(q / "model.safetensors"))
    g = Checkpoint(q).stored
    assert g["a.weight"].format == "opaque" and len(g["a.weight"].parts) == 4 and g["b.weight"].format == "plain"
    with pytest.raises(ChimeraError, match="a.weight is stored as opaque .* can't read as numbers"):
        read_array(g["a.weight"])
    (q / "model.safetensors").unlink()
    save_file({"c.weight_packed": torch.zeros(1, 1, dtype=torch.int32)}, str(q / "model.safetensors"))
    with pytest.raises(ChimeraError, match="c.weight_packed has no weight_scale"):
        Checkpoint(q).stored


def test_qwen3_fp8_release_bf16_scales(tmp_path):
    """Qwen3's FP8 releases store `weight_scale_inv` in bfloat16: read like transformers reads it, kept on write."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    d = qfix.qwen3_fp8(save(perturbed("qwen3_moe", 0), tmp_path / "q", "qwen3_moe"))
    ck = Checkpoint(d)
    st = ck.stored["model.layers.1.mlp.experts.4.down_proj.weight"]
    assert st.format == "fp8_block" and st.scale.dtype == "BF16" and st.describe().endswith("(bf16 scales)")
    want = Fp8Dequantize(None)._dequantize_one(read_tensor(st.weight), read_tensor(st.scale), output_dtype=torch.float32)
    assert torch.equal(f32(st), want)
    of = OutFormat.like(st)
    assert of.parts(st.name, st.shape)[1][1:] == (st.name + "_scale_inv", "BF16", (1, 1)) and of.accepts(st)
