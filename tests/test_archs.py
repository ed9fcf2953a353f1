"""Every architecture: tiny siblings written by transformers' own save_pretrained, every on-disk tensor classified,
the R1T recipe copying exactly the routed experts, and a 0.5/0.5 child loading in transformers with the logits
of the in-memory mix."""
import json
import re

import pytest
import torch
import yaml

import ckpt
from chimera.checkpoint import arch as arch_mod
from chimera.checkpoint.arch import CLASSES, classify
from chimera.checkpoint.files import Checkpoint
from chimera.errors import ChimeraError
from chimera.merge import merge
from moe_tiny import ARCHS, load, logits, perturbed, save

BASE = {"embed", "lm_head", "norm", "attention", "router", "routed_experts"}
EXPECTED = {  # the classes each architecture's files must produce
    "deepseek_v2": BASE | {"dense_mlp", "shared_experts"},
    "deepseek_v3": BASE | {"dense_mlp", "shared_experts"},
    "kimi_k2": BASE | {"dense_mlp", "shared_experts"},
    "deepseek_v32": BASE | {"dense_mlp", "shared_experts", "indexer"},
    "deepseek_v4": BASE | {"shared_experts", "indexer", "hyper_connection"},
    "glm4_moe": BASE | {"dense_mlp", "shared_experts"},
    "dots1": BASE | {"dense_mlp", "shared_experts"},
    "ernie4_5_moe": BASE | {"dense_mlp", "shared_experts"},
    "qwen2_moe": BASE | {"dense_mlp", "shared_experts"},
    "qwen3_moe": BASE,
    "qwen3_next": BASE | {"shared_experts", "linear_attention"},
    "qwen3_5_moe": BASE | {"shared_experts", "linear_attention", "vision"},
    "gpt_oss": BASE,
    "llama4": BASE | {"dense_mlp", "shared_experts", "vision"},
    "minimax_m2": BASE,
    "mixtral": BASE,
    "olmoe": BASE,
}
SPOT = {  # on-disk name (layer 1 unless stated) -> class: the names each architecture's knowledge hinges on
    "deepseek_v32": {"model.layers.1.self_attn.indexer.wq_b.weight": "indexer",
                     "model.layers.1.self_attn.indexer.k_norm.bias": "indexer",
                     "model.layers.1.mlp.gate.e_score_correction_bias": "router"},
    "deepseek_v4": {"model.layers.1.attn.indexer.compressor.wkv.weight": "indexer",
                    "model.layers.1.attn.compressor.wkv.weight": "attention", "model.layers.1.attn.attn_sink": "attention",
                    "model.layers.1.ffn.gate.bias": "router", "model.layers.0.ffn.gate.tid2eid": "router",
                    "model.layers.1.hc_attn_fn": "hyper_connection", "model.hc_head.hc_fn": "hyper_connection",
                    "model.layers.1.ffn.experts.7.w2.weight": "routed_experts", "head.weight": "lm_head",
                    "model.norm.weight": "norm"},
    "glm4_moe": {"model.layers.0.mlp.gate_proj.weight": "dense_mlp", "model.layers.1.self_attn.q_proj.bias": "attention"},
    "qwen3_next": {"model.layers.0.linear_attn.A_log": "linear_attention", "model.layers.0.linear_attn.norm.weight":
                   "linear_attention", "model.layers.1.mlp.shared_expert_gate.weight": "shared_experts"},
    "gpt_oss": {"model.layers.1.mlp.experts.gate_up_proj": "routed_experts", "model.layers.1.mlp.router.bias": "router",
                "model.layers.1.mlp.experts.down_proj_bias": "routed_experts", "model.layers.1.self_attn.sinks": "attention"},
    "llama4": {"language_model.model.layers.0.feed_forward.gate_proj.weight": "dense_mlp",
               "language_model.model.layers.1.feed_forward.experts.gate_up_proj": "routed_experts",
               "language_model.model.layers.1.feed_forward.router.weight": "router",
               "language_model.model.layers.1.feed_forward.shared_expert.up_proj.weight": "shared_experts",
               "multi_modal_projector.linear_1.weight": "vision"},
    "minimax_m2": {"model.layers.1.block_sparse_moe.e_score_correction_bias": "router",
                   "model.layers.1.block_sparse_moe.experts.3.w1.weight": "routed_experts"},
    "ernie4_5_moe": {"model.layers.1.mlp.moe_statics.e_score_correction_bias": "router"},
}


