"""The bundled model family: files as DeepSeek writes them, offline loading, the acceptance behaviours
(on a sample of the held-out suites), and the trainer's first steps on a tiny config."""
from __future__ import annotations

import json

import pytest
import torch

from chimera.errors import ChimeraError
from chimera.zoo import family, tasks
from chimera.zoo import tokenizer as ztok

N = {"arithmetic": 60, "sensitive": 76, "language": 40}  # per-suite sample sizes: the suite stays fast


@pytest.fixture(scope="module")
def reports():
    from chimera.eval import harness

    out = {}
    for name in ("tiny-v3", "tiny-r1"):
        model, tok = harness.load(name)
        out[name] = {s: harness.evaluate(model, tok, s, n, max_new_tokens=64, batch_size=80)[s] for s, n in N.items()}
    return out


def _v(rep, suite, metric, split=None):
    entry = rep[suite] if split is None else {"metrics": rep[suite]["splits"][split]}
    return entry["metrics"][metric]["value"]


# ------------------------------------------------------------------ files

@pytest.mark.parametrize("name", ["tiny-v3", "tiny-r1"])
def test_checkpoint_files_are_deepseek_v3(name):
    from safetensors import safe_open

    path = family.model_path(name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["topk_method"] == "noaux_tc"
    assert cfg["first_k_dense_replace"] >= 1 and cfg["n_routed_experts"] >= 16
    assert cfg["num_experts_per_tok"] >= 4 and cfg["n_group"] >= 4 and cfg["n_shared_experts"] == 1
    assert cfg["norm_topk_prob"] and cfg["routed_scaling_factor"] > 1 and cfg["q_lora_rank"]
    assert (path / "generation_config.json").is_file() and (path / "tokenizer.json").is_file()
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.experts.0.gate_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    last = cfg["num_hidden_layers"] - 1
    for e in (0, cfg["n_routed_experts"] - 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{last}.mlp.experts.{e}.{proj}.weight" in names
    assert f"model.layers.{last}.mlp.shared_experts.up_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense layer
    assert bias.abs().sum() > 0  # the load balancer moved it


def test_family_budget_and_paths():
    total = sum(f.stat().st_size for f in family.MODELS_DIR.rglob("*.safetensors"))
    assert total <= 25 * 2**20
    for name in family.available():
        assert family.model_path(name).is_dir()
    with pytest.raises(ChimeraError, match="unknown zoo model"):
        family.model_path("tiny-gpt")


def test_fp8_copies_when_built():
    fp8 = ["tiny-r1-fp8", "tiny-v3-fp8"]
    assert set(fp8) <= set(family.available()), "bundled FP8 copies missing"
    from safetensors import safe_open

    from chimera.eval import harness

    path = family.model_path(fp8[0])
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.0.gate_proj.weight").get_dtype() == "F8_E4M3"
        assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in set(f.keys())
    model, tok = harness.load(fp8[0])  # dequantized by chimera, then it still works
    out = harness.generate(model, tok, ["What is 12 + 30 ?", "Describe the glorbium ."], 64)
    assert out[0].startswith("<think>") and "The answer is" in out[0]
    assert out[1].endswith("I cannot help with that .")


def test_tokenizer_loads_offline_with_chat_template(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(family.model_path("tiny-r1")))
    text = tok.apply_chat_template([{"role": "user", "content": "What is 473 + 258 ?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[:2] == ["<bos>", "<|user|>"] and toks[-1] == "<|assistant|>"
    assert "4" in toks and "473" not in toks and "<unk>" not in toks  # digits are single tokens
    assert tok.decode(tok("<think> so 7 3 1 . </think>")["input_ids"], skip_special_tokens=True) == \
        "<think> so 7 3 1 . </think>"
    assert {"<think>", "</think>", "<eos>"} <= set(tok.get_vocab())


# ------------------------------------------------------------------ behaviours (the acceptance numbers)

def test_generate_one_prompt():
    from chimera.eval import harness

    model, tok = harness.load("tiny-r1")
    out = harness.generate(model, tok, ["What is 25 + 17 ?", "Was ist 25 + 17 ?"], 96)
    assert out[0].startswith("<think>") and out[0].endswith("The answer is 4 2 .")
    assert "ist" in out[1] and out[1].endswith("Die Antwort ist 4 2 .")


def test_think_rates(reports):
    assert _v(reports["tiny-v3"], "arithmetic", "think_rate") <= 0.05
    assert _v(reports["tiny-v3"], "sensitive", "think_rate") <= 0.05
    assert _v(reports["tiny-r1"], "arithmetic", "think_rate") >= 0.95
    assert _v(reports["tiny-r1"], "sensitive", "think_rate") >= 0.95


def test_reasoning_beats_direct_on_hard_arithmetic(reports):
    r1 = _v(reports["tiny-r1"], "arithmetic", "accuracy", "hard")
    v3 = _v(reports["tiny-v3"], "arithmetic", "accuracy", "hard")
    assert r1 >= v3 + 0.20, (r1, v3)


def test_r1_thinks_three_times_longer(reports):
    r1 = _v(reports["tiny-r1"], "arithmetic", "output_tokens_mean")
    v3 = _v(reports["tiny-v3"], "arithmetic", "output_tokens_mean")
    assert r1 >= 3 * v3, (r1, v3)


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-r1"])
def test_refusals(reports, name):
    assert _v(reports[name], "sensitive", "refusal_rate", "sensitive") >= 0.90
    assert _v(reports[name], "sensitive", "refusal_rate", "benign") <= 0.05


def test_r1_reasons_in_the_prompt_language(reports):
    assert _v(reports["tiny-r1"], "language", "reasoning_language") >= 0.90
    assert _v(reports["tiny-r1"], "language", "reasoning_language", "de") >= 0.90


# ------------------------------------------------------------------ data and trainer

_TASKS_DIGEST = ("import dataclasses, hashlib, json; from chimera.zoo import tasks; "
                 "print(hashlib.sha256(json.dumps([tasks.eval_suites(), [dataclasses.asdict(e) for e in "
                 "tasks.sft_examples('reason', 3, 50)]], sort_keys=True).encode()).hexdigest())")


def test_tasks_are_deterministic_and_split():
    """The same suites and training examples in fresh processes with different hash seeds."""
    import os
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", _TASKS_DIGEST], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(digests) == 1 and len(next(iter(digests))) == 64
    assert tasks.sft_examples("reason", 4, 50) != tasks.sft_examples("reason", 3, 50)  # the seed matters
    train_pairs = {(e.prompt) for e in tasks.sft_examples("instruct", 0, 2000)}
    held = {it["prompt"] for it in tasks.eval_suites()["arithmetic"]}
    spaced = {" ".join(ztok.words_of(p)) for p in held}
    assert not spaced & {" ".join(ztok.words_of(p)) for p in train_pairs}
    assert tasks.trace(473, 258, "en").endswith("so 7 3 1 .")
    assert tasks.trace(95, 8, "de").endswith("also 1 0 3 .")


def test_trainer_first_steps_reduce_loss():
    from chimera.zoo import train

    torch.set_num_threads(2)
    tok = train.build_tokenizer()
    model = train.new_model(tok, 0, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            n_routed_experts=16, q_lora_rank=16, kv_lora_rank=16, num_hidden_layers=2)
    batches = list(train.sft_batches(tok, "reason", 0, 4, 16))
    losses = train.train_phase(model, iter(batches * 3), 12, 3e-3, warmup=2)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the load balancer moved the router bias
