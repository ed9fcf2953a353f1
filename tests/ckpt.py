"""Tiny real checkpoints for the tests: transformers configs, safetensors files on disk.

DeepSeek parents are written in FP8 (128x128 block scales) with shapes that are not multiples of
128, and carry an MTP layer (index num_hidden_layers) like the real V3/R1 files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from chimera.checkpoint import fp8

FP8_CLASSES_RE = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts.", "experts.")

DS_CONFIG = dict(vocab_size=300, hidden_size=200, intermediate_size=300, moe_intermediate_size=136,
                 num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                 n_group=2, topk_group=1, n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4,
                 q_lora_rank=96, kv_lora_rank=160, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 max_position_embeddings=128, num_nextn_predict_layers=1)


def ds_state(seed: int, mtp: bool = True, **config) -> tuple[dict[str, torch.Tensor], dict]:
    """A random DeepSeek-V3 state dict with on-disk names (+ an MTP layer) and its config.json
    (`config` overrides DS_CONFIG, e.g. hidden_size=256 for whole 128-column blocks)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**DS_CONFIG, **config})
    model = DeepseekV3ForCausalLM(cfg)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        from safetensors.torch import load_file

        sd = load_file(f"{d}/model.safetensors")
        config = json.loads(Path(d, "config.json").read_text())
    g = torch.Generator().manual_seed(seed + 1000)
    for k in sd:  # make every tensor non-trivial (init leaves norms at 1 and biases at 0)
        if sd[k].is_floating_point():
            sd[k] = sd[k] + 0.02 * torch.randn(sd[k].shape, generator=g)
    if mtp:
        n = cfg.num_hidden_layers
        last = f"model.layers.{n - 1}."
        for k in list(sd):
            if k.startswith(last):
                sd[f"model.layers.{n}." + k[len(last):]] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
        h = cfg.hidden_size
        sd[f"model.layers.{n}.enorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        sd[f"model.layers.{n}.hnorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        sd[f"model.layers.{n}.eh_proj.weight"] = 0.05 * torch.randn(h, 2 * h, generator=g)
        sd[f"model.layers.{n}.shared_head.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return sd, config


def perturb(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.5, only: str | None = None) -> dict[str, torch.Tensor]:
    """A related parent: the same tensors plus relative noise (only on names containing `only`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and (only is None or only in k):
            out[k] = v + scale * v.std().clamp(min=1e-3) * torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


def quantize_other(w: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Another quantizer's block FP8: scale = amax / fp8_max (e.g. 240), so codes never reach 448."""
    m, n = w.shape
    s = torch.empty(fp8.scale_shape((m, n)), dtype=torch.float32)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            r, c = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            blk = w[r, c].float()
            s[bi, bj] = max(float(blk.abs().max()), 1e-4) / fp8_max
            q[r, c] = (blk / s[bi, bj]).to(torch.float8_e4m3fn)
    return q, s


def write(path: Path, sd: dict[str, torch.Tensor], config: dict, dtype: str = "fp8",
          shards: int = 1, split_scale: bool = False, ue8m0: bool = False, fp8_max: float = 448.0) -> Path:
    """Write a checkpoint dir: dtype fp8 (DeepSeek blocks for projections, bf16 rest) or bf16/f32.

    With shards > 1 writes an index; `split_scale` puts every weight's scale in another shard than the
    weight (as real V3 files sometimes do). `ue8m0`: power-of-two scales and `scale_fmt: ue8m0` in the
    config (V3.1 style); `fp8_max` < 448: another quantizer's scales (see `quantize_other`).
    """
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    cfg = dict(config)
    for k, v in sd.items():
        if dtype == "fp8" and v.dim() == 2 and any(p in k for p in FP8_CLASSES_RE):
            q, s = quantize_other(v, fp8_max) if fp8_max != 448.0 else fp8.quantize(v.float(), ue8m0=ue8m0)
            tensors[k] = q
            tensors[k[: -len(".weight")] + ".weight_scale_inv"] = s
        elif dtype == "f32":
            tensors[k] = v.float()
        else:
            tensors[k] = v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
    if dtype == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128], **({"scale_fmt": "ue8m0"} if ue8m0 else {})}
    cfg["torch_dtype"] = "bfloat16" if dtype != "f32" else "float32"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    groups: list[dict] = [{} for _ in range(shards)]
    for i, k in enumerate(names):
        j = i % shards
        if split_scale and k.endswith(".weight_scale_inv"):
            j = (names.index(k[: -len(".weight_scale_inv")] + ".weight") + 1) % shards
        groups[j][k] = tensors[k]
    wm = {}
    for j, g in enumerate(groups):
        fn = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file(g, str(path / fn), metadata={"format": "pt"})
        wm.update({k: fn for k in g})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


def dequant_ref(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Independent float64 reference: W[i, j] = q[i, j] * s[i // 128, j // 128], element by block loop."""
    m, n = q.shape
    out = torch.empty(m, n, dtype=torch.float64)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            r, c = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            out[r, c] = q[r, c].to(torch.float64) * float(s[bi, bj])
    return out


def raw(path: Path) -> dict[str, bytes]:
    """Every tensor of a checkpoint dir as raw bytes (safetensors), by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return out


def load_float(path: Path) -> dict[str, torch.Tensor]:
    """Every logical tensor as float64, FP8 dequantized with the reference formula."""
    from safetensors import safe_open

    ts = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                ts[k] = h.get_tensor(k)
    out = {}
    for k, v in ts.items():
        if k.endswith(".weight_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            out[k] = dequant_ref(v, ts[k[: -len(".weight")] + ".weight_scale_inv"])
        else:
            out[k] = v.to(torch.float64)
    return out


def hub_snapshot(root: Path, repo: str, src: Path, rev: str = "0123abcd") -> Path:
    """Lay out `src` the way `huggingface-cli download` does: `models--ORG--NAME/blobs/<sha256>` and
    `snapshots/<rev>/<file>` as relative symlinks `../../blobs/<sha256>`. Returns the snapshot dir."""
    import hashlib

    cache = root / ("models--" + repo.replace("/", "--"))
    blobs, snap = cache / "blobs", cache / "snapshots" / rev
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (cache / "refs").mkdir(exist_ok=True)
    (cache / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header in place with `edit(header) -> header` (data unchanged)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8: 8 + n]))
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def recipe(tmp: Path, d: dict, name: str = "recipe.yaml") -> Path:
    """Write a recipe mapping as YAML into `tmp`."""
    import yaml

    p = tmp / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def sha_dir(path: Path) -> dict[str, str]:
    """sha256 of every file directly in `path`, by name."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}
