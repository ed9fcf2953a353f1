"""Live and persisted expert switches on real tiny models of every supported architecture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from chimera.errors import ChimeraError
from chimera.moe.capture import RoutingRecorder
from chimera.moe.routers import moe_layers
from chimera.moe.switch import OFF_BIAS, parse_experts, switched, tune_checkpoint
from moe_tiny import ARCHS, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return {a: tiny_model(a) for a in ARCHS}


def _ids(seed=1, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, T), generator=g)


def _route(model, ids):
    """Recorded {layer: (index, weights)} of one forward pass, and the logits."""
    with RoutingRecorder(model) as rec, torch.no_grad():
        logits = model(ids).logits
    return rec.take(), logits


def _busiest(model, ids, n=1):
    """The n most-selected (layer, expert) pairs on ids (so switching them is sure to matter)."""
    got, _ = _route(model, ids)
    out = []
    for L, (index, _) in got.items():
        c = torch.bincount(index.reshape(-1), minlength=moe_layers(model)[L].adapter.num_experts)
        out += [(int(c[e]), L, e) for e in range(len(c))]
    out.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(L, e) for _, L, e in out[:n]]


# ------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_reproduces_router_bit_for_bit(models, arch, dtype):
    model = models[arch] if dtype == torch.float32 else tiny_model(arch).to(dtype)
    layers = moe_layers(model)
    assert layers, "hook point moved: no router found by module type"
    outs = {}
    hs = [info.adapter.module.register_forward_hook(lambda m, i, o, L=L: outs.__setitem__(L, o))
          for L, info in layers.items()]
    with torch.no_grad():
        model(_ids())
    for h in hs:
        h.remove()
    for L, info in layers.items():
        logits, w, idx = outs[L]
        w2, idx2 = info.adapter.select(logits)
        assert torch.equal(idx, idx2) and torch.equal(w, w2) and w.dtype == w2.dtype, (arch, L)


# ------------------------------------------------------------------------------------------ switching
@pytest.mark.parametrize("arch", ARCHS)
def test_off_replace_never_selected_and_restore_exact(models, arch):
    model, ids = models[arch], _ids()
    base_routes, base_logits = _route(model, ids)
    off = _busiest(model, ids, 2)
    with switched(model, off=off, mode="replace"):
        got, logits = _route(model, ids)
    for L, (index, weights) in got.items():
        k = moe_layers(model)[L].adapter.top_k
        assert index.shape[1] == k
        assert all(len(set(r.tolist())) == k for r in index), "top-k experts must stay distinct"
        for Lo, e in off:
            if Lo == L:
                assert int((index == e).sum()) == 0, f"{arch}: switched-off expert {L}:{e} was selected"
    assert not torch.equal(logits, base_logits), "switching the busiest experts off must change the logits"
    # hooks removed exactly: bit-identical logits and routing
    after_routes, after_logits = _route(model, ids)
    assert torch.equal(after_logits, base_logits)
    for L in base_routes:
        assert torch.equal(after_routes[L][0], base_routes[L][0])
    assert all(not info.adapter.module._forward_hooks for info in moe_layers(model).values())


@pytest.mark.parametrize("arch", ARCHS)
def test_force_always_selected(models, arch):
    model, ids = models[arch], _ids()
    base, _ = _route(model, ids)
    L = next(iter(base))
    counts = torch.bincount(base[L][0].reshape(-1), minlength=moe_layers(model)[L].adapter.num_experts)
    e = int(counts.argmin())  # the least-chosen expert
    assert int((base[L][0] == e).any(dim=1).sum()) < ids.numel()
    logits = []  # registered before the switch: the router's own logits (layer L's input is unchanged)
    h = moe_layers(model)[L].adapter.module.register_forward_hook(lambda m, i, o: logits.append(o[0].detach()))
    try:
        with switched(model, on=[(L, e)]):
            got, _ = _route(model, ids)
    finally:
        h.remove()
    index, weights = got[L]
    assert bool((index == e).any(dim=1).all()), f"{arch}: forced expert {L}:{e} not selected on every token"
    # every weight (the forced expert's too) is its own unbiased score, normalised like any selection:
    # float64 reference from the config's routing rule on the recorded logits
    cfg, x = model.config, logits[0].double()
    if arch == "deepseek_v3":
        w = x.sigmoid().gather(1, index)
        if cfg.norm_topk_prob:
            w = w / (w.sum(1, keepdim=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
    else:
        w = x.softmax(-1).gather(1, index)
        if arch == "mixtral" or cfg.norm_topk_prob:
            w = w / w.sum(1, keepdim=True)
    assert torch.allclose(weights.double(), w, rtol=1e-5, atol=1e-7), arch
    assert float(w[index == e].min()) < float(w.max())  # the forced expert is not simply the top one


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_keeps_selection_and_renormalizes(models, arch):
    model, ids = models[arch], _ids()
    base, _ = _route(model, ids)
    (L, e), = _busiest(model, ids, 1)
    with switched(model, off=[(L, e)], mode="drop"):
        got, _ = _route(model, ids)
    for Lx in base:  # later layers see changed hidden states; up to L the selection is unchanged
        if Lx <= L:
            assert torch.equal(got[Lx][0], base[Lx][0]), "drop must not change the selection"
    index, w = got[L]
    bw = base[L][1]
    hit = (index == e).any(dim=1)
    assert bool(hit.any())
    assert float(w[index == e].abs().max()) == 0.0
    assert torch.allclose(w.sum(1), bw.sum(1), rtol=1e-5, atol=1e-6)  # rescaled to the original total
    rest = (index != e)
    ratio = w[hit] / bw[hit]  # every kept weight scaled by the same factor per token
    r = torch.where(rest[hit], ratio, torch.nan)
    assert torch.allclose(torch.nanmean(r, 1, keepdim=True).expand_as(r)[rest[hit]], r[rest[hit]], rtol=1e-5)
    assert torch.equal(w[~hit], bw[~hit])


def test_deepseek_group_selection_respected(models):
    model, ids = models["deepseek_v3"], _ids(B=4, T=16)
    cfg = model.config
    per = cfg.n_routed_experts // cfg.n_group
    off = _busiest(model, ids, 3)
    L_force = moe_layers(model).__iter__().__next__()
    on = [(L_force, e) for e in range(cfg.n_routed_experts) if (L_force, e) not in off][:1]
    with switched(model, off=off, on=on):
        got, _ = _route(model, ids)
    for L, (index, _) in got.items():
        groups = index // per
        n_groups = torch.tensor([len(set(r.tolist())) for r in groups])
        assert int(n_groups.max()) <= cfg.topk_group, "selection left the topk_group groups"
    # reference: the router's own code with the bias moved (-inf off, +inf forced) selects the same experts
    routers = {L: info.adapter.module for L, info in moe_layers(model).items()}
    saved = {L: r.e_score_correction_bias.clone() for L, r in routers.items()}
    try:
        for L, e in off:
            routers[L].e_score_correction_bias[e] = float("-inf")
        routers[L_force].e_score_correction_bias[on[0][1]] = float("inf")
        ref, _ = _route(model, ids)
    finally:
        for L, r in routers.items():
            r.e_score_correction_bias.copy_(saved[L])
    for L in got:
        a = torch.sort(got[L][0], dim=1).values
        b = torch.sort(ref[L][0], dim=1).values
        assert torch.equal(a, b)


def test_switch_during_generation(models):
    model = models["qwen3_moe"]
    ids = _ids(B=2, T=6)
    (L, e), = _busiest(model, ids, 1)
    with switched(model, off=[(L, e)]), RoutingRecorder(model) as rec, torch.no_grad():
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    index, _ = rec.take()[L]
    assert index.shape[0] > ids.numel()  # prefill and decode steps were both routed
    assert int((index == e).sum()) == 0


# ------------------------------------------------------------------------------------------ persisted
def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)


def test_tune_persisted_equals_live_and_touches_only_bias_bytes(models, tmp_path):
    model = models["deepseek_v3"]
    src, dst = tmp_path / "src", tmp_path / "out" / "tuned"
    _save(model, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    ids = _ids(B=2, T=10)
    off = _busiest(model, ids, 3)
    rec = tune_checkpoint(src, dst, off=off)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before, "input directory modified"
    # only the bias values of the switched-off experts differ, byte for byte
    files_after = {p.name for p in dst.iterdir()}
    assert files_after == set(before) | {"chimera-tune.json"}
    from safetensors import safe_open

    for name, data in before.items():
        new = (dst / name).read_bytes()
        assert len(new) == len(data)
        if name.endswith(".safetensors"):
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            allowed = set()
            for L, e in off:
                s0, _ = header[f"model.layers.{L}.mlp.gate.e_score_correction_bias"]["data_offsets"]
                allowed |= set(range(8 + n + s0 + 4 * e, 8 + n + s0 + 4 * e + 4))
            diff = {i for i, (a, b) in enumerate(zip(data, new)) if a != b}
            assert diff and diff <= allowed
            with safe_open(dst / name, "pt") as f:
                for L, e in off:
                    assert float(f.get_tensor(f"model.layers.{L}.mlp.gate.e_score_correction_bias")[e]) == OFF_BIAS
        else:
            assert new == data
    assert rec["n_off"] == len(off)
    tuned = tf.AutoModelForCausalLM.from_pretrained(dst).eval()
    live = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        base = live(ids).logits
        with switched(live, off=off):
            want = live(ids).logits
        got = tuned(ids).logits
    assert not torch.equal(want, base)
    assert torch.equal(got, want), (got - want).abs().max()
    with RoutingRecorder(tuned) as r, torch.no_grad():
        tuned(ids)
    for L, (index, _) in r.take().items():
        assert all(int((index == e).sum()) == 0 for Lo, e in off if Lo == L)
    with pytest.raises(ChimeraError, match="already exists"):
        tune_checkpoint(src, dst, off=off)


def test_tune_force_on_equals_live(models, tmp_path):
    model = models["deepseek_v3"]
    _save(model, tmp_path / "src")
    ids = _ids(B=2, T=8)
    on = [(2, 0), (2, 1)]  # same group: always kept
    tune_checkpoint(tmp_path / "src", tmp_path / "dst", off=[(1, 3)], on=on)
    tuned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    with torch.no_grad(), switched(model, off=[(1, 3)], on=on):
        want = model(ids).logits
    with torch.no_grad():
        assert torch.equal(tuned(ids).logits, want)


def test_tune_refuses_routers_without_bias(tmp_path):
    _save(tiny_model("mixtral"), tmp_path / "mix")
    with pytest.raises(ChimeraError, match="not possible for mixtral"):
        tune_checkpoint(tmp_path / "mix", tmp_path / "o", off=[(0, 1)])
    assert not (tmp_path / "o").exists()
    _save(tiny_model("deepseek_v3"), tmp_path / "ds")
    with pytest.raises(ChimeraError, match="can't be persisted"):
        tune_checkpoint(tmp_path / "ds", tmp_path / "o", off=[(1, 1)], mode="drop")
    with pytest.raises(ChimeraError, match="not an MoE layer"):
        tune_checkpoint(tmp_path / "ds", tmp_path / "o", off=[(0, 1)])
    llama = tmp_path / "llama"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2)).save_pretrained(llama)
    with pytest.raises(ChimeraError, match="unknown architecture"):
        tune_checkpoint(llama, tmp_path / "o", off=[(0, 1)])
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


# ------------------------------------------------------------------------------------------ bad input
def test_parse_experts(tmp_path):
    assert parse_experts("12:7, 14:3") == [(12, 7), (14, 3)]
    assert parse_experts("") == []
    assert parse_experts([(1, 2), "3:4"]) == [(1, 2), (3, 4)]
    f = tmp_path / "ftri.json"
    f.write_text(json.dumps({"top": [{"layer": 2, "expert": 5}], "ranking": [[2, 5, 0.3], [1, 0, 0.2], [2, 1, 0.1]]}))
    assert parse_experts(f"@{f}:2") == [(2, 5), (1, 0)]
    assert parse_experts(f"@{f}") == [(2, 5)]
    assert parse_experts(f"@{f}:1,7:7") == [(2, 5), (7, 7)]
    for bad in ("12", "a:b", "1:2:3"):
        with pytest.raises(ChimeraError, match="bad expert"):
            parse_experts(bad)
    with pytest.raises(ChimeraError, match="ranks only 3"):
        parse_experts(f"@{f}:10")
    with pytest.raises(ChimeraError, match="not found"):
        parse_experts(f"@{tmp_path}/none.json:3")


def test_bad_switches_are_one_line_errors(models):
    ds = models["deepseek_v3"]
    cases = [
        (dict(off=[(7, 0)]), "layer 7 out of range"),
        (dict(off=[(-1, 0)]), "out of range"),
        (dict(off=[(0, 0)]), "layer 0 is not an MoE layer"),
        (dict(off=[(1, 16)]), "expert 16 out of range"),
        (dict(on=[(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]), "forced on"),
        (dict(on=[(1, 0), (1, 4), (1, 8)]), "groups"),
        (dict(off=[(1, 0)], on=[(1, 0)]), "both"),
        (dict(off=[(1, 0)], mode="zap"), "unknown switch mode"),
    ]
    for kw, msg in cases:
        with pytest.raises(ChimeraError, match=msg) as ei:
            with switched(ds, **kw):
                pass
        assert "\n" not in str(ei.value)
    assert all(not info.adapter.module._forward_hooks for info in moe_layers(ds).values())
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ChimeraError, match="unknown architecture"):
        with switched(dense, off=[(0, 0)]):
            pass


def test_cli_tune_errors_are_one_line(tmp_path):
    _save(tiny_model("mixtral"), tmp_path / "mix")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "chimera", "tune", str(tmp_path / "mix"), "--off", "0:1",
                        "-o", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not possible for mixtral" in lines[0]
