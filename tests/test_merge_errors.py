"""Bad input: a one-line error naming the file or tensor, exit status 2, nothing that looks complete."""
import hashlib
import json
import os
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


# ------------------------------------------------------------------ headers, as strict as the safetensors library

def _copy_parent(a: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in a.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _first_two(h: dict) -> tuple[str, str]:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(h: dict) -> dict:
    x, y = _first_two(h)
    h[y]["data_offsets"] = [h[x]["data_offsets"][0], h[x]["data_offsets"][0] + (h[y]["data_offsets"][1] - h[y]["data_offsets"][0])]
    return h


def _negative(h: dict) -> dict:
    x = next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)
    h[x]["shape"] = [-h[x]["shape"][0], -h[x]["shape"][1]]  # same numel: only the sign is wrong
    return h


def _wrong_size(h: dict) -> dict:
    x = next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)
    h[x]["shape"] = [h[x]["shape"][0] + 1, h[x]["shape"][1]]
    return h


def _unknown_dtype(h: dict) -> dict:
    x = next(k for k in h if k != "__metadata__")
    h[x]["dtype"] = "Q7"
    return h


def _gap(h: dict) -> dict:
    x, _ = _first_two(h)
    del h[x]  # its bytes now belong to no tensor
    return h


@pytest.mark.parametrize("edit", [
    lambda h: [h],                 # a JSON array, not an object
    _overlap,                      # two tensors over the same bytes
    _negative,                     # negative dims (numel unchanged)
    _wrong_size,                   # byte length != numel x itemsize
    _unknown_dtype,
    _gap,                          # bytes between tensors that belong to none
], ids=["array", "overlap", "negative-dims", "wrong-size", "unknown-dtype", "gap"])
def test_malformed_header_refused_at_plan_time(pair, tmp_path, capsys, edit):
    root, sd, cfg, a, b = pair
    c = _copy_parent(a, tmp_path / "c")
    ckpt.rewrite_header(c / "model.safetensors", edit)
    before = tree_hash(c)
    r = _recipe(tmp_path, {"a": a, "c": c})
    code, err = run_cli(["plan", r], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert str(c / "model.safetensors") in err
    expect_error(capsys, tmp_path, r, str(c / "model.safetensors"))
    assert not (tmp_path / "out").exists()  # refused before anything is written
    assert tree_hash(c) == before


def _save_with(a: Path, dst: Path, change) -> Path:
    from safetensors import safe_open

    dst.mkdir()
    (dst / "config.json").write_text((a / "config.json").read_text())
    with safe_open(str(a / "model.safetensors"), "pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
    change(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind", ["bf16-scale", "transposed-grid", "scale-of-bf16-weight"])
def test_bad_fp8_scales_refused(pair, tmp_path, capsys, kind):
    root, sd, cfg, a, b = pair
    w = "model.layers.0.self_attn.o_proj.weight"            # [200, 128]: a 2 x 1 scale grid
    s = w[: -len(".weight")] + ".weight_scale_inv"
    if kind == "bf16-scale":
        change = lambda t: t.__setitem__(s, t[s].to(torch.bfloat16))  # noqa: E731
    elif kind == "transposed-grid":
        change = lambda t: t.__setitem__(s, t[s].t().contiguous())  # noqa: E731
    else:
        w, s = "model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight_scale_inv"
        change = lambda t: t.__setitem__(s, torch.ones(1, 2))  # noqa: E731
    c = _save_with(a, tmp_path / "c", change)
    err = expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "c": c}), str(c / "model.safetensors"), s)
    assert {"bf16-scale": "float32", "transposed-grid": "expected [2, 1]", "scale-of-bf16-weight": "not FP8"}[kind] in err


# ------------------------------------------------------------------ parents must agree on what a merge assumes

def test_quantization_and_routing_must_agree(pair, tmp_path, capsys):
    root, sd, cfg, a, b = pair
    ue = ckpt.write(tmp_path / "ue", ckpt.perturb(sd, 22), cfg, "fp8", ue8m0=True)
    err = expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "ue": ue}), "quantization_config.scale_fmt",
                       "use_base_config")
    assert "ue8m0" in err
    topk = dict(cfg, num_experts_per_tok=3, scoring_func="softmax")
    k = ckpt.write(tmp_path / "k", ckpt.perturb(sd, 23), topk, "fp8")
    err = expect_error(capsys, tmp_path, _recipe(tmp_path, {"a": a, "k": k}), "num_experts_per_tok", "scoring_func")
    # resolved by the recipe: the child has the base's routing, stated in the record and the card
    r = _recipe(tmp_path, {"a": a, "k": k}, use_base_config=["num_experts_per_tok", "scoring_func"])
    code, err = run_cli(["merge", r, "-o", tmp_path / "ok"], capsys)
    assert code == 0, err
    child = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert child["num_experts_per_tok"] == cfg["num_experts_per_tok"] and child.get("scoring_func") == cfg.get("scoring_func")
    rec = json.loads((tmp_path / "ok" / "chimera_merge.json").read_text())
    assert rec["config_from_base"]["num_experts_per_tok"] == {"a": cfg["num_experts_per_tok"], "k": 3}
    assert "num_experts_per_tok" in (tmp_path / "ok" / "README.md").read_text()


# ------------------------------------------------------------------ OS errors

def test_os_errors_are_one_line(pair, tmp_path):
    """A write the kernel refuses (RLIMIT_FSIZE: EFBIG) and an output under a regular file (ENOTDIR)."""
    import resource

    root, sd, cfg, a, b = pair
    r = _recipe(tmp_path, {"a": a, "b": b})

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    p = subprocess.run([sys.executable, "-m", "chimera", "merge", str(r), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, preexec_fn=small_files)
    assert p.returncode != 0
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(tmp_path / "o" / "model.safetensors") in err and "File too large" in err
    assert not (tmp_path / "o" / "config.json").exists() and not list((tmp_path / "o").glob("*.safetensors"))
    assert not list((tmp_path / "o").glob(".*.partial"))
    (tmp_path / "file").write_text("x")
    p = subprocess.run([sys.executable, "-m", "chimera", "merge", str(r), "-o", str(tmp_path / "file" / "o")],
                       capture_output=True, text=True)
    err = p.stderr.strip()
    assert p.returncode != 0 and err.startswith("error: ") and "\n" not in err, err
    assert str(tmp_path / "file") in err
    p = subprocess.run([sys.executable, "-m", "chimera", "merge", str(r), "-o", str(tmp_path / "file" / "o")],
                       capture_output=True, text=True, env={**os.environ, "CHIMERA_DEBUG": "1"})
    assert "Traceback" in p.stderr
