"""Single experts in recipes: `model.layers.L.mlp.experts[E]` selects experts whether the file stores them per
expert or fused along axis 0 (`experts.gate_up_proj [E, ...]`)."""
import pytest

from chimera.errors import ChimeraError
from chimera.merge.recipe import expert_of, from_dict, parse_selector


def _recipe(match, **extra):
    return from_dict({"parents": {"a": "/x/a", "b": "/x/b"}, "base": "a", "weights": {"default": {"a": 1.0}},
                      "overrides": [{"match": match, "weights": {"b": 1.0}}], **extra})


def test_selector_syntax_and_matching():
    assert parse_selector("model.layers.3.mlp.experts[5,7-9]", "r") == ("model.layers.3.mlp.experts",
                                                                         frozenset({5, 7, 8, 9}))
    assert parse_selector("*.experts[*]", "r") == ("*.experts", None)
    assert parse_selector("model.layers.3.*", "r") is None
    r = _recipe("model.layers.*.mlp.experts[5]")
    per = "model.layers.3.mlp.experts.5.up_proj.weight"
    assert r.lambdas(per, "routed_experts") == {"b": 1.0}
    assert r.lambdas("model.layers.3.mlp.experts.4.up_proj.weight", "routed_experts") == {"a": 1.0}
    fused = "model.layers.3.mlp.experts.gate_up_proj"
    assert r.lambdas(fused, "routed_experts") == {"a": 1.0}          # the tensor as a whole: class / default
    lams = r.expert_lambdas(fused, "routed_experts", 8)
    assert lams[5] == {"b": 1.0} and all(lams[e] == {"a": 1.0} for e in range(8) if e != 5)
    assert r.expert_lambdas("model.layers.3.mlp.experts.down_proj_bias", "routed_experts", 8)[5] == {"b": 1.0}
    assert r.lambdas("model.layers.3.mlp.shared_experts.up_proj.weight", "shared_experts") == {"a": 1.0}
    assert expert_of("layers.3.ffn.experts.2.w1.weight") == ("layers.3.ffn.experts", 2)   # DeepSeek-V4 names
    assert expert_of("model.layers.3.mlp.shared_experts.up_proj.weight") is None
    # first match wins, as for globs
    r2 = from_dict({"parents": {"a": "/x/a", "b": "/x/b"}, "base": "a", "weights": {"default": {"a": 1.0}},
                    "overrides": [{"match": "model.layers.3.mlp.experts[0-3]", "weights": {"a": 0.5, "b": 0.5}},
                                  {"match": "model.layers.3.*", "weights": {"b": 1.0}}]})
    lams = r2.expert_lambdas(fused, "routed_experts", 8)
    assert lams[:4] == [{"a": 0.5, "b": 0.5}] * 4 and lams[4:] == [{"b": 1.0}] * 4


@pytest.mark.parametrize("match,msg", [("model.layers.3.mlp.experts[5-3]", "bad expert list '5-3'"),
                                       ("model.layers.3.mlp.experts[x]", "bad expert list 'x'"),
                                       ("model.layers.3.mlp[5]", "an expert selector names an experts module")])
def test_bad_selectors_are_one_line_errors(match, msg):
    with pytest.raises(ChimeraError, match=msg) as ei:
        _recipe(match)
    assert "\n" not in str(ei.value) and "overrides[0]" in str(ei.value)


# ----------------------------------------------------------------------------------------------- merges
import torch  # noqa: E402
import yaml  # noqa: E402

import ckpt  # noqa: E402
import qfix  # noqa: E402
from chimera.checkpoint.files import Checkpoint  # noqa: E402
from chimera.merge import merge  # noqa: E402
from moe_tiny import load, logits, perturbed, save  # noqa: E402


def _merge(tmp_path, p, q, overrides, name="c", default=None):
    r = tmp_path / f"{name}.yaml"
    r.write_text(yaml.safe_dump({"parents": {"p": str(p), "q": str(q)}, "base": "p",
                                 "weights": {"default": default or {"p": 1.0}}, "overrides": overrides}))
    return merge(r, tmp_path / name), tmp_path / name


def _rows(raw: bytes, shape, lo, hi) -> bytes:
    per = len(raw) // shape[0]
    return raw[lo * per: hi * per]


