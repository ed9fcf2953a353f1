"""chimera convert: bf16 <-> DeepSeek block FP8, exact dequantization, config updated."""
import json
import shutil
import subprocess
import sys

import torch

import ckpt
from bundled import tensor_count
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


# ------------------------------------------------------------------ provenance (cards, records, names)

def _front(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---")[1])


def _no_local_paths(text: str, *roots) -> None:
    for r in roots:
        assert str(r) not in text, r
    assert "/tmp/" not in text and "/work/" not in text and "/root/" not in text


def test_converting_a_merged_child_keeps_its_provenance(tmp_path):
    import chimera

    child = tmp_path / "r1t"
    chimera.merge({"parents": {"v3": "tiny-v3-fp8", "r1": "tiny-r1-fp8"}, "base": "v3",
                   "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}}, child)
    card, recipe = (child / "README.md").read_text(), (child / "chimera_recipe.yaml").read_text()
    record = json.loads((child / "chimera_merge.json").read_text())
    assert _front(card)["base_model"] == ["tiny-v3-fp8", "tiny-r1-fp8"]
    assert not (child / "zoo.json").exists()  # the base's identity file stays with the base
    _no_local_paths(card, tmp_path)

    p = subprocess.run([sys.executable, "-m", "chimera", "convert", str(child), "-o", str(tmp_path / "bf16")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "bf16"
    card2 = (out / "README.md").read_text()
    rec2 = json.loads((out / "chimera_merge.json").read_text())
    assert _front(card2) == _front(card)  # still a merge of tiny-v3-fp8 and tiny-r1-fp8
    assert card2.startswith(card.rstrip()) and "## Conversions" in card2 and "| 1 | r1t | bfloat16 |" in card2
    assert (out / "chimera_recipe.yaml").read_text() == recipe
    assert rec2["tensors"] == record["tensors"] and rec2["plan_id"] == record["plan_id"]
    (conv,) = rec2["conversions"]
    assert conv["from"] == "r1t" and conv["dtype"] == "bfloat16" and sum(conv["ops"].values()) == tensor_count()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (out / "zoo.json").exists()

    from chimera.merge.convert import convert

    convert(out, tmp_path / "fp8-again", "float8")  # a chain: both steps are kept, in order
    rec3 = json.loads((tmp_path / "fp8-again" / "chimera_merge.json").read_text())
    assert [c["dtype"] for c in rec3["conversions"]] == ["bfloat16", "float8"]
    card3 = (tmp_path / "fp8-again" / "README.md").read_text()
    assert card3.count("## Conversions") == 1 and "| 2 | bf16 | block FP8 |" in card3
    assert _front(card3)["base_model"] == ["tiny-v3-fp8", "tiny-r1-fp8"]


def test_converting_a_plain_model_names_its_source(tmp_path):
    from chimera.merge.convert import convert

    convert("tiny-r1", tmp_path / "fp8", "float8")
    card = (tmp_path / "fp8" / "README.md").read_text()
    meta = _front(card)
    assert meta["base_model"] == ["tiny-r1"] and meta["base_model_relation"] == "quantized"
    rec = json.loads((tmp_path / "fp8" / "chimera_merge.json").read_text())
    assert rec["source"] == "tiny-r1" and rec["conversions"][0]["dtype"] == "float8" and len(rec["tensors"]) == tensor_count()
    assert not (tmp_path / "fp8" / "chimera_recipe.yaml").exists()
    _no_local_paths(card + json.dumps(rec), tmp_path)


def test_bundled_fp8_copies_name_their_source_not_a_folder():
    from chimera.zoo import family

    for name in ("tiny-v3", "tiny-r1"):
        d = family.model_path(f"{name}-fp8")
        card, rec = (d / "README.md").read_text(), (d / "chimera_merge.json").read_text()
        assert _front(card)["base_model"] == [name] and json.loads(rec)["source"] == name
        _no_local_paths(card + rec)
        assert not (d / "zoo.json").exists()


def test_cards_name_parents_by_hub_id_or_folder(tmp_path):
    """A hub-cache snapshot is named by its repository, a config's `_name_or_path` hub id wins, else the folder."""
    from chimera.merge.recipe import from_dict
    from chimera.merge.plan import build_plan
    from chimera.merge.card import merge_card
    from chimera.resolve import model_name
    from chimera.zoo import family

    snap = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3" / "snapshots" / "0123abcd"
    shutil.copytree(family.model_path("tiny-v3"), snap)
    named = tmp_path / "finetune"
    shutil.copytree(family.model_path("tiny-r1"), named)
    cfg = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "deepseek-ai/DeepSeek-R1"}))
    local = tmp_path / "my-model"
    shutil.copytree(family.model_path("tiny-r1"), local)
    cfg_local = {**cfg, "_name_or_path": str(local)}  # save_pretrained from a local folder records its path
    (local / "config.json").write_text(json.dumps(cfg_local))
    assert model_name(snap) == "deepseek-ai/DeepSeek-V3"
    assert model_name(named) == "deepseek-ai/DeepSeek-R1"
    assert model_name(local) == "my-model"
    plan = build_plan(from_dict({"parents": {"v3": str(snap), "r1": str(named), "x": str(local)}, "base": "v3",
                                 "weights": {"default": {"v3": 0.5, "r1": 0.25, "x": 0.25}}}))
    card = merge_card(plan, {"mix": 1})
    assert _front(card)["base_model"] == ["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "my-model"]
    _no_local_paths(card, tmp_path)
