"""Expert pruning on the bundled family: REAP vs frequency vs random, 25% and 50% of routed experts removed.

    .venv/bin/python scripts/prune_evidence.py [--model tiny-r1] [--draws 3] [--n-arith 100] [--out docs/pruning.json]

1. Calibration: the model's own greedy answers to *train-split* prompts (topic questions and column additions,
   never the held-out suites), teacher-forced through the model with expert output norms recorded
   (`chimera.moe.prune.capture_routes`): REAP saliency and selection frequency per expert.
2. For each fraction (25%, 50%) and method (REAP, frequency, random x `--draws` seeds) keep the best experts of
   every group (group-limited routing stays valid) and write a pruned checkpoint with `prune_checkpoint`.
3. Evaluate every checkpoint on the held-out suites with the eval harness: arithmetic accuracy, `<think>` rate,
   refusal rate on sensitive prompts and on benign ones, benign-topic accuracy.
Writes the JSON of every number, docs/pruning.md's table (printed) and the plot docs/img/pruning.png.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chimera.checkpoint.files import Checkpoint  # noqa: E402
from chimera.eval import harness, suites  # noqa: E402
from chimera.moe import prune as P  # noqa: E402
from chimera.zoo import tasks  # noqa: E402

T0 = time.time()
METRICS = ("arith_acc", "think_rate", "refusal_sensitive", "refusal_benign", "benign_acc")
LABELS = {"arith_acc": "arithmetic accuracy", "think_rate": "<think> rate (all prompts)",
          "refusal_sensitive": "refusal on sensitive prompts", "refusal_benign": "refusal on benign prompts",
          "benign_acc": "benign-topic accuracy"}


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


def calibration_prompts(n_topic: int = 256, n_arith: int = 64) -> list[str]:
    """A seeded sample of train-split prompts (disjoint from every held-out prompt the pruned models are
    measured on): `n_topic` topic questions, `n_arith` sums."""
    rng = random.Random(11)
    pairs = rng.sample(tasks.topic_pairs("train"), n_topic)
    topics = [tasks.topic_item(t, lang, tpl)["prompt"] for t, lang, tpl in pairs]
    arith = [tasks.train_item(rng, p_arith=1.0)["prompt"] for _ in range(n_arith)]
    return topics + arith


def measure(model_dir: Path, arith: list[dict], sens: list[dict], max_new: int, batch: int) -> dict:
    model, tok = harness.load(model_dir)
    ra = harness.generate(model, tok, [x["prompt"] for x in arith], max_new, batch_size=batch)
    rs = harness.generate(model, tok, [x["prompt"] for x in sens], 64, batch_size=batch)
    from chimera.eval import scorers

    sensitive = [r for x, r in zip(sens, rs) if x.get("sensitive")]
    benign = [(x, r) for x, r in zip(sens, rs) if not x.get("sensitive")]
    allr = ra + rs
    return {"arith_acc": sum(bool(scorers.accuracy(r, x)) for x, r in zip(arith, ra)) / len(arith),
            "think_rate": sum(scorers.think(r) for r in allr) / len(allr),
            "refusal_sensitive": sum(scorers.refusal(r) for r in sensitive) / len(sensitive),
            "refusal_benign": sum(scorers.refusal(r) for _, r in benign) / len(benign),
            "benign_acc": sum(bool(scorers.accuracy(r, x)) for x, r in benign) / len(benign),
            "n_arith": len(arith), "n_sensitive": len(sensitive), "n_benign": len(benign),
            "example": ra[0]}


def table_md(res: dict) -> str:
    head = "| pruned | method | " + " | ".join(LABELS[m] + " (%)" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for r in res["rows"]:
        cells = []
        for m in METRICS:
            v = 100 * r[m]
            cells.append(f"{v:.1f} +- {100 * r[m + '_std']:.1f}" if f"{m}_std" in r else f"{v:.1f}")
        name = r["method"] + (f" ({r['draws']} draws)" if "draws" in r else "")
        lines.append(f"| {r['pruned']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("arith_acc", "think_rate", "refusal_sensitive", "benign_acc")
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6))
    base = next(r for r in res["rows"] if r["method"] == "none")
    for ax, m in zip(axes, shown):
        for method, style in (("REAP", "o-"), ("frequency", "s-"), ("random", "^--")):
            rows = [base] + [r for r in res["rows"] if r["method"] == method]
            xs = [r["fraction"] * 100 for r in rows]
            ys = [100 * r[m] for r in rows]
            err = [100 * r.get(m + "_std", 0.0) for r in rows]
            ax.errorbar(xs, ys, yerr=err if method == "random" else None, fmt=style, capsize=3, label=method)
        ax.set_title(LABELS[m], fontsize=9)
        ax.set_xlabel("routed experts pruned (%)")
        ax.set_xticks([0, 25, 50])
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Expert pruning of {res['model']} ({res['experts_per_layer']} routed experts x "
                 f"{len(res['moe_layers'])} MoE layers); random: mean +- std over {res['draws']} draws", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-r1")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--n-arith", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--n-calibration", type=int, default=256, help="train-split topic questions (plus 64 sums)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "pruning.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "pruning.png"))
    args = ap.parse_args()

    src = harness.resolve_model(args.model)
    layout = P.read_layout(Checkpoint(src))
    E = next(iter(layout.experts.values()))
    arith = suites.sample(suites.load("arithmetic"), args.n_arith)
    sens = suites.load("sensitive")
    cal = calibration_prompts(args.n_calibration)
    log(f"{args.model}: {len(layout.decoder_moe)} MoE layers x {E} experts, n_group {layout.n_group}; "
        f"calibration on {len(cal)} train-split prompts")
    model, tok = harness.load(src)
    routes = P.capture_routes(model, tok, cal, max_new_tokens=96, batch_size=args.batch)
    reap, freq = P.scores_from_routes(routes, "reap"), P.scores_from_routes(routes, "frequency")
    del model
    log(f"captured {int(sum(routes.tokens[k].sum() for k in routes.tokens))} tokens")

    rows = [{"method": "none", "pruned": "0%", "fraction": 0.0, **measure(src, arith, sens, args.max_new_tokens,
                                                                         args.batch)}]
    log("base", {k: rows[0][k] for k in METRICS})
    tmp = Path(tempfile.mkdtemp(prefix="chimera-prune-evidence-"))
    kept_sets = {}
    try:
        for frac in (float(f) for f in args.fractions.split(",")):
            n_keep = E - round(E * frac)
            label = f"{round(100 * frac)}%"
            plans = [("REAP", reap, None), ("frequency", freq, None)] + \
                    [("random", P.random_scores(layout, seed), seed) for seed in range(args.draws)]
            draws = []
            for method, scores, seed in plans:
                keep = P.select_keep(scores, n_keep, layout.n_group)
                kept_sets[f"{label} {method}" + (f" seed {seed}" if seed is not None else "")] = \
                    {str(L): v for L, v in keep.items()}
                out = tmp / f"{method}-{frac}-{seed}"
                P.prune_checkpoint(src, out, keep)
                m = measure(out, arith, sens, args.max_new_tokens, args.batch)
                shutil.rmtree(out)
                log(label, method, seed if seed is not None else "", {k: round(m[k], 3) for k in METRICS})
                if method == "random":
                    draws.append(m)
                else:
                    rows.append({"method": method, "pruned": label, "fraction": frac, "kept_per_layer": n_keep, **m})
            agg = {"method": "random", "pruned": label, "fraction": frac, "kept_per_layer": n_keep,
                   "draws": len(draws)}
            for k in METRICS:
                vals = [d[k] for d in draws]
                agg[k] = statistics.mean(vals)
                agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                agg[k + "_draws"] = vals
            rows.append(agg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"model": args.model, "moe_layers": layout.decoder_moe, "experts_per_layer": E, "n_group": layout.n_group,
           "top_k": layout.top_k, "draws": args.draws, "n_calibration_prompts": len(cal),
           "max_new_tokens": args.max_new_tokens, "seconds": round(time.time() - T0),
           "saliency": {"reap": {str(L): [round(float(x), 6) for x in s] for L, s in reap.items()},
                        "frequency": {str(L): [round(float(x), 6) for x in s] for L, s in freq.items()}},
           "kept": kept_sets, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    plot(res, Path(args.plot))
    print(table_md(res))
    log(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