@pytest.mark.parametrize("arch", ["gpt_oss", "llama4", "qwen3_5_moe"])
def test_single_experts_of_fused_tensors(arch, tmp_path):
    mp, mq = perturbed(arch, 0), perturbed(arch, 1)
    fused = arch == "qwen3_5_moe"          # newer Qwen3.5 releases: fused on disk too
    p, q = save(mp, tmp_path / "p", arch, fused=fused), save(mq, tmp_path / "q", arch, fused=fused)
    path = {"gpt_oss": "model.layers.1.mlp.experts", "llama4": "language_model.model.layers.1.feed_forward.experts",
            "qwen3_5_moe": "model.language_model.layers.1.mlp.experts"}[arch]
    res, c = _merge(tmp_path, p, q, [{"match": f"{path}[2]", "weights": {"q": 1.0}},
                                     {"match": f"{path}[0]", "weights": {"p": 0.5, "q": 0.5}}])
    got, rp, rq = ckpt.raw(c), ckpt.raw(p), ckpt.raw(q)
    tensors = Checkpoint(p).tensors
    names = [n for n in tensors if n.startswith(path + ".")]
    assert names and all(res.records[n]["segments"] for n in names)
    for n in names:
        shape, E = tensors[n].shape, tensors[n].shape[0]
        assert _rows(got[n], shape, 2, 3) == _rows(rq[n], shape, 2, 3), n          # expert 2: q's bytes
        assert _rows(got[n], shape, 1, 2) == _rows(rp[n], shape, 1, 2)               # the others: p's
        assert _rows(got[n], shape, 3, E) == _rows(rp[n], shape, 3, E)
        a, b, m = (torch.frombuffer(bytearray(_rows(x[n], shape, 0, 1)), dtype=torch.float32) for x in (rp, rq, got))
        assert torch.equal(m, a * 0.5 + b * 0.5)                                       # expert 0: the mix
    assert all(got[n] == rp[n] for n in rp if not n.startswith(path + "."))
    # the child loads and runs like the same experts swapped in memory
    sp, sq = mp.state_dict(), mq.state_dict()
    mixed = dict(sp)
    for k in sp:
        if k.startswith(path + "."):
            t = sp[k].clone()
            t[2] = sq[k][2]
            t[0] = sp[k][0] * 0.5 + sq[k][0] * 0.5
            mixed[k] = t
    mp.load_state_dict(mixed)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(logits(arch, load(arch, c), ids), logits(arch, mp, ids))


def test_single_expert_of_mxfp4_release_and_per_expert_layout(tmp_path):
    p = qfix.gpt_oss_mxfp4(save(perturbed("gpt_oss", 0), tmp_path / "p", "gpt_oss"))
    q = qfix.gpt_oss_mxfp4(save(perturbed("gpt_oss", 1), tmp_path / "q", "gpt_oss"))
    res, c = _merge(tmp_path, p, q, [{"match": "model.layers.0.mlp.experts[5-6]", "weights": {"q": 1.0}}])
    got, rp, rq = ckpt.raw(c), ckpt.raw(p), ckpt.raw(q)
    tensors = Checkpoint(p).tensors
    for n in ("model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.0.mlp.experts.gate_up_proj_scales",
              "model.layers.0.mlp.experts.down_proj_bias"):
        s = tensors[n].shape
        assert _rows(got[n], s, 5, 7) == _rows(rq[n], s, 5, 7) and _rows(got[n], s, 0, 5) == _rows(rp[n], s, 0, 5)
    assert res.ops == {"copy": len(Checkpoint(p).stored)}          # byte copies of expert rows: nothing computed
    # per-expert files: the selector names the same experts, whole tensors
    sd, cfg = ckpt.ds_state(0, mtp=True)
    a = ckpt.write(tmp_path / "a", sd, cfg, "fp8")
    b = ckpt.write(tmp_path / "b", ckpt.perturb(sd, 1), cfg, "fp8")
    _, c2 = _merge(tmp_path, a, b, [{"match": "model.layers.*.mlp.experts[5]", "weights": {"q": 1.0}}], "c2")
    got, ra, rb = ckpt.raw(c2), ckpt.raw(a), ckpt.raw(b)
    changed = sorted(n for n in got if got[n] != ra[n])
    assert changed == sorted(n for n in ra if ".experts.5." in n and ra[n] != rb[n])
    assert len(changed) == 3 * 3 * 2           # layers 1, 2 and the MTP layer 3; 3 projections; weight + scale


def test_selector_errors_at_plan_time(tmp_path):
    p = save(perturbed("gpt_oss", 0), tmp_path / "p", "gpt_oss")
    for match, msg in (("model.layers.1.mlp.experts[8]", "model.layers.1.mlp.experts has experts 0-7"),
                       ("model.layers.9.mlp.experts[1]", "matches no routed experts")):
        with pytest.raises(ChimeraError, match=msg) as ei:
            _merge(tmp_path, p, p, [{"match": match, "weights": {"q": 1.0}}], "bad")
        assert "\n" not in str(ei.value) and not (tmp_path / "bad").exists()
