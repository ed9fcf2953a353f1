"""Routing capture and fTRI on real tiny models, including a planted marker-token expert."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from chimera.errors import ChimeraError
from chimera.moe.capture import RoutingRecorder, Routes, aggregate, record_routes
from chimera.moe.ftri import ftri_labelled, ftri_routes, label_responses, load_prompts
from chimera.moe.routers import moe_layers
from chimera.moe.switch import parse_experts, switched
from moe_tiny import ARCHS, tiny_model

MARKER, TWIN = 100, 101


def plant(arch: str, a: float = 0.05, big: float = 400.0):
    """A tiny model in which routed expert e* of the last MoE layer fires only on the MARKER token.

    Hidden dim 0 carries the marker: +a on MARKER, -a on every other token (so RMSNorm scales are the same),
    nothing writes to it and nothing reads it except e*'s router row. MARKER and TWIN are the same token
    otherwise.
    """
    model = tiny_model(arch, seed=3)
    H = model.config.hidden_size
    layers = moe_layers(model)
    L = max(layers)
    e_star = 5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or p.ndim < 2:
                continue
            if p.shape[-1] == H:
                p[..., 0] = 0.0    # nobody reads dim 0 ...
            if p.shape[-2] == H:
                p[..., 0, :] = 0.0  # ... and nobody writes it
        emb = model.get_input_embeddings().weight
        emb[TWIN] = emb[MARKER]
        emb[:, 0] = -a
        emb[MARKER, 0] = a
        gate = layers[L].adapter.module
        gate.weight[e_star].zero_()
        gate.weight[e_star, 0] = big
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias[e_star] = 0.0
    return model, (L, e_star)


def _prompts(n, seed, marker):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 6 + i % 5
        ids = torch.randint(3, 99, (T,), generator=g).tolist()
        pos = sorted(set(torch.randint(0, T, (2,), generator=g).tolist()))
        for p in pos:
            ids[p] = MARKER if marker else TWIN
        out.append(ids)
    return out


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_planted_marker_expert_ranks_first(arch, tmp_path):
    model, (L, e) = plant(arch)
    tgt, con = _prompts(10, 0, True), _prompts(10, 0, False)  # the same prompts, MARKER <-> TWIN
    rt = record_routes(model, tgt, batch_size=4)
    rc = record_routes(model, con, batch_size=4)
    # e* fires exactly on the marker tokens and nowhere else
    j = rt.layers.index(L)
    n_marker = np.array([sum(t == MARKER for t in s) for s in tgt])
    assert np.array_equal(rt.counts["prompt"][:, j, e], n_marker)
    assert rc.counts["prompt"][:, j, e].sum() == 0
    for stat in ("count", "weight"):
        res = ftri_routes(rt, rc, stat=stat)
        assert res.top(1) == [(L, e)], (stat, res.ranking()[:3])
        assert res.ranking()[0][2] > 0
    res = ftri_routes(rt, rc)
    res.write_json(tmp_path / "f.json", top=3)
    res.write_csv(tmp_path / "f.csv")
    res.plot(tmp_path / "f.png", top=3)
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["top"][0]["layer"] == L and data["top"][0]["expert"] == e and len(data["top"]) == 3
    assert len(data["ranking"]) == len(rt.layers) * rt.num_experts
    rows = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert (int(rows[0]["layer"]), int(rows[0]["expert"])) == (L, e)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    # the fTRI file feeds the switch: off -> the marker expert is never chosen
    assert parse_experts(f"@{tmp_path / 'f.json'}:1") == [(L, e)]
    with switched(model, off=f"@{tmp_path / 'f.json'}:1"):
        r2 = record_routes(model, tgt, batch_size=4)
    assert r2.counts["prompt"][:, j, e].sum() == 0


def test_capture_batched_matches_unbatched_and_excludes_padding():
    model = tiny_model("deepseek_v3")
    seqs = _prompts(7, 5, False)
    cuts = [3] * len(seqs)  # first 3 tokens are the "prompt", the rest the "response"
    batched = record_routes(model, seqs, cuts, batch_size=3, pad_id=0)
    E = batched.num_experts
    for i, s in enumerate(seqs):
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(torch.tensor([s]))
        got = rec.take()
        for j, L in enumerate(batched.layers):
            index, w = got[L]
            for kind, sl in (("prompt", slice(0, 3)), ("response", slice(3, None))):
                want = np.zeros(E)
                wsum = np.zeros(E)
                for t in range(len(s))[sl]:  # reference: a plain per-token loop
                    for kk in range(index.shape[1]):
                        want[int(index[t, kk])] += 1
                        wsum[int(index[t, kk])] += float(w[t, kk])
                assert np.array_equal(batched.counts[kind][i, j], want), (i, L, kind)
                np.testing.assert_allclose(batched.weights[kind][i, j], wsum, rtol=1e-4, atol=1e-5)
        assert batched.tokens["prompt"][i] == 3 and batched.tokens["response"][i] == len(s) - 3
    k = moe_layers(model)[batched.layers[0]].adapter.top_k
    np.testing.assert_allclose(batched.stat("prompt", "count").sum(-1), k)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_every_architecture(arch):
    """Padded batches give the per-sequence routing of unpadded runs, through each router's adapter."""
    model = tiny_model(arch, text_only=True)
    seqs = _prompts(3, 2, False)
    batched = record_routes(model, seqs, batch_size=3, pad_id=0)
    k = {L: info.adapter.top_k for L, info in moe_layers(model).items()}
    assert batched.layers == sorted(k)
    for i, s in enumerate(seqs):
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(torch.tensor([s]))
        got = rec.take()
        for j, L in enumerate(batched.layers):
            want = torch.bincount(got[L][0].reshape(-1), minlength=batched.num_experts).numpy()
            assert np.array_equal(batched.counts["prompt"][i, j], want), (arch, i, L)
            assert batched.counts["prompt"][i, j].sum() == k[L] * len(s)


