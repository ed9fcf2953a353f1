"""Quantized checkpoints written to the published layouts, from tiny transformers models.

- gpt-oss MXFP4 (openai/gpt-oss-*): routed experts as `experts.{gate_up,down}_proj_blocks` uint8
  `[E, out, in/32, 16]` + `_scales` uint8 `[E, out, in/32]` (blocks run over the transposed in-memory
  parameter), everything else bf16; `quantization_config: {quant_method: mxfp4, modules_to_not_convert}`.
- Kimi K2-Thinking INT4 (compressed-tensors pack-quantized): routed experts as `weight_packed` int32,
  `weight_scale` bf16 (group 32), `weight_shape` int64; the rest bf16.
- DeepSeek-V4 (-Flash): routed experts MXFP4 as int8 `weight` `[out, in/2]` + `scale` F8_E8M0 `[out, in/32]`;
  attention/shared projections FP8 e4m3 with `scale` F8_E8M0 128x128 blocks.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chimera.checkpoint import fp8, int4, mxfp4

GPT_OSS_Q = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                 "model.embed_tokens", "lm_head"]}
KIMI_Q = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                    "strategy": "group", "group_size": 32, "dynamic": False,
                                                    "observer": "minmax"}}},
          "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"]}
V4_Q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0", "expert_dtype": "fp4"}
_EXPERT = re.compile(r"\.experts\.\d+\.")


def _rewrite(path: Path, fn, quant: dict) -> Path:
    """Replace model.safetensors by fn(state dict) and set config.json's quantization_config."""
    f = path / "model.safetensors"
    sd = load_file(str(f))
    f.unlink()
    save_file(fn(sd), str(f), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def gpt_oss_mxfp4(path: Path) -> Path:
    """A save_pretrained gpt-oss directory rewritten as the MXFP4 release."""
    def fn(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[k + "_blocks"], out[k + "_scales"] = mxfp4.quantize(v.float().transpose(1, 2))
            else:
                out[k] = v.to(torch.bfloat16)
        return out
    return _rewrite(path, fn, GPT_OSS_Q)


def kimi_int4(path: Path) -> Path:
    """A save_pretrained Kimi K2 directory rewritten as K2-Thinking: routed experts INT4, the rest bf16."""
    def fn(sd):
        out = {}
        for k, v in sd.items():
            if _EXPERT.search(k) and k.endswith(".weight"):
                stem = k[: -len(".weight")]
                packed, scale = int4.quantize(v.float(), torch.bfloat16)
                out[stem + ".weight_packed"], out[stem + ".weight_scale"] = packed, scale
                out[stem + ".weight_shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
            else:
                out[k] = v.to(torch.bfloat16) if v.is_floating_point() and "correction_bias" not in k else v
        return out
    return _rewrite(path, fn, KIMI_Q)


def deepseek_v4(path: Path) -> Path:
    """A save_pretrained DeepSeek-V4 directory rewritten as the V4 release: MXFP4 experts, FP8 projections."""
    def fn(sd):
        out = {}
        for k, v in sd.items():
            stem = k[: -len(".weight")] if k.endswith(".weight") else None
            if stem and _EXPERT.search(k):
                blocks, scales = mxfp4.quantize(v.float())
                out[k] = blocks.reshape(v.shape[0], -1).view(torch.int8)
                out[stem + ".scale"] = scales.view(torch.float8_e8m0fnu)
            elif stem and v.dim() == 2 and re.search(r"\.(attn\.w(q_a|q_b|kv|o_a|o_b)|shared_experts\.w[123])\.", k):
                q, s = fp8.quantize(v.float(), ue8m0=True)
                out[k], out[stem + ".scale"] = q, s.to(torch.float8_e8m0fnu)
            else:
                out[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
        return out
    return _rewrite(path, fn, V4_Q)


def qwen3_fp8(path: Path) -> Path:
    """A save_pretrained Qwen3-MoE directory rewritten as Qwen3's FP8 releases: every projection e4m3 with 128x128
    block `weight_scale_inv` stored in bfloat16 (Qwen/Qwen3-*-FP8), the rest bf16."""
    def fn(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("proj.weight") and v.dim() == 2:
                q, s = fp8.quantize(v.float(), scale_dtype=torch.bfloat16)
                out[k], out[k + "_scale_inv"] = q, s
            else:
                out[k] = v.to(torch.bfloat16)
        return out
    return _rewrite(path, fn, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128]})
