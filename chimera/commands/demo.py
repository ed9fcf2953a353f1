"""`chimera demo`: the main job on the bundled models, end to end, in a few minutes on 2 CPU cores.

1. Assembly of Experts: the R1T recipe (tiny-v3 as base, routed experts from tiny-r1) on the bundled
   FP8 copies: plan, merge, and a byte-level check of what came from where.
2. Reasoning: the harness scores both parents and the child (accuracy, think rate, output tokens) on
   held-out arithmetic prompts.
3. Mixture of Tunable Experts: fTRI ranks tiny-r1's refusal experts; the demo measures what switching
   the top ones off does to the refusal rate (on family v2: nothing, see docs/mote-evidence.md). Refusals are reported once, here, on the full sensitive suite: step 2 is
   about reasoning (accuracy, <think>, length).

Results go to stdout; progress (merge bytes, model loading, generation) to stderr when it is a terminal.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from chimera.commands import ui


def _parents(out: Path) -> tuple[Path, Path, bool]:
    """(base, donor, bundled?): the bundled FP8 (or bf16) tiny-v3/tiny-r1, else two generated parents."""
    from chimera.zoo import family

    have = family.available()
    for a, b in (("tiny-v3-fp8", "tiny-r1-fp8"), ("tiny-v3", "tiny-r1")):
        if a in have and b in have:
            return family.model_path(a), family.model_path(b), True
    ui.out().print("[yellow]bundled models not built: generating two small DeepSeek-format parents[/]")
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=300, hidden_size=200, intermediate_size=300, moe_intermediate_size=136,
                           num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
                           n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                           qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4, num_key_value_heads=4)
    for i, name in enumerate(("parent-a", "parent-b")):
        torch.manual_seed(i)
        DeepseekV3ForCausalLM(cfg).save_pretrained(out / name)
    return out / "parent-a", out / "parent-b", False


def _provenance(child: Path, a: Path, b: Path):
    """Per tensor class: how many tensors are byte-identical to which parent."""
    from chimera.checkpoint.arch import classify
    from chimera.checkpoint.files import SCALE_SUFFIX, Checkpoint

    cc, ca, cb = Checkpoint(child), Checkpoint(a), Checkpoint(b)

    def raw(ck: Checkpoint, name: str) -> bytes:
        info = ck.tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            return f.read(info.nbytes)

    counts: dict[str, dict[str, int]] = {}
    for name in cc.tensors:
        logical = name[: -len(SCALE_SUFFIX)] + ".weight" if name.endswith(SCALE_SUFFIX) else name
        cls = classify(logical, cc.config) or "?"
        data = raw(cc, name)
        in_a, in_b = data == raw(ca, name), data == raw(cb, name)
        src = "both" if in_a and in_b else "base" if in_a else "donor" if in_b else "neither"
        counts.setdefault(cls, {"base": 0, "donor": 0, "both": 0, "neither": 0})[src] += 1
    t = ui.table(f"what came from where: stored tensors byte-identical to base {a.name}, donor {b.name}",
                 ["class", "base only", "donor only", "both", "neither"],
                 right=("base only", "donor only", "both", "neither"))
    for cls, c in sorted(counts.items()):
        t.add_row(cls, str(c["base"]), str(c["donor"]), str(c["both"]), str(c["neither"]))
    return t


def demo(out: Path = typer.Option(Path("demo-out"), "-o", "--out", help="where the demo writes"),
         n: int = typer.Option(24, "--n", help="held-out arithmetic prompts per model in step 2 (step 3 uses the whole sensitive suite)"),
         skip_eval: bool = typer.Option(False, "--skip-eval")) -> None:
    """Run the demo: an R1T-style merge of the bundled models, its provenance, and its behaviour."""
    import yaml

    from chimera.merge.execute import run_merge
    from chimera.merge.recipe import load

    ui.positive(n, "--n")
    ui.output_dir(out, "-o")
    out.mkdir(parents=True, exist_ok=True)
    a, b, bundled = _parents(out)
    console = ui.out()
    console.rule("[bold]1. Assembly of Experts: the R1T recipe")
    names = (a.name, b.name) if bundled else (str(a.resolve()), str(b.resolve()))  # bundled names work in recipes
    recipe = {"parents": {"v3": names[0], "r1": names[1]}, "base": "v3",
              "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}, "output": {"dtype": "keep"}}
    rp = out / "r1t.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    console.print(f"recipe {rp}:\n[dim]{rp.read_text()}[/]")
    r = load(rp)
    from chimera.merge.plan import build_plan
    from chimera.merge.report import plan_report

    plan = build_plan(r)
    rep = plan_report(plan)
    t = ui.table(f"plan: {len(plan.items)} tensors, {len(plan.jobs)} shard(s)",
                 ["class", "tensors", "operation", "lambdas"], right=("tensors",))
    for row in rep["rows"]:
        t.add_row(row["class"], str(row["tensors"]), row["op"], row["lambdas"])
    console.print(t)
    child = out / "tiny-r1t"
    t0 = time.perf_counter()
    with ui.task("merge", total=sum(j.nbytes for j in plan.jobs), nbytes=True) as advance:
        run_merge(plan, child, force=True, on_bytes=advance)
    console.print(f"merged into {child} in {time.perf_counter() - t0:.2f}s")
    console.print(_provenance(child, a, b))
    if skip_eval or not bundled:
        return
    console.rule("[bold]2. Reasoning of the parents and the child (held-out arithmetic)")
    rows = [(name, _evaluate(name, path, "arithmetic", n)["arithmetic"]["metrics"])
            for name, path in (("tiny-v3", a), ("tiny-r1", b), ("tiny-r1t (child)", child))]
    t = ui.table(f"arithmetic, {n} held-out prompts per model (95% CI)",
                 ["model", "accuracy", "think rate", "mean output tokens"])
    for name, m in rows:
        t.add_row(name, _pct(m.get("accuracy")), _pct(m.get("think_rate")), _num(m.get("output_tokens_mean")))
    console.print(t)
    _mote(b)


def _pct(m: dict | None) -> str:
    return "-" if not m else f"{100 * m['value']:.0f}% [{100 * m['lo']:.0f}, {100 * m['hi']:.0f}]"


def _num(m: dict | None) -> str:
    return "-" if not m else f"{m['value']:.1f} [{m['lo']:.1f}, {m['hi']:.1f}]"


def _evaluate(label: str, model, suite: str, n: int | None, off=()) -> dict:
    """Score one suite with a progress bar; `model` is a path (loaded here) or a loaded (model, tokenizer)."""
    from chimera.eval.harness import evaluate, load, planned
    from chimera.moe.switch import switched

    if isinstance(model, (str, Path)):
        with ui.status(f"loading {label}"):
            model = load(model)
    m, tok = model
    with ui.progress() as bar:
        t = bar.add_task(f"eval {label}", total=sum(len(v) for v in planned(suite, n).values()))
        with switched(m, off=list(off), mode="replace"):
            return evaluate(m, tok, suite, n=n, progress=lambda s, done, total: bar.update(t, completed=done))


def _mote(r1: Path) -> None:
    """tiny-r1's refusals on the whole sensitive suite, then with its top fTRI refusal experts switched off."""
    import json

    ranking = Path(__file__).resolve().parents[2] / "docs" / "mote-evidence.json"
    if not ranking.is_file():
        return
    console = ui.out()
    console.rule("[bold]3. Mixture of Tunable Experts: tiny-r1's refusal experts switched off")
    from chimera.eval.harness import load

    ev = json.loads(ranking.read_text())
    off = [(L, e) for L, e, _ in ev["ftri_refusal_response_top10"]]
    bf16 = r1.parent / "tiny-r1"
    path = bf16 if bf16.is_dir() else r1  # the ranking was computed on the bf16 tiny-r1
    with ui.status(f"loading {path.name}"):
        loaded = load(path)
    rows = [(name, _evaluate(name, loaded, "sensitive", None, experts)["sensitive"])
            for name, experts in ((path.name, []), (f"{path.name}, 10 experts off", off))]
    sp = rows[0][1]["splits"]
    t = ui.table(f"refusal on the sensitive suite ({sp['sensitive']['refusal_rate']['n']} sensitive, "
                 f"{sp['benign']['refusal_rate']['n']} benign prompts; 95% CI); fTRI top 10 of "
                 f"{ev['routed_experts']} experts from {ranking.name}",
                 ["model", "refusal: sensitive", "refusal: benign", "benign accuracy"])
    for name, r in rows:
        s_, b_ = r["splits"]["sensitive"], r["splits"]["benign"]
        t.add_row(name, _pct(s_.get("refusal_rate")), _pct(b_.get("refusal_rate")), _pct(b_.get("accuracy")))
    console.print(t)
    console.print(f"experts switched off (layer:expert): {', '.join(f'{L}:{e}' for L, e in off)}; "
                  "full evidence with random controls: docs/mote-evidence.md")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
