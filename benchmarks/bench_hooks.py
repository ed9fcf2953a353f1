"""Generation tokens/s with and without live expert switches (forward hooks on the routers). Not a test.

    .venv/bin/python benchmarks/bench_hooks.py [MODEL_DIR_OR_ZOO_NAME] [--tokens 64] [--batch 4] [--reps 5]

Without a model it uses tiny-r1 when built, else a random model of the zoo architecture (DeepSeek-V3
layout: 3 MoE layers x 32 experts). Runs are interleaved (base, replace, drop, force, ...) and the median is
reported, since the CPU is shared. Writes benchmarks/results/hooks.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(name: str | None):
    import transformers as tf

    if name:
        from chimera.commands.moe import load_model

        m, _ = load_model(name)
        return m.eval(), name
    try:
        from chimera.zoo.family import available, model_path

        if "tiny-r1" in available():
            return tf.AutoModelForCausalLM.from_pretrained(model_path("tiny-r1")).eval(), "tiny-r1"
    except ImportError:
        pass
    from chimera.zoo.family import config

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config(vocab_size=512, pad_id=0, bos_id=1, eos_id=2)).eval(), \
        "random zoo-architecture DeepSeek-V3 (3 MoE layers x 32 experts)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--n-off", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from chimera.moe.routers import moe_layers
    from chimera.moe.switch import switched

    model, label = load(args.model)
    layers = moe_layers(model)
    E = next(iter(layers.values())).adapter.num_experts
    g = torch.Generator().manual_seed(0)
    pairs = [(L, e) for L in layers for e in range(E)]
    pick = torch.randperm(len(pairs), generator=g)[: args.n_off].tolist()
    off = [pairs[i] for i in pick]
    on = [(next(iter(layers)), E - 1)]
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
    eos = None

    def run():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)
        dt = time.perf_counter() - t
        return (out.shape[1] - ids.shape[1]) * ids.shape[0] / dt

    conds = {"base": {}, "replace": dict(off=off), "drop": dict(off=off, mode="drop"), "force": dict(on=on)}
    run()  # warm-up
    rates = {c: [] for c in conds}
    for _ in range(args.reps):
        for c, kw in conds.items():
            if kw:
                with switched(model, **kw):
                    rates[c].append(run())
            else:
                rates[c].append(run())
    med = {c: statistics.median(v) for c, v in rates.items()}
    best = {c: max(v) for c, v in rates.items()}
    # the hook's own cost, free of scheduling noise: one re-selection per MoE layer and decode step
    hook_us = {}
    for c, kw in conds.items():
        if not kw:
            continue
        from chimera.moe.switch import plan

        p = plan(model, **kw)
        logits = torch.randn(args.batch, E)
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            for layer, (info, o, f) in p.items():
                info.adapter.select(logits, o, f, kw.get("mode", "replace"))
        hook_us[c] = (time.perf_counter() - t) / n * 1e6
    step_us = 1e6 * args.batch / best["base"]
    res = {
        "model": label, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "batch": args.batch, "new_tokens": args.tokens,
        "prompt_len": args.prompt_len, "reps": args.reps, "n_off": len(off), "moe_layers": len(layers),
        "experts_per_layer": E,
        "tokens_per_s_median": {c: round(v, 1) for c, v in med.items()},
        "tokens_per_s_best": {c: round(v, 1) for c, v in best.items()},
        "hook_us_per_decode_step": {c: round(v, 1) for c, v in hook_us.items()},
        "decode_step_us_best_base": round(step_us, 1),
        "hook_cost_pct_of_step": {c: round(100 * v / step_us, 2) for c, v in hook_us.items()},
        "tokens_per_s_all": {c: [round(x, 1) for x in v] for c, v in rates.items()},
        "overhead_pct_vs_base_median": {c: round(100 * (1 - med[c] / med["base"]), 2) for c in conds if c != "base"},
        "overhead_pct_vs_base_best": {c: round(100 * (1 - best[c] / best["base"]), 2) for c in conds if c != "base"},
    }
    out = ROOT / "benchmarks" / "results" / "hooks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