def _names(path):
    return list(Checkpoint(path).logical())


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Per architecture: two related tiny models (seed 0, seed 1 perturbed) written by save_pretrained."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for a in ARCHS:
        p, q = perturbed(a, 0), perturbed(a, 1)
        out[a] = (save(p, root / a / "p", a), save(q, root / a / "q", a), p, q)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_classified(arch, parents):
    p = parents[arch][0]
    ck = Checkpoint(p)
    classes = {n: classify(n, ck.config) for n in ck.logical()}
    assert None not in classes.values(), [n for n, c in classes.items() if c is None]
    assert set(classes.values()) == EXPECTED[arch]
    for name, cls in SPOT.get(arch, {}).items():
        assert classes[name] == cls, name
    a = arch_mod.of(ck.config)
    experts = [n for n, c in classes.items() if c == "routed_experts"]
    roles = [a.role(n) for n in experts]
    if arch in ("gpt_oss", "llama4"):  # fused [E, ...] tensors
        assert all(r.fused and r.expert is None for r in roles)
    else:  # per-expert tensors, each with its expert index
        assert all(not r.fused and r.expert == int(re.search(r"experts\.(\d+)\.", n).group(1))
                   for n, r in zip(experts, roles))
    assert all(r.layer in a.moe for r in roles)


@pytest.mark.parametrize("arch", ARCHS)
def test_r1t_copies_exactly_the_routed_experts_and_mix_loads(arch, parents, tmp_path):
    p, q, mp, mq = parents[arch]
    ck = Checkpoint(p)
    classes = {n: classify(n, ck.config) for n in ck.logical()}
    r1t = {"parents": {"p": str(p), "q": str(q)}, "base": "p", "weights": {"default": {"p": 1.0},
                                                                          "routed_experts": {"q": 1.0}}}
    (tmp_path / "r1t.yaml").write_text(yaml.safe_dump(r1t))
    merge(tmp_path / "r1t.yaml", tmp_path / "r1t")
    got, rp, rq = ckpt.raw(tmp_path / "r1t"), ckpt.raw(p), ckpt.raw(q)
    assert set(got) == set(rp)
    for n, cls in classes.items():
        want = rq if cls == "routed_experts" else rp
        assert got[n] == want[n], (n, cls)
    assert json.loads((tmp_path / "r1t" / "config.json").read_text()) == json.loads((p / "config.json").read_text())
    # a 0.5/0.5 mix of every float tensor (integer tables such as DeepSeek-V4's tid2eid come from the base)
    half = {"parents": {"p": str(p), "q": str(q)}, "base": "p", "weights": {"default": {"p": 0.5, "q": 0.5}},
            "overrides": [{"match": "*.tid2eid", "weights": {"p": 1.0}}]}
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(half))
    merge(tmp_path / "half.yaml", tmp_path / "half")
    child = load(arch, tmp_path / "half")
    sp, sq = mp.state_dict(), mq.state_dict()
    mixed = {k: (0.5 * v + 0.5 * sq[k]) if v.is_floating_point() else v for k, v in sp.items()}
    mp.load_state_dict(mixed)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    try:
        want, got_l = logits(arch, mp, ids), logits(arch, child, ids)
    finally:
        mp.load_state_dict(sp)
    assert torch.isfinite(got_l).all()
    assert torch.equal(got_l, want), (got_l - want).abs().max()
    assert not torch.equal(want, logits(arch, load(arch, p), ids))


def test_fused_expert_layout_qwen3_5(tmp_path):
    """Qwen3.5-MoE's newer releases store the experts fused ([E, 2I, H]); both layouts load, both classify."""
    m = perturbed("qwen3_5_moe", 0)
    save(m, tmp_path / "f", "qwen3_5_moe", fused=True)
    ck = Checkpoint(tmp_path / "f")
    name = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert name in ck.logical() and ck.logical()[name].shape == (8, 32, 32)
    r = arch_mod.of(ck.config).role(name)
    assert (r.cls, r.layer, r.fused) == ("routed_experts", 1, True)
    assert {classify(n, ck.config) for n in ck.logical()} == EXPECTED["qwen3_5_moe"]
    ids = torch.randint(3, 128, (1, 7))
    assert torch.equal(logits("qwen3_5_moe", load("qwen3_5_moe", tmp_path / "f"), ids), logits("qwen3_5_moe", m, ids))


def test_mtp_tensors_by_analogy():
    """MTP layers transformers doesn't build: DeepSeek/GLM `model.layers.{n}.*`, Qwen3-Next `mtp.*`, V4 `mtp.0.*`."""
    sd, cfg = ckpt.ds_state(0, mtp=True)
    n = cfg["num_hidden_layers"]
    got = {k: classify(k, cfg) for k in sd}
    assert None not in got.values()
    assert got["model.layers.0.mlp.gate_proj.weight"] == "dense_mlp"
    assert got[f"model.layers.{n}.enorm.weight"] == "mtp"
    assert got[f"model.layers.{n}.eh_proj.weight"] == "mtp"
    assert got[f"model.layers.{n}.shared_head.norm.weight"] == "mtp"
    assert got[f"model.layers.{n}.input_layernorm.weight"] == "mtp"
    assert got[f"model.layers.{n}.mlp.experts.2.down_proj.weight"] == "routed_experts"
    assert got[f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight"] == "attention"
    assert got[f"model.layers.{n}.mlp.gate.e_score_correction_bias"] == "router"
    assert arch_mod.of(cfg).role(f"model.layers.{n}.mlp.experts.2.down_proj.weight").expert == 2
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"] == "router"
    assert classify("model.layers.1.mlp.gate_proj.weight", cfg) is None  # no dense MLP in an MoE layer
    assert set(got.values()) == {"embed", "lm_head", "norm", "attention", "dense_mlp", "router", "shared_experts",
                                 "routed_experts", "mtp"}
    import moe_tiny

    q = moe_tiny.tiny_config("qwen3_next").to_dict()
    assert classify("mtp.fc.weight", q) == "mtp"
    assert classify("mtp.pre_fc_norm_embedding.weight", q) == "mtp"
    assert classify("mtp.layers.0.mlp.experts.3.up_proj.weight", q) == "routed_experts"
    assert classify("mtp.layers.0.self_attn.q_proj.weight", q) == "attention"
    assert classify("mtp.layers.0.mlp.shared_expert_gate.weight", q) == "shared_experts"
    v4 = moe_tiny.tiny_config("deepseek_v4").to_dict()
    assert classify("mtp.0.ffn.experts.5.w1.weight", v4) == "routed_experts"
    assert classify("mtp.0.attn.wq_a.weight", v4) == "attention"
    assert classify("mtp.0.enorm.weight", v4) == "mtp"
    g = moe_tiny.tiny_config("glm4_moe").to_dict()
    assert classify("model.layers.3.eh_proj.weight", g) == "mtp"
    assert classify("model.layers.3.mlp.shared_experts.up_proj.weight", g) == "shared_experts"


def test_published_v4_names_and_no_remote_code(tmp_path):
    """DeepSeek-V4's own release names (`embed.weight`, `layers.N.ffn...`) map through transformers' conversions;
    a Kimi K2 config's `auto_map` code is never imported."""
    import moe_tiny

    v4 = moe_tiny.tiny_config("deepseek_v4").to_dict()
    for name, cls in {"embed.weight": "embed", "head.weight": "lm_head", "norm.weight": "norm",
                      "layers.2.ffn.experts.4.w3.weight": "routed_experts", "layers.2.ffn.gate.bias": "router",
                      "layers.1.attn.indexer.wq_b.weight": "indexer", "hc_head_fn": "hyper_connection",
                      "layers.1.hc_ffn_scale": "hyper_connection", "layers.2.attn.wo_a.weight": "attention"}.items():
        assert classify(name, v4) == cls, name
    d = save(perturbed("kimi_k2", 0), tmp_path / "k", "kimi_k2")
    marker = tmp_path / "imported"
    for mod in ("configuration_deepseek", "modeling_deepseek"):
        (d / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = Checkpoint(d).config
    assert cfg["model_type"] == "kimi_k2" and "auto_map" in cfg
    a = arch_mod.of(cfg)
    assert a.model_class == "DeepseekV3ForCausalLM" and set(a.moe) == {1, 2}
    assert classify("model.layers.1.mlp.experts.15.up_proj.weight", cfg) == "routed_experts"
    assert not marker.exists()
    with pytest.raises(ChimeraError, match="never runs a checkpoint's own code"):
        arch_mod.of({"model_type": "acme_moe", "auto_map": {"AutoConfig": "x.Y"}, "architectures": ["AcmeForCausalLM"]})
    assert set(CLASSES) >= set().union(*EXPECTED.values()) | {"mtp"}


def test_expert_and_router_tensors_for_pruning(parents):
    """The API the pruning engine uses: per (layer, expert) its on-disk tensors, per layer its router tensors and
    the axis that indexes experts."""
    def api(arch, layer, e):
        ck = Checkpoint(parents[arch][0])
        a = arch_mod.of(ck.config)
        names = list(ck.logical())
        return ({(t.name, t.axis) for t in a.expert_tensors(names, layer, e)},
                {(t.name, t.axis) for t in a.router_tensors(names, layer)})

    ex, ro = api("deepseek_v3", 2, 13)
    assert ex == {(f"model.layers.2.mlp.experts.13.{p}_proj.weight", None) for p in ("gate", "up", "down")}
    assert ro == {("model.layers.2.mlp.gate.weight", 0), ("model.layers.2.mlp.gate.e_score_correction_bias", 0)}
    ex, ro = api("gpt_oss", 1, 3)
    assert ex == {(f"model.layers.1.mlp.experts.{p}", 0) for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                                   "down_proj_bias")}
    assert ro == {("model.layers.1.mlp.router.weight", 0), ("model.layers.1.mlp.router.bias", 0)}
    _, ro = api("ernie4_5_moe", 1, 0)
    assert ("model.layers.1.mlp.moe_statics.e_score_correction_bias", 1) in ro      # stored [1, E]
    _, ro = api("deepseek_v4", 0, 0)
    assert ("model.layers.0.ffn.gate.tid2eid", None) in ro                          # values are expert ids
    ex, ro = api("minimax_m2", 0, 7)
    assert ("model.layers.0.block_sparse_moe.experts.7.w2.weight", None) in ex and len(ex) == 3
    assert ("model.layers.0.block_sparse_moe.e_score_correction_bias", 0) in ro
    ex, _ = api("llama4", 1, 2)
    assert ex == {("language_model.model.layers.1.feed_forward.experts.gate_up_proj", 0),
                  ("language_model.model.layers.1.feed_forward.experts.down_proj", 0)}


# ------------------------------------------------------------------ the derivation cached as data (archcache)
from chimera.checkpoint import archcache  # noqa: E402


def _derived(cfg, names):
    a = arch_mod.of(cfg)
    return {n: (None if r is None else (r.cls, r.layer, r.expert, r.fused)) for n, r in ((n, a.role(n)) for n in names)}


def _tabled(t, names):
    return {n: (None if r is None else (r.cls, r.layer, r.expert, r.fused)) for n, r in ((n, t.role(n)) for n in names)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path / "cache"))
    archcache._memo.clear()
    yield tmp_path / "cache" / "arch"
    archcache._memo.clear()


