"""Bad input: a one-line error naming the file or tensor, exit status 2, nothing that looks complete."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import ckpt
from chimera.cli import main


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what earlier steps printed
    old = sys.argv
    sys.argv = ["chimera", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip()
    return code, err


def tree_hash(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    sd, cfg = ckpt.ds_state(20, mtp=False)
    a = ckpt.write(root / "a", sd, cfg, "fp8")
    b = ckpt.write(root / "b", ckpt.perturb(sd, 21), cfg, "fp8")
    return root, sd, cfg, a, b


def _recipe(tmp: Path, parents: dict, weights=None, **kw) -> Path:
    d = {"parents": {k: str(v) for k, v in parents.items()}, "base": next(iter(parents)),
         "weights": weights or {"default": {k: 1 / len(parents) for k in parents}}, **kw}
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def expect_error(capsys, tmp: Path, recipe: Path, *needles: str, out: Path | None = None, extra=()):
    out = out or tmp / "out"
    code, err = run_cli(["merge", recipe, "-o", out, *extra], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    if out.exists() and not (out / ".." / "config.json").exists() and "overlaps" not in err:
        assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
        assert not list(out.glob("*.safetensors"))
    return err


def test_different_architectures(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    from transformers import MixtralConfig, MixtralForCausalLM

    m = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    m.save_pretrained(tmp_path / "mix")
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "m": tmp_path / "mix"}), "different architectures", "model_type")


def test_different_names_and_shapes(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    sd2 = dict(sd)
    gone = "model.layers.1.mlp.experts.5.up_proj.weight"
    del sd2[gone]
    c = ckpt.write(tmp_path / "c", sd2, cfg, "fp8")
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "c": c}), "different tensor names", gone)
    sd3 = dict(sd)
    sd3["model.layers.0.self_attn.o_proj.weight"] = torch.randn(200, 100)
    d = ckpt.write(tmp_path / "d", sd3, cfg, "fp8")
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "d": d}), "model.layers.0.self_attn.o_proj.weight", "shape")


def test_missing_scale(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    from safetensors import safe_open

    c = tmp_path / "c"
    c.mkdir()
    (c / "config.json").write_text((a / "config.json").read_text())
    with safe_open(str(a / "model.safetensors"), "pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys() if k != "model.layers.1.self_attn.o_proj.weight_scale_inv"}
    save_file(t, str(c / "model.safetensors"))
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "c": c}), "model.layers.1.self_attn.o_proj.weight", "weight_scale_inv")


def test_truncated_and_corrupt(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    for kind in ("truncated", "corrupt"):
        c = tmp_path / kind
        c.mkdir()
        (c / "config.json").write_text((a / "config.json").read_text())
        data = (a / "model.safetensors").read_bytes()
        data = data[: len(data) - 1000] if kind == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
        (c / "model.safetensors").write_bytes(data)
        expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "c": c}), str(c / "model.safetensors"), kind)


def test_index_pointing_outside(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    c = tmp_path / "c"
    c.mkdir()
    (c / "config.json").write_text((a / "config.json").read_text())
    (c / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../a/model.safetensors"}}))
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "c": c}), "model.safetensors.index.json", "outside")


@pytest.mark.parametrize("weights,needle", [
    ({"default": {"a": 0.5, "b": 0.6}}, "sum to 1.1"),
    ({"default": {"a": 0.5, "x": 0.5}}, "unknown parent 'x'"),
    ({"default": {"a": 1.0}, "routed_expert": {"b": 1.0}}, "unknown tensor class 'routed_expert'"),
    ({"default": {"a": 1.5, "b": -0.5}}, "must be a finite number >= 0"),
])
def test_bad_lambdas(pair, tmp_path, capsys, weights, needle):
    root, sd, cfg, a, b = pair
    err = expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "b": b}, weights), needle)
    assert "r.yaml" in err


def test_output_dirs(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    before = tree_hash(a)
    r = _recipe(tmp_path, {"a": a, "b": b})
    expect_error(capsys, tmp_path, r, "overlaps parent a", out=a)
    expect_error(capsys, tmp_path, r, "overlaps parent a", out=a / "sub")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = run_cli(["merge", r, "-o", busy], capsys)
    assert code == 2 and "not empty" in err and "--force" in err
    code, err = run_cli(["merge", r, "-o", busy, "--force"], capsys)
    assert code == 0, err
    assert (busy / "notes.txt").read_text() == "mine" and (busy / "config.json").exists()
    assert tree_hash(a) == before


def test_nan_from_mix(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    sd2 = dict(sd)
    bad = "model.layers.0.post_attention_layernorm.weight"
    sd2[bad] = sd[bad].clone()
    sd2[bad][3] = float("inf")
    c = ckpt.write(tmp_path / "c", sd2, cfg, "fp8")
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "c": c}), bad, "NaN/Inf")
    assert not list((tmp_path / "out").glob(".*.partial"))


def test_unknown_tensor_needs_override(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    sd2 = dict(sd, **{"model.extra_thing.weight": torch.ones(4)})
    c = ckpt.write(tmp_path / "c", sd2, cfg, "fp8")
    d = ckpt.write(tmp_path / "d", dict(ckpt.perturb(sd, 5), **{"model.extra_thing.weight": torch.zeros(4)}), cfg, "fp8")
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"c": c, "d": d}), "model.extra_thing.weight", "override")
    r = _recipe(tmp_path, {"c": c, "d": d}, overrides=[{"match": "model.extra_*", "weights": {"d": 1.0}}])
    code, err = run_cli(["merge", r, "-o", tmp_path / "ok"], capsys)
    assert code == 0, err
    assert ckpt.load_float(tmp_path / "ok")["model.extra_thing.weight"].eq(0).all()


def test_missing_parent_and_pickle_only(tmp_path, capsys, pair):
    root, sd, cfg, a, b = pair
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "z": tmp_path / "nope"}), "nope", "not a model directory")
    p = tmp_path / "pk"
    p.mkdir()
    (p / "config.json").write_text((a / "config.json").read_text())
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "pk": p}), "pickle")


def test_real_process_exit_code(pair, tmp_path):
    root, sd, cfg, a, b = pair
    r = _recipe(tmp_path, {"a": a, "b": b}, {"default": {"a": 0.2}})
    p = subprocess.run([sys.executable, "-m", "chimera", "merge", str(r), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ") and "sum to 0.2" in p.stderr
