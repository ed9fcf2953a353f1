"""The checkpoint floor on directories laid out the way users have them (hub cache), its numpy
decoder against torch, and its import-lightness."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ckpt
from chimera.checkpoint.decode import fp8_table, read_array, to_float32
from chimera.checkpoint.files import Checkpoint
from chimera.errors import ChimeraError
from chimera.merge import merge

ROOT = Path(__file__).resolve().parents[1]
ABOVE = ("merge", "moe", "eval", "zoo", "sweep", "report", "commands", "serve", "cli")


def _r1t(tmp: Path, a: Path, b: Path, name: str) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump({"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                                 "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}},
                                 "output": {"shard_size": "300KB"}}))
    return p


def test_hub_cache_snapshots_are_parents(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    hub = tmp_path / "hub"
    sa = ckpt.hub_snapshot(hub, "deepseek-ai/V3", a)
    sb = ckpt.hub_snapshot(hub, "deepseek-ai/R1", b)
    assert all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in sa.iterdir())
    merge(_r1t(tmp_path, sa, sb, "hub.yaml"), tmp_path / "from-hub")
    merge(_r1t(tmp_path, a, b, "plain.yaml"), tmp_path / "from-dirs")
    out = tmp_path / "from-hub"
    assert not [p for p in out.rglob("*") if p.is_symlink()]          # the output holds plain files
    for f in (tmp_path / "from-dirs").iterdir():
        if f.suffix in (".safetensors",) or f.name in ("model.safetensors.index.json", "config.json",
                                                       "tokenizer_config.json"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (out / "tokenizer_config.json").is_symlink()


def test_hub_links_must_stay_in_the_cache(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    snap = ckpt.hub_snapshot(tmp_path / "hub", "org/m", a)
    Checkpoint(snap).tensors                                              # fine as laid out
    shard = sorted(snap.glob("*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(elsewhere)                                           # a link out of the cache
    with pytest.raises(ChimeraError, match="outside the model directory and its hub cache folder"):
        Checkpoint(snap).files


@pytest.mark.parametrize("entry", ["../x/model.safetensors", "/abs/model.safetensors"])
def test_index_entries_must_be_relative_names(ds_pair, tmp_path, entry):
    a, *_ = ds_pair
    c = tmp_path / "c"
    c.mkdir()
    for f in a.iterdir():
        (c / f.name).write_bytes(f.read_bytes())
    index = json.loads((c / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = entry
    (c / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ChimeraError, match=f"{name} points to {entry}, outside the model directory"):
        Checkpoint(c).files


@pytest.mark.parametrize("tag,dtype", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)])
def test_fp8_table_is_every_code_of_torch(tag, dtype):
    ref = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()
    for got in (fp8_table(tag), to_float32(bytearray(range(256)), tag, (256,)),           # code pairs
                np.concatenate([to_float32(bytearray(range(255)), tag, (255,)), ref[255:]])):  # odd length
        assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.array_equal(got[~np.isnan(ref)], ref[~np.isnan(ref)])


def test_numpy_decode_is_bitwise_the_float64_reference(ds_pair):
    """read_array (numpy) = q * s[i//128, j//128] rounded once to float32, on 200 x 136 (partial blocks)."""
    a, *_ = ds_pair
    ck = Checkpoint(a)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    st = ck.stored[name]
    from safetensors import safe_open

    with safe_open(str(st.scale.file), "pt") as h:
        scale = h.get_tensor(st.scale.name)
    with safe_open(str(st.weight.file), "pt") as h:
        codes = h.get_tensor(name)
    ref = ckpt.dequant_ref(codes, scale).to(torch.float32).numpy()      # exact product, one rounding
    assert np.array_equal(read_array(st), ref)
    rows = read_array(st, (128, 200))                                   # a block-aligned row range
    assert np.array_equal(rows, ref[128:200])
    assert torch.equal(ck.read_float(name), torch.from_numpy(ref))
    bf = "model.layers.0.input_layernorm.weight"
    with safe_open(str(ck.tensors[bf].file), "pt") as h:
        assert np.array_equal(read_array(ck.stored[bf]), h.get_tensor(bf).float().numpy())


def test_checkpoint_is_the_floor():
    """chimera/checkpoint imports nothing above it, and its plan/copy modules import no torch."""
    for f in sorted((ROOT / "chimera" / "checkpoint").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for m in mods:
                assert not any(m == f"chimera.{x}" or m.startswith(f"chimera.{x}.") for x in ABOVE), (f.name, m)
    code = ("import sys; import chimera.checkpoint.files, chimera.checkpoint.formats, chimera.checkpoint.writer, "
            "chimera.checkpoint.decode, chimera.checkpoint.arch, chimera.merge.plan, chimera.merge.execute; "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr
