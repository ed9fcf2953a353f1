"""Assembly-of-Experts merges on real safetensors checkpoints written by the tests."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import ckpt
from ckpt import recipe, sha_dir
from chimera.checkpoint.arch import classify
from chimera.merge import build_plan, merge
from chimera.merge.recipe import load
from chimera.merge.report import plan_report

SCALE = ".weight_scale_inv"


def r1t(a: Path, b: Path, **extra) -> dict:
    d = {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
         "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}},
         "output": {"dtype": "keep", "shard_size": "300KB"}}
    d.update(extra)
    return d


def test_r1t_selection_is_byte_exact(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    before = sha_dir(a), sha_dir(b)
    res = merge(recipe(tmp_path, r1t(a, b)), tmp_path / "child")
    out = tmp_path / "child"
    got, pa, pb = ckpt.raw(out), ckpt.raw(a), ckpt.raw(b)
    cfg = json.loads((a / "config.json").read_text())
    assert set(got) == set(pa)
    n_routed = 0
    for name, data in got.items():
        logical = name[: -len(SCALE)] + ".weight" if name.endswith(SCALE) else name
        routed = classify(logical, cfg) == "routed_experts"
        n_routed += routed
        assert data == (pb if routed else pa)[name], name
    assert n_routed > 0 and any(".layers.3." in k and "experts" in k for k in got)  # MTP experts too
    # index complete and consistent
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(len(v) for v in got.values())
    assert res.shards == len(set(index["weight_map"].values())) > 1
    # config, side files, card
    assert json.loads((out / "config.json").read_text()) == cfg
    assert (out / "tokenizer_config.json").read_bytes() == (a / "tokenizer_config.json").read_bytes()
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == [a.name, b.name] and meta["base_model_relation"] == "merge"
    assert str(a.parent) not in card  # parents by name, never a local path
    assert yaml.safe_load((out / "chimera_recipe.yaml").read_text())["base"] == "v3"
    assert (sha_dir(a), sha_dir(b)) == before  # parents untouched


def test_fractional_fp8_mix_matches_float64_reference(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    lam = 0.3
    d = {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
         "weights": {"default": {"v3": 1 - lam, "r1": lam}}, "output": {"shard_size": "1GB"}}
    merge(recipe(tmp_path, d), tmp_path / "child")
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    got_raw = {}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "child" / "model.safetensors"), "pt") as h:
        got_raw = {k: h.get_tensor(k) for k in h.keys()}
    checked = 0
    for name, q in got_raw.items():
        if name.endswith(SCALE):
            continue
        ref = (1 - lam) * fa[name] + lam * fb[name]                      # float64 reference mix
        if q.dtype == torch.float8_e4m3fn:
            s = got_raw[name[: -len(".weight")] + SCALE]
            deq = ckpt.dequant_ref(q, s)
            for bi in range(s.shape[0]):
                for bj in range(s.shape[1]):
                    r, c = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
                    blk_ref, blk = ref[r, c], deq[r, c]
                    sc = max(float(blk_ref.abs().max()), 1e-4) / 448
                    assert abs(float(s[bi, bj]) - sc) <= sc * 1e-5, name
                    assert torch.all((blk - blk_ref).abs() <= blk_ref.abs() * 2**-4 + sc * 2**-9 + 1e-6), (name, bi, bj)
            checked += 1
        else:  # bf16 / f32 tensors: float32 mix cast to the stored dtype
            assert torch.allclose(q.double(), ref, rtol=2**-8, atol=1e-6), name
    assert checked > 20


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(ids).logits


def test_bf16_merge_loads_and_matches_in_memory_mix(tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    sd, cfg = ckpt.ds_state(3, mtp=True)
    sd2 = ckpt.perturb(sd, 4, scale=0.3)
    a = ckpt.write(tmp_path / "a", sd, cfg, "bf16")
    b = ckpt.write(tmp_path / "b", sd2, cfg, "bf16")
    d = {"parents": {"a": str(a), "b": str(b)}, "base": "a",
         "weights": {"default": {"a": 0.75, "b": 0.25}, "routed_experts": {"a": 0.4, "b": 0.6}, "router": {"b": 1.0}},
         "output": {"dtype": "bfloat16"}}
    merge(recipe(tmp_path, d), tmp_path / "child")
    # in-memory reference: load both parents, mix state dicts in float32, cast to bf16 like the files
    pa = AutoModelForCausalLM.from_pretrained(str(a), dtype=torch.float32).state_dict()
    pb = AutoModelForCausalLM.from_pretrained(str(b), dtype=torch.float32).state_dict()
    ref = AutoModelForCausalLM.from_config(DeepseekV3Config.from_pretrained(str(a)), dtype=torch.float32)
    mixed = {}
    for k in pa:  # in-memory names are fused (experts.gate_up_proj [E, 2I, H]); lambdas by class
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            la, lb = 0.4, 0.6
        elif ".mlp.gate." in k:
            la, lb = 0.0, 1.0
        else:
            la, lb = 0.75, 0.25
        mixed[k] = (la * pa[k] + lb * pb[k]).to(torch.bfloat16).to(torch.float32)
    ref.load_state_dict(mixed)
    ref.eval()
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    got = _hf_logits(tmp_path / "child", ids)
    # The float32 mix may round differently from the reference's op order (fused multiply-add), so
    # a few bf16 weights differ by one ulp; the forward passes then agree to ~1e-4 (logits ~O(1)).
    child = AutoModelForCausalLM.from_pretrained(str(tmp_path / "child"), dtype=torch.float32).state_dict()
    same = sum(int((child[k] == mixed[k]).sum()) for k in mixed)
    total = sum(v.numel() for v in mixed.values())
    assert same / total > 0.999
    for k in mixed:  # at most one bf16 ulp apart (2^-7 relative), or float32 cancellation noise near 0
        assert torch.allclose(child[k], mixed[k], rtol=2**-7, atol=1e-7), k
    assert torch.allclose(got, want, atol=1e-3, rtol=0), float((got - want).abs().max())


def test_r1t_fp8_child_converts_and_loads(ds_pair, tmp_path):
    """FP8 child -> our exact bf16 conversion -> transformers loads it, logits match the parents' mix."""
    a, b, *_ = ds_pair
    merge(recipe(tmp_path, r1t(a, b)), tmp_path / "child")
    from chimera.merge.convert import convert

    convert(tmp_path / "child", tmp_path / "child-bf16", "bfloat16")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "child-bf16"))
    assert m.config.model_type == "deepseek_v3" and getattr(m.config, "quantization_config", None) is None
    fb = ckpt.load_float(b)
    k = "model.layers.1.mlp.experts.3.up_proj.weight"
    got = ckpt.load_float(tmp_path / "child-bf16")[k]
    assert torch.allclose(got, fb[k], rtol=2**-8, atol=0)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()


def test_threshold_merges_only_distant_tensors(tmp_path):
    sd, cfg = ckpt.ds_state(5, mtp=False)
    sd2 = ckpt.perturb(sd, 6, scale=0.5, only="mlp.experts.")   # only routed experts differ much
    sd2 = ckpt.perturb(sd2, 7, scale=0.001)                      # everything else differs a little
    a = ckpt.write(tmp_path / "a", sd, cfg, "fp8")
    b = ckpt.write(tmp_path / "b", sd2, cfg, "fp8")
    d = {"parents": {"a": str(a), "b": str(b)}, "base": "a", "weights": {"default": {"a": 0.5, "b": 0.5}},
         "threshold": {"delta": 0.1, "metric": "relative"}}
    rp = recipe(tmp_path, d)
    plan = build_plan(load(rp))
    rep = plan_report(plan, with_distances=True)
    experts = [n for n in ckpt.raw(a) if ".mlp.experts." in n and not n.endswith(SCALE)]
    assert rep["threshold"]["merged"] == len(experts)
    assert rep["threshold"]["from_base"] == len(plan.items) - len(experts)
    res = merge(rp, tmp_path / "child")
    got, pa = ckpt.raw(tmp_path / "child"), ckpt.raw(a)
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    for name, rec in res.records.items():
        dist = rec["distance"]
        if name in experts:
            assert rec["op"] == "mix" and dist >= 0.1
            assert got[name] != pa[name]
        else:
            assert rec["op"] == "base" and dist < 0.1
            assert got[name] == pa[name], name
            if name[: -len(".weight")] + SCALE in pa:
                assert got[name[: -len(".weight")] + SCALE] == pa[name[: -len(".weight")] + SCALE]
        # recorded distance is the relative Frobenius distance of the dequantized tensors
        want = float((fb[name] - fa[name]).norm() / fa[name].norm())
        assert abs(dist - want) <= 1e-6 * max(want, 1e-3)
    report = json.loads((tmp_path / "child" / "chimera_merge.json").read_text())
    assert report["summary"]["ops"] == {"mix": len(experts), "base": len(plan.items) - len(experts)}


@pytest.mark.parametrize("metric", ["relative", "symmetric", "rms"])
def test_distance_metrics_against_formula(metric):
    from chimera.merge.distance import distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 53, generator=g), torch.randn(37, 53, generator=g)
    a64, b64 = a.double(), b.double()
    want = {"relative": (a64 - b64).norm() / b64.norm(),
            "symmetric": 2 * (a64 - b64).norm() / (a64.norm() + b64.norm()),
            "rms": (a64 - b64).norm() / (a.numel() ** 0.5)}[metric]
    assert abs(distance(a, b, metric) - float(want)) < 1e-12
    assert distance(a, a, metric) == 0.0


