"""`chimera demo`: the main job on the bundled models, end to end, in a few minutes on 2 CPU cores.

1. Assembly of Experts: the R1T recipe (tiny-v3 as base, routed experts from tiny-r1) on the bundled
   FP8 copies: plan, merge, and a byte-level check of what came from where.
2. Behaviour: the harness scores both parents and the child (think rate, accuracy, output tokens,
   refusals) on held-out prompts.
3. Mixture of Tunable Experts: fTRI ranks tiny-r1's refusal experts; switching the top ones off
   changes the refusal rate (when the MoTE wing is installed).
"""
from __future__ import annotations

import time
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

console = Console()


def _parents(out: Path) -> tuple[Path, Path, bool]:
    """(base, donor, bundled?): the bundled FP8 (or bf16) tiny-v3/tiny-r1, else two generated parents."""
    from chimera.zoo import family

    have = family.available()
    for a, b in (("tiny-v3-fp8", "tiny-r1-fp8"), ("tiny-v3", "tiny-r1")):
        if a in have and b in have:
            return family.model_path(a), family.model_path(b), True
    console.print("[yellow]bundled models not built: generating two small DeepSeek-format parents[/]")
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


def _provenance(child: Path, a: Path, b: Path) -> Table:
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
    t = Table(title="what came from where (byte-identical stored tensors, scales included)")
    for c in ("class", f"= {a.name} only", f"= {b.name} only", "= both (parents equal)", "neither"):
        t.add_column(c)
    for cls, c in sorted(counts.items()):
        t.add_row(cls, str(c["base"]), str(c["donor"]), str(c["both"]), str(c["neither"]))
    return t


def demo(out: Path = typer.Option(Path("demo-out"), "-o", "--out", help="where the demo writes"),
         n: int = typer.Option(24, "--n", help="held-out prompts per suite for the evaluation"),
         skip_eval: bool = typer.Option(False, "--skip-eval")) -> None:
    """Run the demo: an R1T-style merge of the bundled models, its provenance, and its behaviour."""
    from chimera.merge.execute import run_merge
    from chimera.merge.plan import build_plan
    from chimera.merge.recipe import load
    from chimera.merge.report import plan_report

    out.mkdir(parents=True, exist_ok=True)
    a, b, bundled = _parents(out)
    console.rule("[bold]1. Assembly of Experts: the R1T recipe")
    recipe = {"parents": {"v3": str(a.resolve()), "r1": str(b.resolve())}, "base": "v3",
              "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}, "output": {"dtype": "keep"}}
    rp = out / "r1t.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    console.print(f"recipe {rp}:\n[dim]{rp.read_text()}[/]")
    plan = build_plan(load(rp))
    rep = plan_report(plan)
    t = Table(title=f"plan: {len(plan.items)} tensors, {len(plan.jobs)} shard(s)")
    for c in ("class", "tensors", "operation", "lambdas"):
        t.add_column(c)
    for row in rep["rows"]:
        t.add_row(row["class"], str(row["tensors"]), row["op"], row["lambdas"])
    console.print(t)
    child = out / "tiny-r1t"
    t0 = time.perf_counter()
    run_merge(plan, child, force=True)
    console.print(f"merged into {child} in {time.perf_counter() - t0:.2f}s")
    console.print(_provenance(child, a, b))
    if skip_eval or not bundled:
        return
    console.rule("[bold]2. Behaviour of the parents and the child (held-out prompts)")
    from chimera.eval.harness import evaluate, load as load_model

    rows = []
    for name, path in (("tiny-v3", a), ("tiny-r1", b), ("tiny-r1t (child)", child)):
        model, tok = load_model(path)
        t0 = time.perf_counter()
        r = evaluate(model, tok, ["arithmetic", "sensitive"], n=n)
        rows.append((name, r, time.perf_counter() - t0))
    t = Table(title=f"evaluation, {n} prompts per suite (95% CI in brackets)")
    for c in ("model", "arithmetic accuracy", "think rate", "mean output tokens", "refusal: sensitive topics",
              "refusal: benign topics"):
        t.add_column(c)

    def fmt(m: dict | None) -> str:
        if not m:
            return "-"
        return f"{m['value']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"

    for name, r, dt in rows:
        ar, sp = r["arithmetic"]["metrics"], r["sensitive"]["splits"]
        t.add_row(name, fmt(ar.get("accuracy")), fmt(ar.get("think_rate")), fmt(ar.get("output_tokens_mean")),
                  fmt(sp.get("sensitive", {}).get("refusal_rate")), fmt(sp.get("benign", {}).get("refusal_rate")))
    console.print(t)
    _mote(b, n)


def _mote(r1: Path, n: int) -> None:
    """Switch tiny-r1's top fTRI refusal experts off (live hooks) and measure refusals again."""
    import json

    ranking = Path(__file__).resolve().parents[2] / "docs" / "mote-evidence.json"
    if not ranking.is_file():
        return
    console.rule("[bold]3. Mixture of Tunable Experts: tiny-r1's refusal experts switched off")
    from chimera.eval.harness import evaluate, load as load_model
    from chimera.moe.switch import switched

    ev = json.loads(ranking.read_text())
    off = [(L, e) for L, e, _ in ev["ftri_refusal_response_top10"]]
    model, tok = load_model(r1.parent / "tiny-r1" if (r1.parent / "tiny-r1").is_dir() else r1)
    t = Table(title=f"fTRI top-10 refusal experts (of {ev['routed_experts']}) off, from {ranking.name}")
    for c in ("condition", "refusal: sensitive", "refusal: benign", "benign-topic accuracy"):
        t.add_column(c)
    for name, experts in (("tiny-r1", []), ("tiny-r1, 10 experts off (replace)", off)):
        with switched(model, off=experts, mode="replace"):
            sp = evaluate(model, tok, "sensitive", n=None)["sensitive"]["splits"]
        t.add_row(name, f"{sp['sensitive']['refusal_rate']['value']:.2f}", f"{sp['benign']['refusal_rate']['value']:.2f}",
                  f"{sp['benign'].get('accuracy', {}).get('value', float('nan')):.2f}")
    console.print(t)
    console.print(f"experts switched off (layer:expert): {', '.join(f'{L}:{e}' for L, e in off)}; "
                  "full evidence with random controls: docs/mote-evidence.md")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
