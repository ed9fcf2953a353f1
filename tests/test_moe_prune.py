"""Expert pruning on real checkpoints: files written by transformers' own save_pretrained for every supported
architecture, a sharded FP8 DeepSeek-V3 checkpoint with an MTP layer, and the bundled tiny-r1; REAP saliency
against an independent float64 reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import ckpt
from bundled import N_EXPERTS, N_GROUPS
from chimera.checkpoint.files import Checkpoint
from chimera.errors import ChimeraError
from chimera.moe.capture import RoutingRecorder, record_routes
from chimera.moe.prune import keep_from_drop, prune_checkpoint, read_layout, select_keep
from chimera.moe.routers import moe_layers
from chimera.moe.switch import switched
from moe_tiny import tiny_model

#: the architectures pruning is tested on (prune has no architecture code of its own: `chimera.checkpoint.arch`)
ARCHS = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

ROOT = Path(__file__).resolve().parents[1]


def _ids(B=2, T=10, seed=1):
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _keep_half(model, n_group=1):
    layers = moe_layers(model)
    E = next(iter(layers.values())).adapter.num_experts
    g = torch.Generator().manual_seed(7)
    return select_keep({L: torch.rand(E, generator=g).numpy() for L in layers}, E // 2, n_group)


# ------------------------------------------------------------------------------------------ every architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_checkpoint_equals_the_masked_model(arch, tmp_path):
    """Removing experts D gives the model that routes around D (a replace-off switch): exactly the same logits
    where the router renormalises its top-k (DeepSeek, Mixtral, Qwen3-MoE); where it doesn't (Qwen2-MoE and OLMoE
    with norm_topk_prob=False) the same experts are chosen and only the softmax over fewer experts differs."""
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "src")
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    cfg = model.config
    keep = _keep_half(model, getattr(cfg, "n_group", 1) or 1)
    dropped = [(L, e) for L, v in keep.items() for e in range(len(v) * 2) if e not in v]
    s = prune_checkpoint(tmp_path / "src", tmp_path / "out", keep)
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before, "input modified"
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    E2 = s["n_experts_after"]
    assert all(info.adapter.num_experts == E2 for info in moe_layers(pruned).values())
    ids = _ids()
    with torch.no_grad(), switched(model, off=dropped), RoutingRecorder(model) as rec_m:
        want = model(ids).logits
    with torch.no_grad(), RoutingRecorder(pruned) as rec_p:
        got = pruned(ids).logits
    routes_m, routes_p = rec_m.take(), rec_p.take()
    for L, v in keep.items():  # the pruned model picks the same experts, renumbered
        old = torch.as_tensor(v)[routes_p[L][0]]
        assert torch.equal(torch.sort(old, 1).values, torch.sort(routes_m[L][0], 1).values), (arch, L)
    if getattr(cfg, "norm_topk_prob", True) or arch == "mixtral":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(got, want)
    out = pruned.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_group_limited_routing_kept_or_switched_off(tmp_path):
    model = tiny_model("deepseek_v3")  # 16 experts, n_group 4, topk_group 2, top_k 4
    model.save_pretrained(tmp_path / "src")
    layout = read_layout(Checkpoint(tmp_path / "src"))
    s = prune_checkpoint(tmp_path / "src", tmp_path / "even", keep_from_drop([(L, e) for L in (1, 2) for e in
                                                                               (0, 4, 8, 12)], layout))
    cfg = json.loads((tmp_path / "even" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]) == (12, 4, 2)
    assert "kept" in s["notes"][0]
    s = prune_checkpoint(tmp_path / "src", tmp_path / "uneven", keep_from_drop([(1, 0), (1, 1), (2, 5), (2, 6)],
                                                                               layout))
    cfg = json.loads((tmp_path / "uneven" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]) == (14, 1, 1)
    assert "switched off" in s["notes"][0]
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "uneven")(_ids())
    with pytest.raises(ChimeraError, match="multiple of n_group"):
        select_keep({1: np.arange(16.0)}, 6, 4)


# ------------------------------------------------------------------------------------------ FP8, shards, MTP
def test_fp8_sharded_checkpoint_bytes_and_mtp(ds_pair, tmp_path):
    """FP8 experts and their block scales travel as stored bytes (renamed), routers lose exactly the dropped
    rows, shards and index stay consistent, and the MTP layer is either removed or pruned explicitly."""
    src = ds_pair[0]  # 3 shards, scales in another shard than their weights, MTP layer 3, 8 experts, 2 groups
    layout = read_layout(Checkpoint(src))
    assert layout.mtp == [3] and layout.experts == {1: 8, 2: 8, 3: 8}
    keep = {1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}
    with pytest.raises(ChimeraError, match="MTP layer"):
        prune_checkpoint(src, tmp_path / "x", keep)
    assert not (tmp_path / "x").exists()
    prune_checkpoint(src, tmp_path / "out", keep, drop_mtp=True)
    a, b = ckpt.raw(src), ckpt.raw(tmp_path / "out")
    for L, v in keep.items():
        for new, old in enumerate(v):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight", "weight_scale_inv"):
                    n_new = f"model.layers.{L}.mlp.experts.{new}.{proj}.{suffix}"
                    assert b[n_new] == a[f"model.layers.{L}.mlp.experts.{old}.{proj}.{suffix}"], n_new
        ck_a, ck_b = Checkpoint(src), Checkpoint(tmp_path / "out")
        for t in ("weight", "e_score_correction_bias"):
            name = f"model.layers.{L}.mlp.gate.{t}"
            from chimera.checkpoint.files import read_tensor
            ra, rb = read_tensor(ck_a.tensors[name]), read_tensor(ck_b.tensors[name])
            assert torch.equal(rb, ra[v]) and rb.dtype == ra.dtype
    assert not any(k.startswith("model.layers.3.") for k in b), "MTP layer must be gone"
    assert not any(".experts.4." in k for k in b)
    untouched = [k for k in a if ".mlp.experts." not in k and ".mlp.gate." not in k and not k.startswith("model.layers.3.")]
    assert untouched and all(a[k] == b[k] for k in untouched)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["num_nextn_predict_layers"]) == (4, 2, 0)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(b) and len(set(index.values())) == 3
    assert Checkpoint(tmp_path / "out").logical()  # every FP8 weight still has its scale
    # an explicit MTP prune keeps the layer, with the same count
    prune_checkpoint(src, tmp_path / "mtp", keep_from_drop([(L, e) for L in (1, 2, 3) for e in (0, 7)], layout))
    c = ckpt.raw(tmp_path / "mtp")
    assert c["model.layers.3.mlp.experts.0.down_proj.weight"] == a["model.layers.3.mlp.experts.1.down_proj.weight"]
    # the pruned FP8 checkpoint dequantizes (chimera convert, as the harness does on CPU), loads and runs
    from chimera.merge.convert import convert

    convert(tmp_path / "out", tmp_path / "bf16", dtype="bfloat16")
    m = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert m.generate(torch.randint(3, 200, (1, 6)), max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_bad_prune_requests_are_one_line_errors(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "mix")
    layout = read_layout(Checkpoint(tmp_path / "mix"))
    cases = [
        (lambda: keep_from_drop([(5, 1)], layout), "not an MoE layer"),
        (lambda: keep_from_drop([(0, 8)], layout), "out of range"),
        (lambda: prune_checkpoint(tmp_path / "mix", tmp_path / "o", {0: [0, 1]}), "same number of experts"),
        (lambda: prune_checkpoint(tmp_path / "mix", tmp_path / "o", {0: [0], 1: [1]}), "num_experts_per_tok"),
        (lambda: prune_checkpoint(tmp_path / "mix", tmp_path / "mix", {0: [0, 1], 1: [0, 1]}), "already exists"),
        (lambda: select_keep({0: np.ones(8)}, 9), "can't keep 9"),
    ]
    for fn, msg in cases:
        with pytest.raises(ChimeraError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "chimera", "prune", str(tmp_path / "mix"), "--keep-per-layer", "4",
                        "--by", "reap", "-o", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and r.stderr.strip() == "error: --by reap needs --prompts FILE (calibration prompts, JSONL)"


# ------------------------------------------------------------------------------------------ REAP
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe"])
def test_reap_saliency_matches_a_float64_reference(arch):
    """S_e = mean over tokens routed to e of g_e(x) * ||E_e(x)||_2, checked against a per-token float64 loop over
    the experts' own weights (inputs captured before the experts module)."""
    model = tiny_model(arch)
    seqs = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 7)]
    routes = record_routes(model, seqs, batch_size=2, norms=True)
    rec = RoutingRecorder(model)
    want_sum = {L: np.zeros(rec.num_experts) for L in rec.layer_ids}
    want_n = {L: np.zeros(rec.num_experts) for L in rec.layer_ids}
    inputs = {}
    hooks = [rec.experts_module(L).register_forward_pre_hook(lambda m, a, L=L: inputs.__setitem__(L, a))
             for L in rec.layer_ids]
    try:
        for s in seqs:
            with torch.no_grad():
                model(torch.tensor([s]))
            for L in rec.layer_ids:
                ex = rec.experts_module(L)
                hidden, index, weights = inputs[L]
                W_gu, W_d = ex.gate_up_proj.detach().double(), ex.down_proj.detach().double()
                for t in range(hidden.shape[0]):
                    x = hidden[t].double()
                    for j in range(index.shape[1]):
                        e = int(index[t, j])
                        gate, up = (W_gu[e] @ x).chunk(2)
                        y = W_d[e] @ (torch.nn.functional.silu(gate) * up)
                        want_sum[L][e] += float(weights[t, j]) * float(y.norm())
                        want_n[L][e] += 1
    finally:
        for h in hooks:
            h.remove()
    got = routes.saliency("reap")
    for j, L in enumerate(routes.layers):
        want = np.divide(want_sum[L], want_n[L], out=np.zeros_like(want_sum[L]), where=want_n[L] > 0)
        np.testing.assert_allclose(got[j], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(routes.counts["prompt"].sum(0)[j], want_n[L])
    freq = routes.saliency("frequency")
    np.testing.assert_allclose(freq.sum(1), rec.layers[routes.layers[0]].adapter.top_k)


def test_cli_prune_by_reap_on_the_bundled_model(tmp_path):
    prompts = tmp_path / "cal.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["What is 12 + 30 ?", "Tell me about the plimbo .", "Was ist 4 + 5 ?"]) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    E, G = N_EXPERTS, N_GROUPS
    keep = 3 * E // 4  # a quarter of every group goes
    r = subprocess.run([sys.executable, "-m", "chimera", "prune", "tiny-r1", "--keep-per-layer", str(keep), "--by", "reap",
                        "--prompts", str(prompts), "--max-new-tokens", "32", "-o", str(tmp_path / "p")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{E} -> {keep}" in r.stdout and "group-limited routing kept" in r.stdout
    rec = json.loads((tmp_path / "p" / "chimera-prune.json").read_text())
    assert rec["method"]["by"] == "reap" and all(len(v) == keep for v in rec["kept"].values())
    scores = rec["scores"]
    per = E // G
    for L, dropped in rec["dropped"].items():  # the lowest-saliency experts of each group went
        s = np.asarray(scores[L])
        for g in range(G):
            grp = [e for e in range(g * per, (g + 1) * per)]
            gone = [e for e in dropped if e in grp]
            kept = [e for e in grp if e not in gone]
            assert len(gone) == per // 4 and max(s[gone]) <= min(s[kept])
    # the pruned checkpoint, loaded by transformers, is the bundled model with those experts switched off
    # live (replace): the same greedy tokens. (Its arithmetic after pruning is measured in docs/pruning.md.)
    from chimera.zoo import family

    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "p")
    m = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    orig = tf.AutoModelForCausalLM.from_pretrained(family.model_path("tiny-r1")).eval()
    enc = tok(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3 ?"}], tokenize=False,
                                      add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    out = m.generate(**enc, max_new_tokens=30, do_sample=False)
    off = [(int(L), e) for L, v in rec["dropped"].items() for e in v]
    with switched(orig, off=off):
        want = orig.generate(**enc, max_new_tokens=30, do_sample=False)
    assert torch.equal(out, want)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).startswith("<think>")


def test_expert_axis_other_than_zero_is_gathered(tmp_path):
    """A router stored [hidden, E] (expert axis 1) keeps the right columns, bytes as stored (bf16)."""
    from safetensors.torch import load_file, save_file

    from chimera.checkpoint.files import read_header
    from chimera.checkpoint.writer import ShardFile, Slot
    from chimera.moe.prune import _Part, _write

    t = torch.randn(3, 7, dtype=torch.float32).to(torch.bfloat16)
    save_file({"r": t}, str(tmp_path / "a.safetensors"))
    info = read_header(tmp_path / "a.safetensors")["r"]
    part = _Part("r", info, axis=1, keep=[0, 2, 6])
    out = ShardFile(tmp_path / "b.safetensors", [Slot("r", info.dtype, part.shape)])
    _write(out, part)
    out.commit()
    got = load_file(str(tmp_path / "b.safetensors"))["r"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, t[:, [0, 2, 6]])