def _no_derivation(monkeypatch):
    def refuse(cfg):
        raise AssertionError("derivation ran on a cache hit")
    monkeypatch.setattr(arch_mod, "of", refuse)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_table_gives_the_derivations_roles(arch, parents, cache, monkeypatch):
    """For every on-disk name of both tiny parents (and MTP / release names for the configs that have them), the
    table read back from the cache file -- in a state where the derivation can't run -- answers exactly what the
    derivation does: class, layer, expert, fused."""
    import moe_tiny

    cks = [Checkpoint(parents[arch][0]), Checkpoint(parents[arch][1])]
    cfg = cks[0].config
    names = sorted(set(cks[0].logical()) | set(cks[1].logical()))
    extra = {"qwen3_next": ["mtp.fc.weight", "mtp.layers.0.mlp.experts.3.up_proj.weight", "mtp.norm.weight",
                            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.shared_expert_gate.weight"],
             "deepseek_v4": ["mtp.0.ffn.experts.5.w1.weight", "mtp.0.enorm.weight", "embed.weight", "head.weight",
                             "layers.2.ffn.experts.4.w3.weight", "layers.1.hc_ffn_scale", "hc_head_fn"],
             "glm4_moe": ["model.layers.3.eh_proj.weight", "model.layers.3.mlp.shared_experts.up_proj.weight",
                          "model.layers.3.mlp.experts.1.up_proj.weight"]}.get(arch, [])
    if extra:
        cfg = moe_tiny.tiny_config(arch).to_dict() if arch != "glm4_moe" else cfg
    want = _derived(cfg, names + extra)
    assert archcache.table(cfg, names).moe == {L: b.num_experts for L, b in arch_mod.of(cfg).moe.items()}
    archcache.table(cfg, extra)                      # a second batch of names joins the same entry
    (f,) = cache.glob("*.json")
    archcache._memo.clear()
    _no_derivation(monkeypatch)
    t = archcache.table(cfg, names + extra)
    assert _tabled(t, names + extra) == want
    assert len(f.read_text()) < 40_000               # compact: layer and expert indices abstracted


def test_cache_is_exact_about_what_it_has_seen(cache, monkeypatch):
    """A name, layer or expert index the table has not been asked about is a miss (the derivation answers and is
    added); an entry is never used for another transformers version, another config, or a file whose stored key
    differs; a plan on a warm cache imports no torch."""
    sd, cfg = ckpt.ds_state(0, mtp=True)
    n = cfg["num_hidden_layers"]
    names = sorted(k for k in sd if not k.endswith("_scale_inv"))
    first = [k for k in names if ".layers.1." in k and not re.search(r"experts\.[4-9]\.", k)]
    t = archcache.table(cfg, first)
    assert t.covers(first)
    assert t.covers(["model.layers.1.mlp.experts.2.up_proj.weight"])
    for missing in ("model.layers.2.mlp.experts.0.up_proj.weight",        # another layer
                    f"model.layers.{n}.enorm.weight",                      # an MTP layer
                    "model.layers.1.mlp.experts.6.up_proj.weight",         # above the experts it has seen
                    "model.embed_tokens.weight"):
        assert not t.covers([missing]), missing
    calls = []
    real = arch_mod.of
    monkeypatch.setattr(arch_mod, "of", lambda c: calls.append(1) or real(c))
    archcache._memo.clear()
    t = archcache.table(cfg, names)
    assert calls and _tabled(t, names) == _derived(cfg, names)
    files = list(cache.glob("*.json"))
    assert len(files) == 1

    def hit(c) -> bool:
        archcache._memo.clear()
        calls.clear()
        archcache.table(c, names)
        return not calls

    assert hit(cfg)
    # another transformers version: another key, another file; the old entry stays unused
    v = archcache._version
    monkeypatch.setattr(archcache, "_version", lambda d: "0.0.0-other" if d == "transformers" else v(d))
    assert not hit(cfg) and len(list(cache.glob("*.json"))) == 2
    monkeypatch.setattr(archcache, "_version", v)
    # another config (a key the derivation passes to transformers), and the one that changes classes
    assert not hit({**cfg, "first_k_dense_replace": 2})
    assert _tabled(archcache.table({**cfg, "first_k_dense_replace": 2}, names), names) == \
        _derived({**cfg, "first_k_dense_replace": 2}, names)
    assert archcache.table({**cfg, "first_k_dense_replace": 2}, names).role(
        "model.layers.1.mlp.experts.0.up_proj.weight") is None          # layer 1 is dense there
    # keys the derivation drops (quantization, provenance) share the entry
    assert hit({**cfg, "_name_or_path": "elsewhere", "transformers_version": "9.9"})
    # a file whose stored key is not the one asked for is ignored
    d = json.loads(files[0].read_text())
    d["key"]["transformers"] = "0.0.0-other"
    files[0].write_text(json.dumps(d))
    assert not hit(cfg)


def test_plan_on_a_warm_cache_imports_no_torch(ds_pair, tmp_path):
    import subprocess
    import sys

    a, b, *_ = ds_pair
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                                 "weights": {"default": {"v3": 0.5, "r1": 0.5}}}))
    code = ("import sys; from chimera.merge import build_plan, load; p = build_plan(load(sys.argv[1])); "
            "print(len(p.items), 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**__import__("os").environ, "CHIMERA_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code, str(r)], capture_output=True, text=True, env=env)
            for _ in range(2)]
    assert all(p.returncode == 0 for p in runs), runs[0].stderr + runs[1].stderr
    cold, warm = (p.stdout.split() for p in runs)
    assert cold[1:] == ["True", "True"] and warm[1:] == ["False", "False"] and cold[0] == warm[0]