def test_aggregate_and_routes_roundtrip(tmp_path):
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3]])
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.1, 0.9]])
    group = torch.tensor([0, 0, -1, 1])  # token 2 is padding
    c, w = aggregate(index, weights, group, 2, 4)
    assert c.tolist() == [[1, 2, 1, 0], [1, 0, 0, 1]]
    assert torch.allclose(w, torch.tensor([[0.5, 0.75, 0.75, 0], [0.1, 0, 0, 0.9]]))
    model = tiny_model("olmoe")
    r = record_routes(model, _prompts(3, 1, False), batch_size=2)
    r.texts = ["a", "b", "c"]
    r.save(tmp_path / "r.npz")
    r2 = Routes.load(tmp_path / "r.npz")
    assert r2.layers == r.layers and r2.texts == r.texts
    assert np.array_equal(r2.counts["prompt"], r.counts["prompt"])
    with pytest.raises(ChimeraError, match="no response-token"):
        r2.stat("response")


def test_ftri_labelled_split():
    model, (L, e) = plant("qwen3_moe")
    seqs = _prompts(4, 0, True) + _prompts(4, 0, False)
    routes = record_routes(model, seqs, [len(s) for s in seqs])  # all prompt tokens, empty responses
    labels = ["refused"] * 4 + ["answered"] * 4
    res = ftri_labelled(routes, labels, "refused", tokens="prompt")
    assert res.top(1) == [(L, e)] and res.n_target == 4 and res.n_contrast == 4
    assert res.meta["labels"] == {"refused": 4, "answered": 4}
    with pytest.raises(ChimeraError, match="no contrast class"):
        ftri_labelled(routes, ["refused"] * 8, "refused")
    with pytest.raises(ChimeraError, match="no response labelled"):
        ftri_labelled(routes, labels, "other")
    assert label_responses(lambda r: r.startswith("No"), ["p", "q"], ["No.", "Yes"]) == [True, False]
    assert label_responses(lambda r, item: item["prompt"] + r, ["p"], ["r"]) == ["pr"]


def test_prompt_files(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n"b"\n{"question": "c", "answer": 1}\n')
    assert load_prompts(f) == ["a", "b", "c"]
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ChimeraError, match="empty prompt file"):
        load_prompts(empty)
    with pytest.raises(ChimeraError, match="not found"):
        load_prompts(tmp_path / "none.jsonl")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ChimeraError, match="no prompt field"):
        load_prompts(bad)
    with pytest.raises(ChimeraError, match="no prompts"):
        record_routes(tiny_model("mixtral"), [])


def test_cli_route_ftri_tune(tmp_path):
    """route -> ftri (two prompt sets, JSON/CSV/PNG) -> tune @ftri.json:K, through the command line."""
    import transformers as tf
    from typer.testing import CliRunner

    from chimera.cli import app
    from chimera.zoo import tokenizer as ztok

    target = ["Tell me about the glorbium .", "What is the vextrane ?", "Describe the glorbium ."]
    contrast = ["Tell me about the plimbo .", "What is the tarvel ?", "Describe the snorf ."]
    tok = ztok.wrap(ztok.build(target + contrast))
    cfg = tiny_model("deepseek_v3").config
    cfg.vocab_size = len(tok)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    mdir = tmp_path / "m"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    for name, ps in (("t", target), ("c", contrast)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ps))
    run = CliRunner().invoke
    r = run(app, ["route", str(mdir), "--prompts", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "r.npz")])
    assert r.exit_code == 0, r.output
    routes = Routes.load(tmp_path / "r.npz")
    assert routes.n_prompts == 3 and routes.layers == [1, 2] and routes.texts == target
    r = run(app, ["ftri", str(mdir), "--target", str(tmp_path / "t.jsonl"), "--contrast", str(tmp_path / "c.jsonl"),
                  "--top", "4", "--out", str(tmp_path / "f.json"), "--csv", str(tmp_path / "f.csv"),
                  "--plot", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "f.json").read_text())
    assert len(data["top"]) == 4 and data["n_target"] == 3 and data["n_contrast"] == 3
    assert (tmp_path / "f.png").stat().st_size > 1000 and (tmp_path / "f.csv").is_file()
    r = run(app, ["tune", str(mdir), "--off", f"@{tmp_path / 'f.json'}:2", "-o", str(tmp_path / "tuned")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "tuned" / "chimera-tune.json").read_text())
    assert sum(len(t["experts"]) for t in rec["tensors"].values()) == 2
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    r = run(app, ["route", str(mdir), "--prompts", str(empty), "--out", str(tmp_path / "x.npz")])
    assert isinstance(r.exception, ChimeraError) and "empty prompt file" in str(r.exception)