def test_three_parents(tmp_path):
    sd, cfg = ckpt.ds_state(8, mtp=True)
    parents = {"x": sd, "y": ckpt.perturb(sd, 9, 0.3), "z": ckpt.perturb(sd, 10, 0.3)}
    paths = {n: ckpt.write(tmp_path / n, s, cfg, "bf16") for n, s in parents.items()}
    lams = {"x": 0.5, "y": 0.3, "z": 0.2}
    d = {"parents": {n: str(p) for n, p in paths.items()}, "base": "x",
         "weights": {"default": {"x": 1.0}, "routed_experts": lams, "attention": {"z": 1.0}},
         "output": {"dtype": "float32"}}
    merge(recipe(tmp_path, d), tmp_path / "child")
    got = ckpt.load_float(tmp_path / "child")
    f = {n: ckpt.load_float(p) for n, p in paths.items()}
    for name, t in got.items():
        cls = classify(name, cfg)
        if cls == "routed_experts":
            ref = sum(lam * f[n][name] for n, lam in lams.items())
            assert torch.allclose(t, ref, rtol=1e-6, atol=1e-7), name
        elif cls == "attention":
            assert torch.equal(t, f["z"][name])
        else:
            assert torch.equal(t, f["x"][name])


def test_same_recipe_same_bytes(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    d = {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
         "weights": {"default": {"v3": 1.0}, "routed_experts": {"v3": 0.5, "r1": 0.5}}, "output": {"shard_size": "400KB"}}
    rp = recipe(tmp_path, d)
    merge(rp, tmp_path / "o1", workers=2)
    merge(rp, tmp_path / "o2", workers=1)
    assert sha_dir(tmp_path / "o1") == sha_dir(tmp_path / "o2")


KILLER = """
import os, signal, sys
from chimera.merge import build_plan, load, run_merge
plan = build_plan(load(sys.argv[1]))
seen = [0]
def on_bytes(n):
    seen[0] += n
    if seen[0] > int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
run_merge(plan, sys.argv[2], workers=1, on_bytes=on_bytes)
"""


def test_resume_after_kill9_is_byte_identical(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    d = {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
         "weights": {"default": {"v3": 0.7, "r1": 0.3}}, "output": {"shard_size": "300KB"}}
    rp = recipe(tmp_path, d)
    merge(rp, tmp_path / "ref")
    total = sum(p.stat().st_size for p in (tmp_path / "ref").glob("*.safetensors"))
    p = subprocess.run([sys.executable, "-c", KILLER, str(rp), str(tmp_path / "out"), str(total // 2)])
    assert p.returncode == -9
    out = tmp_path / "out"
    assert not (out / "config.json").exists()           # a killed merge does not look complete
    done = json.loads((out / ".chimera" / "progress.json").read_text())["done"]
    assert 0 < len(done) < len(build_plan(load(rp)).jobs)
    with pytest.raises(Exception, match="not empty"):
        merge(rp, out)
    res = merge(rp, out, resume=True)
    assert 0 < res.written < res.shards
    assert not list(out.glob(".*.partial"))
    ref, got = sha_dir(tmp_path / "ref"), sha_dir(out)
    assert ref == got
    assert not (out / ".chimera").exists()               # state removed once complete
    assert merge(rp, out, resume=True).written == 0      # resuming a complete output is a no-op
    assert sha_dir(out) == ref


def test_mergekit_linear_yaml(tmp_path):
    sd, cfg = ckpt.ds_state(11, mtp=False)
    a = ckpt.write(tmp_path / "m1", sd, cfg, "f32")
    b = ckpt.write(tmp_path / "m2", ckpt.perturb(sd, 12), cfg, "f32")
    mk = {"models": [{"model": str(a), "parameters": {"weight": 3.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
          "merge_method": "linear", "dtype": "float32"}
    r = load(recipe(tmp_path, mk))
    assert r.weights["default"] == {"m1": 0.75, "m2": 0.25} and r.base == "m1"
    merge(r, tmp_path / "child")
    got, fa, fb = ckpt.load_float(tmp_path / "child"), ckpt.load_float(a), ckpt.load_float(b)
    for k in got:
        assert torch.allclose(got[k], 0.75 * fa[k] + 0.25 * fb[k], rtol=1e-6, atol=1e-7), k


def test_plan_writes_nothing_and_counts(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    rp = recipe(tmp_path, r1t(a, b))
    p = subprocess.run([sys.executable, "-m", "chimera", "plan", str(rp)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "routed_experts" in p.stdout and "copy" in p.stdout and "r1=1" in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["recipe.yaml"]


def test_diff_cli_csv(ds_pair, tmp_path):
    a, b, sd, sd2, cfg = ds_pair
    p = subprocess.run([sys.executable, "-m", "chimera", "diff", str(b), str(a), "--csv", str(tmp_path / "d.csv"),
                        "--plot", str(tmp_path / "d.png")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import csv

    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    assert len(rows) == len(fa)
    for r in rows[:20]:
        n = r["tensor"]
        assert abs(float(r["distance"]) - float((fb[n] - fa[n]).norm() / fa[n].norm())) < 1e-5
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_plan_distances_without_threshold(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    d = {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3", "weights": {"default": {"v3": 0.5, "r1": 0.5}}}
    plan = build_plan(load(recipe(tmp_path, d)))
    rep = plan_report(plan, with_distances=True, metric="symmetric")
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    n = "model.layers.1.mlp.experts.2.down_proj.weight"
    want = float(2 * (fb[n] - fa[n]).norm() / (fa[n].norm() + fb[n].norm()))
    assert abs(rep["distances"][n] - want) < 1e-6 and "threshold" not in rep
    assert len(rep["distances"]) == len(plan.items)
