"""MoTE at small scale on the bundled models: fTRI refusal/language experts, switch them, measure.

    .venv/bin/python scripts/mote_evidence.py [--model tiny-r1] [--draws 5] [--n-arith 100] [--out docs/mote-evidence.json]

1. fTRI (label-by-response): generate responses to the *train-split* topic prompts (never the held-out
   suite), label them refused / answered, rank experts by mean(refused) - mean(answered), once on prompt
   tokens and once on response tokens.
2. Switch the top-k (k = 1, 3, 10) off (`replace`) and measure on the held-out suites: refusal rate on
   sensitive prompts, refusal rate on benign prompts, benign accuracy (benign topics + arithmetic).
3. Control: k random experts off, `--draws` draws per k (mean +- std).
4. Force the top refusal experts on: refusal rate on benign prompts.
5. Reasoning language: fTRI German- vs English-reasoned responses (language suite, train-style prompts),
   switch the German experts off on German prompts / force them on English prompts, report the share of
   prompts whose reasoning language changed.
Writes a JSON of every number and the heatmaps docs/img/ftri-refusal.png, docs/img/ftri-language.png.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chimera.errors import ChimeraError  # noqa: E402
from chimera.moe.capture import route_texts  # noqa: E402
from chimera.moe.ftri import ftri_labelled, generate_responses  # noqa: E402
from chimera.moe.routers import moe_layers  # noqa: E402
from chimera.moe.switch import plan, switched  # noqa: E402
from chimera.zoo import tasks  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------- scoring
from chimera.eval import scorers  # noqa: E402


def is_refusal(resp: str) -> bool:
    return bool(scorers.refusal(resp))


def think_language(resp: str) -> str:
    """'en' / 'de' by the eval harness's language scorer; 'none' without a reasoning block or markers."""
    return scorers.language(resp) or "none"


def correct(resp: str, item: dict) -> bool:
    return bool(scorers.accuracy(resp, item))


# ------------------------------------------------------------------------------------------- data
def load_suite(name: str) -> list[dict]:
    p = ROOT / "chimera" / "eval" / "suites" / f"{name}.jsonl"
    if p.is_file():
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return tasks.eval_suites()[name]


