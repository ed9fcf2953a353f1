"""chimera convert: bf16 <-> DeepSeek block FP8, exact dequantization, config updated."""
import json
import subprocess
import sys

import torch

import ckpt
from chimera.checkpoint.files import Checkpoint


def test_convert_roundtrip(tmp_path):
    sd, cfg = ckpt.ds_state(30, mtp=True)
    src = ckpt.write(tmp_path / "bf16", sd, cfg, "bf16")
    for args in (["--dtype", "float8"],):
        p = subprocess.run([sys.executable, "-m", "chimera", "convert", str(src), "-o", str(tmp_path / "fp8"), *args],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    fp8 = Checkpoint(tmp_path / "fp8")
    assert fp8.config["quantization_config"]["weight_block_size"] == [128, 128]
    kinds = {n: i.dtype for n, i in fp8.tensors.items()}
    assert kinds["model.layers.1.mlp.experts.0.up_proj.weight"] == "F8_E4M3"
    assert kinds["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == "F8_E4M3"
    assert kinds["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"] == "F32"
    assert kinds["model.embed_tokens.weight"] == "BF16" and kinds["model.norm.weight"] == "BF16"
    assert kinds["model.layers.1.mlp.gate.weight"] == "BF16"
    # dequantized FP8 equals the source within e4m3 rounding of each 128x128 block
    ref, got = ckpt.load_float(src), ckpt.load_float(tmp_path / "fp8")
    for n, t in got.items():
        r = ref[n]
        if kinds[n] == "F8_E4M3":
            s = fp8.read_float(n)  # chimera's dequantization agrees with the test's reference formula
            assert torch.equal(s.double(), t.float().double())
            amax = r.abs().max()
            assert torch.all((t - r).abs() <= r.abs() * 2**-4 + amax / 448 * 2**-9 + 1e-12), n
        else:
            assert torch.equal(t, r), n
    # back to bf16: exact dequantization, then one bf16 rounding; config loses quantization_config
    from chimera.merge.convert import convert

    convert(tmp_path / "fp8", tmp_path / "back", "bfloat16")
    cfg2 = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in cfg2 and cfg2["torch_dtype"] == "bfloat16"
    back = ckpt.load_float(tmp_path / "back")
    for n, t in back.items():
        assert torch.equal(t, got[n].to(torch.bfloat16).double()), n