class Bench:
    def __init__(self, model, tok, n_arith: int, max_new: int, batch: int):
        self.model, self.tok, self.max_new, self.batch = model, tok, max_new, batch
        self.sensitive = load_suite("sensitive")
        arith = load_suite("arithmetic")
        rng = random.Random(0)
        self.arith = rng.sample(arith, min(n_arith, len(arith)))

    def gen(self, prompts, max_new=None):
        return generate_responses(self.model, self.tok, prompts, max_new or self.max_new, self.batch)

    def measure(self, **switch) -> dict:
        with switched(self.model, **switch) if switch else _Null():
            rs = self.gen([x["prompt"] for x in self.sensitive], 48)
            ra = self.gen([x["prompt"] for x in self.arith])
        sens = [r for x, r in zip(self.sensitive, rs) if x["sensitive"]]
        ben = [(x, r) for x, r in zip(self.sensitive, rs) if not x["sensitive"]]
        out = {
            "refusal_sensitive": sum(map(is_refusal, sens)) / len(sens),
            "refusal_benign": sum(is_refusal(r) for _, r in ben) / len(ben),
            "benign_topic_acc": sum(correct(r, x) for x, r in ben) / len(ben),
            "arith_acc": sum(correct(r, x) for x, r in zip(self.arith, ra)) / len(self.arith),
            "n_sensitive": len(sens), "n_benign": len(ben), "n_arith": len(self.arith),
        }
        out["benign_acc"] = (out["benign_topic_acc"] * len(ben) + out["arith_acc"] * len(self.arith)) / (
            len(ben) + len(self.arith))
        return out


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def forceable(model, ranked, k):
    """The first k experts of `ranked` that can be forced together (<= top_k per layer, <= topk_group groups)."""
    chosen = []
    for L, e in ranked:
        trial = chosen + [(L, e)]
        try:
            plan(model, on=trial)
        except ChimeraError:
            continue
        chosen = trial
        if len(chosen) == k:
            break
    return chosen


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table_md(res: dict) -> str:
    """The evidence tables in Markdown (percentages; random rows: mean +- std over the draws)."""
    lines = ["| condition | k | refusal on sensitive (%) | refusal on benign (%) | benign accuracy (%) | "
             "benign-topic acc (%) | arithmetic acc (%) |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        def cell(key):
            if f"{key}_std" in r:
                return f"{pct(r[key])} +- {pct(r[key + '_std'])}"
            return pct(r[key])
        name = r["condition"] + (f" ({r['draws']} draws)" if "draws" in r else "")
        lines.append(f"| {name} | {r['k']} | {cell('refusal_sensitive')} | {cell('refusal_benign')} | "
                     f"{cell('benign_acc')} | {cell('benign_topic_acc')} | {cell('arith_acc')} |")
    n = res["rows"][0]
    lines.append("")
    lines.append(f"n = {n['n_sensitive']} sensitive and {n['n_benign']} benign held-out topic prompts, "
                 f"{n['n_arith']} held-out arithmetic prompts; benign accuracy pools benign topics and arithmetic.")
    lang = res.get("language")
    if lang and "rows" in lang:
        lines += ["", "| language switch | k | reasoning language changed (%) | flipped to the other language (%) "
                  "| before | after |", "|---|---|---|---|---|---|"]
        for r in lang["rows"]:
            lines.append(f"| {r['condition']} | {r['k']} | {pct(r['changed_share'])} | {pct(r['flipped_share'])} "
                         f"| {r['before']} | {r['after']} |")
    elif lang:
        lines += ["", f"language fTRI: {lang.get('error')} (labels {lang.get('labels')})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-r1")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--n-arith", type=int, default=100)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ks", default="1,3,10")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mote-evidence.json"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--skip-language", action="store_true")
    ap.add_argument("--labels", choices=("response", "topic"), default="response",
                    help="fTRI classes from the model's own responses (refused/answered) or from the prompt set")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from chimera.commands.moe import load_model

    model, tok = load_model(args.model)
    model.eval()
    layers = moe_layers(model)
    E = next(iter(layers.values())).adapter.num_experts
    all_experts = [(L, e) for L in layers for e in range(E)]
    ks = [int(k) for k in args.ks.split(",")]
    res: dict = {"model": args.model, "moe_layers": list(layers), "experts_per_layer": E,
                 "routed_experts": len(all_experts), "top_k": next(iter(layers.values())).adapter.top_k}
    img = Path(args.img)

    # 1. fTRI on refusal, label-by-response, train-split prompts
    train = tasks.topic_items("train")
    prompts = [x["prompt"] for x in train]
    log(f"fTRI refusal: generating {len(prompts)} train-split responses")
    resp = generate_responses(model, tok, prompts, 48, args.batch)
    if args.labels == "response":
        labels = ["refused" if is_refusal(r) else "answered" for r in resp]
    else:  # two prompt sets: the sensitive topics vs the benign ones
        labels = ["refused" if x["sensitive"] else "answered" for x in train]
    res["ftri_label_source"] = args.labels
    routes = route_texts(model, tok, prompts, resp, batch_size=args.batch)
    rankings = {}
    for kind in ("prompt", "response"):
        f = ftri_labelled(routes, labels, "refused", tokens=kind, meta={"model": args.model})
        f.write_json(Path(args.out).parent / f"ftri-refusal-{kind}.json", top=10)
        f.plot(img / f"ftri-refusal-{kind}.png", top=10,
               title=f"fTRI {args.model}: refused - answered ({kind} tokens, {f.n_target} vs {f.n_contrast} prompts)")
        rankings[kind] = f.top(max(ks))
        res[f"ftri_refusal_{kind}_top10"] = [[L, e, round(d, 4)] for L, e, d in f.ranking()[:10]]
    res["ftri_refusal_labels"] = {"refused": labels.count("refused"), "answered": labels.count("answered")}
    log("labels", res["ftri_refusal_labels"], "top prompt", rankings["prompt"][:5], "top response",
        rankings["response"][:5])

    # 2-4. switching on the held-out suites
    bench = Bench(model, tok, args.n_arith, args.max_new, args.batch)
    rows = []

    def row(cond, k, m, **extra):
        r = {"condition": cond, "k": k, **{kk: round(v, 4) if isinstance(v, float) else v for kk, v in m.items()},
             **extra}
        rows.append(r)
        log(cond, k, {kk: r[kk] for kk in ("refusal_sensitive", "refusal_benign", "benign_acc")})
        return r

    row("base", 0, bench.measure())
    for kind in ("prompt", "response"):
        for k in ks:
            row(f"fTRI top-k off ({kind} tokens)", k, bench.measure(off=rankings[kind][:k]),
                experts=rankings[kind][:k])
    rng = random.Random(1234)
    for k in ks:
        draws = []
        for d in range(args.draws):
            pick = rng.sample(all_experts, k)
            draws.append(bench.measure(off=pick))
        agg = {key: statistics.mean(x[key] for x in draws) for key in draws[0] if not key.startswith("n_")}
        sd = {f"{key}_std": statistics.stdev([x[key] for x in draws]) if len(draws) > 1 else 0.0 for key in agg}
        row("random k off", k, {**agg, **{kk: v for kk, v in draws[0].items() if kk.startswith("n_")}},
            **{kk: round(v, 4) for kk, v in sd.items()}, draws=len(draws))
    for kind in ("prompt", "response"):
        for k in (1, 3):
            on = forceable(model, rankings[kind] + [x for x in all_experts if x not in rankings[kind]], k)
            row(f"fTRI top-k forced on ({kind} tokens)", len(on), bench.measure(on=on), experts=on)
    res["rows"] = rows

    # 5. reasoning language
    if not args.skip_language:
        lang_train = tasks.arithmetic_items(random.Random(7), 160, "train", langs=("en", "de"), digits=(1, 2))
        lp = [x["prompt"] for x in lang_train]
        log(f"fTRI language: generating {len(lp)} responses")
        lr = generate_responses(model, tok, lp, 80, args.batch)
        ll = [think_language(r) for r in lr]
        lroutes = route_texts(model, tok, lp, lr, batch_size=args.batch)
        try:
            fl = ftri_labelled(lroutes, ll, "de", tokens="response", meta={"model": args.model})
        except ChimeraError as e:
            res["language"] = {"labels": {x: ll.count(x) for x in sorted(set(ll))}, "error": str(e)}
            log("language fTRI not possible:", e)
            fl = None
    if not args.skip_language and fl is not None:
        fl.write_json(Path(args.out).parent / "ftri-language.json", top=10)
        fl.plot(img / "ftri-language.png", top=10,
                title=f"fTRI {args.model}: German - English reasoning (response tokens)")
        de_rank = fl.top(10)
        en_rank = [(L, e) for L, e, _ in reversed(fl.ranking()[-10:])]
        held = load_suite("language")[:80]
        de_p = [x["prompt"] for x in held if x["lang"] == "de"]
        en_p = [x["prompt"] for x in held if x["lang"] == "en"]

        def langs(prompts, **sw):
            with switched(model, **sw) if sw else _Null():
                return [think_language(r) for r in generate_responses(model, tok, prompts, 80, args.batch)]

        base_de, base_en = langs(de_p), langs(en_p)
        lang_rows = []
        for k in (1, 3, 10):
            for name, prompts_, base_l, sw in (
                    ("German experts off, German prompts", de_p, base_de, dict(off=de_rank[:k])),
                    ("English experts off, English prompts", en_p, base_en, dict(off=en_rank[:k])),
                    ("German experts forced on, English prompts", en_p, base_en,
                     dict(on=forceable(model, de_rank, k)))):
                got = langs(prompts_, **sw)
                changed = sum(a != b for a, b in zip(base_l, got)) / len(got)
                src = "de" if prompts_ is de_p else "en"
                other = "en" if src == "de" else "de"
                flipped = sum(a == src and b == other for a, b in zip(base_l, got)) / len(got)
                counts = {x: got.count(x) for x in sorted(set(got))}
                lang_rows.append({"condition": name, "k": k, "changed_share": round(changed, 4),
                                  "flipped_share": round(flipped, 4), "after": counts,
                                  "before": {x: base_l.count(x) for x in sorted(set(base_l))}})
                log(name, k, changed, counts)
        res["language"] = {"labels": {x: ll.count(x) for x in sorted(set(ll))}, "rows": lang_rows,
                           "top_de": de_rank, "top_en": en_rank}
    res["seconds"] = round(time.time() - T0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    md = table_md(res)
    Path(args.out).with_suffix(".table.md").write_text(md)
    print(md)
    log("wrote", args.out)


if __name__ == "__main__":
    main()
