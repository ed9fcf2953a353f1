"""The Chimera report: AoE's behaviour map, redrawn on chimera's bundled tiny models.

    .venv/bin/python scripts/chimera_report.py [--n 40] [--workers 2] [--out docs/report]

Runs five sweeps with `chimera.sweep.run_sweep` (resumable: sweep directories live in --work) and
writes docs/report/: table.csv / table.json (every row, with a `sweep` column), the PNG plots,
README.md (the analysis; every number in it comes from a row of the table) and a self-contained
index.html.

1. routed-experts-only sweep tiny-v3 -> tiny-r1 (the R1T family), refined around the <think> switch;
2. the R1T child (routed experts from tiny-r1, everything else from tiny-v3) against both parents;
3. the whole-model sweep (every class) against routed-only, at equal accuracy;
4. threshold delta on a whole-model child that thinks: tensors merged at each delta and behaviour;
   and which tensor classes carry the behaviour (one class swapped between the parents at a time);
5. three parents (tiny-v3, tiny-r1, tiny-r1-long), when tiny-r1-long is bundled.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chimera import report as rp  # noqa: E402
from chimera.sweep import run_sweep, write_table  # noqa: E402
from chimera.zoo import family  # noqa: E402


def _num(v):
    return rp._num(v)


def pct(v) -> str:
    v = _num(v)
    return "-" if v is None else f"{100 * v:.0f}%"


def ci(r: dict, m: str) -> str:
    return rp.fmt_metric(m, r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi"))


def write_recipe(path: Path, parents: dict[str, Path], weights: dict, threshold: dict | None = None) -> Path:
    import yaml

    d = {"parents": {k: str(v) for k, v in parents.items()}, "base": "v3", "weights": weights}
    if threshold:
        d["threshold"] = threshold
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def seed_parents(src: Path, dst: Path) -> None:
    """Parents' results are the same in every sweep with the same settings: reuse them."""
    (dst / "points").mkdir(parents=True, exist_ok=True)
    for f in (src / "points").glob("parent-*.json"):
        if not (dst / "points" / f.name).exists():
            shutil.copyfile(f, dst / "points" / f.name)


def grid(start: float, stop: float, step: float) -> list[float]:
    k = int(math.floor((stop - start) / step + 1e-6))
    return [round(start + i * step, 6) for i in range(k + 1)]


def vals(xs) -> str:
    return ",".join(f"{x:g}" for x in sorted(set(xs)))


def plot_switch(series: list[tuple[str, list[dict], str]], parents: list[dict], path: Path) -> None:
    """<think> rate and accuracy vs lambda_r1 for several sweeps on one figure."""
    plt = rp._plt()
    fig, axs = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, m in zip(axs, ("think_rate", "accuracy", "output_tokens_mean")):
        for label, rows, axis in series:
            rs = sorted((r for r in rp.children(rows) if _num(r.get(m)) is not None), key=lambda r: _num(r[axis]))
            if not rs:
                continue
            x = [_num(r[axis]) for r in rs]
            y = [_num(r[m]) for r in rs]
            lo = [max(0.0, yy - (_num(r.get(f"{m}_lo")) or yy)) for yy, r in zip(y, rs)]
            hi = [max(0.0, (_num(r.get(f"{m}_hi")) or yy) - yy) for yy, r in zip(y, rs)]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=label)
        for i, p in enumerate(parents):
            if _num(p.get(m)) is not None:
                ax.axhline(_num(p[m]), ls="--", lw=1, color=rp._PARENT_STYLE[i % 4][0], label=f"parent {p['label']}")
        ax.set_xlabel("lambda of tiny-r1")
        ax.set_title(rp.LABELS[m])
        if m in rp.RATES:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_threshold(rows: list[dict], path: Path) -> None:
    plt = rp._plt()
    rs = sorted(rp.children(rows), key=lambda r: _num(r["threshold.delta"]))
    x = [_num(r["threshold.delta"]) for r in rs]
    fig, axs = plt.subplots(1, 3, figsize=(14, 3.8))
    axs[0].plot(x, [r["tensors_mixed"] for r in rs], "o-", label="mixed (lambda 0.5)")
    axs[0].plot(x, [r["tensors_from_base"] for r in rs], "s-", label="from base (tiny-v3)")
    axs[0].set_title("tensors merged at each delta")
    axs[0].legend(fontsize=8)
    for ax, m in zip(axs[1:], ("accuracy", "think_rate")):
        y = [_num(r.get(m)) for r in rs]
        lo = [max(0.0, yy - (_num(r.get(f"{m}_lo")) or yy)) if yy is not None else 0 for yy, r in zip(y, rs)]
        hi = [max(0.0, (_num(r.get(f"{m}_hi")) or yy) - yy) if yy is not None else 0 for yy, r in zip(y, rs)]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=2)
        for i, p in enumerate(rp.parents(rows)):
            if _num(p.get(m)) is not None:
                ax.axhline(_num(p[m]), ls="--", lw=1, color=rp._PARENT_STYLE[i % 4][0], label=f"parent {p['label']}")
        ax.set_title(rp.LABELS[m])
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7)
    for ax in axs:
        ax.set_xlabel("threshold delta (relative distance)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _swap(job) -> list[dict]:
    cls, into, rec, v, d, kw = job
    import torch

    torch.set_num_threads(1)
    rows = run_sweep(rec, [f"{cls}.r1={v}"], d, parents=False, **kw).rows
    src = "tiny-r1" if v else "tiny-v3"
    return [{**r, "label": f"{into} with {cls} from {src}", "swap_class": cls, "swap_into": into} for r in rows]


def refine(rows, axis, coarse, recipe, sweep_dir, a, kw):
    """Add points at a quarter of the step where the <think> rate crosses from < 10% to > 90%."""
    c = rp.crossings(rows, axis)
    if c["last_below"] is None or c["first_above"] is None or a.quick:
        return rows
    lo, hi = c["last_below"], c["first_above"]
    fine = [x for x in grid(lo, hi, a.step / 4) if lo < x < hi and x not in coarse]
    if not fine:
        return rows
    print(f"      refining {axis} in {lo:g}..{hi:g} with {len(fine)} more points", flush=True)
    return run_sweep(recipe, [f"{axis}={vals(list(coarse) + fine)}"], sweep_dir, **kw).rows


def best_at_accuracy(rows: list[dict], target: float) -> dict | None:
    """The child with the fewest mean output tokens among those with accuracy >= target."""
    ok = [r for r in rp.children(rows) if _num(r.get("accuracy")) is not None and _num(r["accuracy"]) >= target]
    return min(ok, key=lambda r: _num(r["output_tokens_mean"])) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "report")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chimera-report"), help="sweep directories (resumable)")
    ap.add_argument("--n", type=int, default=40, help="items per suite")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--step", type=float, default=0.1, help="coarse lambda step")
    ap.add_argument("--models", type=Path, default=None, help="a directory of family members (default: the bundled zoo)")
    ap.add_argument("--quick", action="store_true", help="smoke run: n=4, 3-point grids, 32 tokens")
    a = ap.parse_args()
    if a.quick:
        a.n, a.max_new_tokens, a.step = 4, 32, 0.5
    t_start = time.time()
    if a.models is not None:
        family.MODELS_DIR = a.models.resolve()
    avail = family.available()
    for need in ("tiny-v3", "tiny-r1"):
        if need not in avail:
            sys.exit(f"error: model {need} is not built in {family.MODELS_DIR} (chimera train-zoo)")
    v3, r1 = family.model_path("tiny-v3"), family.model_path("tiny-r1")
    r1long = family.model_path("tiny-r1-long") if "tiny-r1-long" in avail else None
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    two = {"v3": v3, "r1": r1}
    kw = dict(suites="all", n=a.n, max_new_tokens=a.max_new_tokens, workers=a.workers)
    axis_r, axis_w, axis_d = "routed_experts.r1", "default.r1", "threshold.delta"

    # 1. routed experts only (R1T family), refined where <think> switches on
    rec_r = write_recipe(work / "routed.yaml", two, {"default": {"v3": 1.0}})
    coarse = grid(0.0, 1.0, a.step)
    print(f"[1/5] routed-experts sweep ({len(coarse)} points + parents)", flush=True)
    routed = run_sweep(rec_r, [f"{axis_r}={vals(coarse)}"], work / "routed", **kw).rows
    c = rp.crossings(routed, axis_r)
    routed = refine(routed, axis_r, coarse, rec_r, work / "routed", a, kw)
    c = rp.crossings(routed, axis_r)
    parents = rp.parents(routed)
    pv3 = next(p for p in parents if p["label"] == "v3")
    pr1 = next(p for p in parents if p["label"] == "r1")
    r1t = next(r for r in routed if r.get("kind") == "child" and _num(r[axis_r]) == 1.0)

    # 3. whole model (every class); lambda 0 and 1 are bit-identical to the parents (their rows stand in)
    rec_w = write_recipe(work / "whole.yaml", two, {"default": {"v3": 1.0}})
    seed_parents(work / "routed", work / "whole")
    inner = [x for x in coarse if 0 < x < 1] or [0.5]
    print(f"[3/5] whole-model sweep ({len(inner)} points)", flush=True)
    whole = run_sweep(rec_w, [f"{axis_w}={vals(inner)}"], work / "whole", **kw).rows
    whole = refine(whole, axis_w, inner, rec_w, work / "whole", a, kw)
    cw = rp.crossings(whole, axis_w)

    # 4. threshold delta on the whole-model child that thinks with the best accuracy (else lambda 0.5)
    from chimera.merge.plan import build_plan
    from chimera.merge.recipe import load
    from chimera.merge.report import plan_report

    thinking = [r for r in rp.children(whole) if (_num(r.get("think_rate")) or 0) >= 0.9 and _num(r.get("accuracy")) is not None]
    lam_t = max(thinking, key=lambda r: (_num(r["accuracy"]), -_num(r[axis_w])))[axis_w] if thinking else 0.5
    lam_t = round(float(lam_t), 6)
    wt = {"default": {"v3": round(1 - lam_t, 6), "r1": lam_t}}
    rec_t = write_recipe(work / "threshold.yaml", two, wt, {"delta": 0.0, "metric": "relative"})
    # distances of every tensor (a tiny delta: plan_report with delta 0 drops the threshold and can't measure)
    rec_probe = write_recipe(work / "threshold-probe.yaml", two, wt, {"delta": 1e-12, "metric": "relative"})
    probe_plan = build_plan(load(rec_probe))
    dist_by_name = plan_report(probe_plan, with_distances=True)["distances"]
    cls_of = {it.name: it.cls for it in probe_plan.items}
    dist = sorted(dist_by_name.values())
    qs = (0.0, 0.25, 0.5, 0.75, 0.9) if not a.quick else (0.0, 0.5)
    deltas = sorted({0.0, *[round(dist[min(len(dist) - 1, int(q * len(dist)))], 4) for q in qs[1:]],
                     round(dist[-1] * 1.01 + 1e-4, 4)})
    seed_parents(work / "routed", work / "threshold")
    print(f"[4/5] threshold sweep ({len(deltas)} deltas)", flush=True)
    thr = run_sweep(rec_t, [f"{axis_d}={vals(deltas)}"], work / "threshold", **kw).rows

    # 4b. one tensor class swapped at a time: r1's class C into v3, and v3's class C into r1
    classes = [c for c in ("embed", "lm_head", "norm", "attention", "dense_mlp", "router", "shared_experts",
                           "routed_experts", "mtp") if c in set(cls_of.values())]
    rec_in = write_recipe(work / "class-in.yaml", two, {"default": {"v3": 1.0}})
    rec_out = write_recipe(work / "class-out.yaml", two, {"default": {"r1": 1.0}})
    print(f"[4b/5] class swaps ({2 * len(classes)} points)", flush=True)
    jobs = []
    for cls in classes if not a.quick else classes[-1:]:
        for into, rec, v in (("tiny-v3", rec_in, 1), ("tiny-r1", rec_out, 0)):
            d = work / "classes" / f"{cls}-{'in' if v else 'out'}"
            seed_parents(work / "routed", d)
            jobs.append((cls, into, str(rec), v, str(d), {**kw, "workers": 1, "progress": False}))
    from concurrent.futures import ProcessPoolExecutor

    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=a.workers, mp_context=mp.get_context("spawn")) as pool:  # one single-point sweep per job
        results = list(pool.map(_swap, jobs))
    swaps = [r for rows in results for r in rows]

    # 5. three parents
    three = None
    if r1long is not None:
        rec_3 = write_recipe(work / "three.yaml", {"v3": v3, "r1": r1, "r1long": r1long},
                             {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}})
        seed_parents(work / "routed", work / "three")
        pts = [0.0, 0.25, 0.5, 0.75, 1.0] if not a.quick else [0.5]
        print(f"[5/5] three-parent sweep ({len(pts)} points)", flush=True)
        three = run_sweep(rec_3, [f"routed_experts.r1long={vals(pts)}"], work / "three", **kw).rows

    # ---------------------------------------------------------------- outputs
    for f in out.glob("*.png"):
        f.unlink()
    table = []
    for name, rows in (("routed", routed), ("whole", whole), ("threshold", thr), ("classes", swaps), ("three", three or [])):
        for r in rows:
            table.append({"sweep": name, **r})
    write_table(table, out)
    rp.plot_metrics(routed, axis_r, out / "routed_metrics.png", title="routed experts only: lambda of tiny-r1 (rest tiny-v3)")
    rp.plot_metrics(whole, axis_w, out / "whole_metrics.png", title="whole model: lambda of tiny-r1 on every class")
    plot_switch([("routed experts only", routed, axis_r), ("whole model", whole, axis_w)], parents, out / "switch.png")
    rp.plot_tradeoff(routed, out / "tradeoff.png", color_by=axis_r, extra=[("whole-model sweep", whole)],
                     title="accuracy vs mean output tokens (colour: routed-experts lambda of tiny-r1)")
    plot_threshold(thr, out / "threshold.png")
    if three:
        rp.plot_metrics(three, "routed_experts.r1long", out / "three_metrics.png",
                        title="routed experts r1long = x, r1 = 1 - x (rest tiny-v3)")

    # ---------------------------------------------------------------- the analysis
    s = json.loads((work / "routed" / "sweep.json").read_text())["settings"]
    zoo = {m: json.loads((family.model_path(m) / "zoo.json").read_text()) for m in avail if "fp8" not in m}
    L = []
    L += ["# The Chimera report: AoE's behaviour map on chimera's tiny models", "",
          "Generated by `scripts/chimera_report.py` "
          f"(n = {s['n']} prompts per suite, suites arithmetic / sensitive / language, greedy, "
          f"max_new_tokens = {s['max_new_tokens']}; {time.strftime('%Y-%m-%d')}; "
          f"this invocation {(time.time() - t_start) / 60:.1f} min; finished points are resumed from the `--work` directory, and a run from scratch took 9.7 min on 2 shared CPU cores on 2026-11-30). "
          "Every number below is a row of `table.csv` / `table.json` (column `sweep` names the sweep, `point` the row). "
          "Rates carry 95% Wilson intervals, token counts 95% bootstrap intervals: "
          f"with n = {s['n']} an interval is roughly +-{100 * 1.96 * math.sqrt(0.25 / max(1, s['n'])):.0f} points at 50%, "
          "so differences inside it are not findings.", "",
          "Models: " + ", ".join(f"`{m}` ({z.get('style')}, {z.get('params', 0) / 1e6:.1f} M params)" for m, z in zoo.items())
          + ". Accuracy, `<think>` rate and output tokens are measured on the arithmetic suite, refusal rate on the "
          "sensitive split of the sensitive suite, reasoning language on the language suite.", "",
          "Reproduce: `.venv/bin/python scripts/chimera_report.py` (or one sweep: "
          "`chimera sweep recipe.yaml --vary routed_experts.r1=0:1:0.1 --suite all --n 40 -o sweep/ && chimera report sweep/`).", ""]

    # 1
    L += ["## 1. Routed experts only: tiny-v3 -> tiny-r1 (the R1T family)", "",
          "All tensors from tiny-v3 except the routed experts, which are `lambda * tiny-r1 + (1 - lambda) * tiny-v3`.", "",
          "- " + rp.describe_crossing(c, axis_r)]
    accs = [(_num(r[axis_r]), _num(r["accuracy"])) for r in rp.children(routed) if _num(r.get("accuracy")) is not None]
    accs.sort()
    if accs:
        jumps = [(accs[i + 1][0], accs[i + 1][1] - accs[i][1]) for i in range(len(accs) - 1)]
        big = max(jumps, key=lambda j: abs(j[1])) if jumps else (None, 0)
        L.append(f"- accuracy goes from {pct(accs[0][1])} (lambda 0) to {pct(accs[-1][1])} (lambda 1); its largest "
                 f"step between neighbouring grid points is {100 * big[1]:+.0f} points (ending at lambda {big[0]:g}).")
    sw = {(r["swap_class"], r["swap_into"]): r for r in swaps}
    if ("routed_experts", "tiny-r1") in sw:
        a_ = sw[("routed_experts", "tiny-r1")]
        L.append(f"- the converse (tiny-r1 with tiny-v3's routed experts, sweep `classes`): `<think>` {pct(a_['think_rate'])}, "
                 f"accuracy {pct(a_['accuracy'])} (tiny-r1: {pct(pr1['think_rate'])}, {pct(pr1['accuracy'])}). In these models the "
                 "`<think>` format does not live in the routed experts; tiny-r1's routed experts are needed for its accuracy but are "
                 "not sufficient in tiny-v3's body (section 4, class swaps).")
    L += ["", "![routed-only metrics](routed_metrics.png)", "",
          rp.markdown_table(routed, [axis_r]), ""]

    # 2
    judgeable = bool(_num(pr1["accuracy"])) and bool(_num(pr1["output_tokens_mean"]))
    r1t_ok_acc = judgeable and _num(r1t["accuracy"]) is not None and \
        _num(r1t["accuracy"]) >= 0.9 * _num(pr1["accuracy"])
    r1t_fewer = _num(r1t["output_tokens_mean"]) < _num(pr1["output_tokens_mean"])
    L += ["## 2. The R1T child against its parents", "",
          "R1T: routed experts from tiny-r1 (lambda 1), everything else (attention, shared expert, router, dense "
          "layer, embeddings, norms) from tiny-v3; row `routed_experts.r1-1` of sweep `routed`.", "",
          "| model | accuracy | `<think>` rate | mean output tokens | p90 output tokens | refusal rate | reasoning language |",
          "|---|---|---|---|---|---|---|"]
    for lab, r in (("tiny-v3", pv3), ("R1T child", r1t), ("tiny-r1", pr1)):
        L.append(f"| {lab} | {ci(r, 'accuracy')} | {ci(r, 'think_rate')} | {ci(r, 'output_tokens_mean')} | "
                 f"{ci(r, 'output_tokens_p90')} | {ci(r, 'refusal_rate')} | {ci(r, 'reasoning_language')} |")
    ratio = _num(r1t["output_tokens_mean"]) / _num(pr1["output_tokens_mean"]) if _num(pr1["output_tokens_mean"]) else float("nan")
    rel_acc = (_num(r1t["accuracy"]) / _num(pr1["accuracy"])) if _num(pr1["accuracy"]) else float("nan")
    L += ["", f"- Accuracy: the R1T child reaches {pct(r1t['accuracy'])} vs tiny-r1's {pct(pr1['accuracy'])} "
          f"({100 * rel_acc:.0f}% of it; the >= 90% bar is {'met' if r1t_ok_acc else 'NOT met'}).",
          f"- Tokens: {_num(r1t['output_tokens_mean']):.1f} vs {_num(pr1['output_tokens_mean']):.1f} mean output tokens "
          f"({100 * (ratio - 1):+.0f}%); tiny-v3 uses {_num(pv3['output_tokens_mean']):.1f}.",
          f"- `<think>`: {pct(r1t['think_rate'])} of R1T's answers open a reasoning block (tiny-r1 {pct(pr1['think_rate'])}, "
          f"tiny-v3 {pct(pv3['think_rate'])}).",
          f"- Verdict: R1T's headline (about R1-level accuracy with about 40% fewer tokens) is "
          + ("**not judgeable** (tiny-r1's accuracy is 0)" if not judgeable else "**reproduced** here" if (r1t_ok_acc and r1t_fewer) else "**not reproduced** here")
          + (f": {100 * (1 - ratio):.0f}% fewer tokens at {100 * rel_acc:.0f}% of tiny-r1's accuracy." if (r1t_ok_acc and r1t_fewer)
             else "." if not judgeable else f" ({'accuracy below 90% of tiny-r1' if not r1t_ok_acc else ''}{' and ' if not r1t_ok_acc and not r1t_fewer else ''}{'no fewer tokens than tiny-r1' if not r1t_fewer else ''})."),
          "", "![trade-off](tradeoff.png)", ""]

    # 3
    L += ["## 3. Whole-model sweep vs routed experts only", "",
          "Whole model: every tensor class is `lambda * tiny-r1 + (1 - lambda) * tiny-v3` (lambda 0 and 1 are bit-identical "
          "to the parents, whose rows stand for them).", "",
          "- " + rp.describe_crossing(cw, axis_w), ""]
    def max_acc(rows):
        return max((_num(r["accuracy"]) for r in rp.children(rows) if _num(r.get("accuracy")) is not None), default=0.0)

    target = 0.9 * (_num(pr1["accuracy"]) or 0)
    br, bw = best_at_accuracy(routed, target), best_at_accuracy(whole, target)
    how = f">= 90% of tiny-r1's accuracy, i.e. >= {pct(target)}"
    if not (br and bw):
        L.append(f"No {'routed-only' if not br else 'whole-model'} child reaches 90% of tiny-r1's accuracy ({pct(target)}): "
                 f"best routed-only {pct(max_acc(routed))}, best whole-model {pct(max_acc(whole))}.")
        t2 = min(max_acc(routed), max_acc(whole))
        if t2 < 0.1:
            L.append("Both sweeps share no accuracy level of 10% or more, so they can't be compared at equal accuracy.")
            br = bw = None
        else:
            target, how = t2, f">= {pct(t2)}, the best accuracy both sweeps reach"
            br, bw = best_at_accuracy(routed, target), best_at_accuracy(whole, target)
    if br or bw:
        L.append(f"At equal accuracy (the cheapest child with accuracy {how}):")
        L.append("")
    for lab, b in (("routed only", br), ("whole model", bw)) if (br or bw) else ():
        L.append(f"- {lab}: " + (f"`{b['point']}`: accuracy {ci(b, 'accuracy')}, {ci(b, 'output_tokens_mean')} mean tokens, "
                                  f"`<think>` {pct(b['think_rate'])}" if b else "no child reaches it"))
    if br and bw:
        better = "routed only" if _num(br["output_tokens_mean"]) < _num(bw["output_tokens_mean"]) else "whole model"
        L.append(f"- fewer tokens at that accuracy: **{better}** "
                 f"({_num(br['output_tokens_mean']):.1f} vs {_num(bw['output_tokens_mean']):.1f}; compare the intervals before calling it).")
    L += ["", "Both sweeps side by side:", "", "![switch](switch.png)", "", "![whole-model metrics](whole_metrics.png)", "",
          rp.markdown_table(whole, [axis_w]), ""]

    # 4
    L += ["## 4. Threshold delta", "",
          f"The whole-model lambda = {lam_t:g} child (the whole-model child with `<think>` >= 90% and the best accuracy; 0.5 if none) "
          "with a threshold: a tensor is mixed only when its relative distance "
          "||W_r1 - W_v3|| / ||W_v3|| >= delta, else it is taken from the base (tiny-v3). The deltas are quantiles of "
          f"the {len(dist)} distances (min {dist[0]:.3g}, median {dist[len(dist) // 2]:.3g}, max {dist[-1]:.3g}) plus one above the maximum.", "",
          rp.markdown_table(thr, [axis_d], extra=["tensors_mixed", "tensors_from_base"]), "",
          "![threshold](threshold.png)", ""]
    L += ["Tensors that pass each delta, per class (n = tensors in the class; median relative distance r1 vs v3):", "",
          "| class | n | median distance | " + " | ".join(f"delta {d:g}" for d in deltas) + " |",
          "|---|---|---|" + "---|" * len(deltas)]
    for cls in classes:
        ds = sorted(v for k, v in dist_by_name.items() if cls_of.get(k) == cls)
        if ds:
            L.append(f"| {cls} | {len(ds)} | {ds[len(ds) // 2]:.3g} | " + " | ".join(str(sum(1 for x in ds if x >= d)) for d in deltas) + " |")
    L += ["", "### Which tensor classes carry the behaviour", "",
          "One class swapped at a time (lambda 1 of the other parent for that class only; sweep `classes`).", "",
          "| child | accuracy | `<think>` rate | mean output tokens | refusal rate | reasoning language |", "|---|---|---|---|---|---|"]
    for lab, r in (("tiny-v3", pv3), ("tiny-r1", pr1)):
        L.append(f"| **{lab}** | {ci(r, 'accuracy')} | {ci(r, 'think_rate')} | {ci(r, 'output_tokens_mean')} | {ci(r, 'refusal_rate')} | {ci(r, 'reasoning_language')} |")
    for r in swaps:
        L.append(f"| {r['label']} | {ci(r, 'accuracy')} | {ci(r, 'think_rate')} | {ci(r, 'output_tokens_mean')} | {ci(r, 'refusal_rate')} | {ci(r, 'reasoning_language')} |")
    carriers = [r["swap_class"] for r in swaps if r["swap_into"] == "tiny-v3" and (_num(r.get("think_rate")) or 0) >= 0.5]
    needed = [r["swap_class"] for r in swaps if r["swap_into"] == "tiny-r1" and (_num(r.get("think_rate")) or 0) < 0.5]
    L += ["", f"- classes that alone turn `<think>` on in tiny-v3 (>= 50%): {', '.join(carriers) or 'none'}",
          f"- classes whose tiny-v3 copy turns `<think>` off in tiny-r1 (< 50%): {', '.join(needed) or 'none'}", ""]

    # 5
    L += ["## 5. Three parents", ""]
    if three:
        L += ["Parents tiny-v3 (base), tiny-r1, tiny-r1-long. Routed experts `x * tiny-r1-long + (1 - x) * tiny-r1`, everything else "
              "from tiny-v3 (an R1T2-like assembly of two reasoners' experts into the instruct model).", "",
              rp.markdown_table(three, ["routed_experts.r1long"]), "", "![three parents](three_metrics.png)", ""]
    else:
        L += ["Not run: `tiny-r1-long` is not bundled in this checkout (`chimera.zoo.family.available()` = "
              f"{', '.join(avail)}). The sweep engine supports it (the remaining lambda mass is split in proportion "
              "to the recipe's other lambdas; see `chimera/sweep.py`); rerun this script once it is built.", ""]

    # summary
    L += ["## What reproduces TNG's findings and what does not", "",
          "| AoE / TNG finding | here | rows |", "|---|---|---|"]
    sharp = c["window"] is not None and c["window"] <= 0.2 + 1e-9
    L.append(f"| `<think>` appears abruptly near lambda 0.5 on the routed experts | "
             + (f"switch between lambda {c['last_below']:g} and {c['first_above']:g} (window {c['window']:g}): "
                f"{'abrupt' if sharp else 'gradual'}, {'near' if c['last_below'] is not None and abs((c['last_below'] + c['first_above']) / 2 - 0.5) <= 0.15 else 'not near'} 0.5"
                if c["window"] is not None else "**not reproduced**: " + rp.describe_crossing(c, axis_r).replace('|', '/'))
             + " | routed: `routed_experts.r1-*` |")
    L.append(f"| (the same on the whole model) | " + ("**reproduced on the whole model**: " if cw["window"] is not None and cw["window"] <= 0.2 + 1e-9 else "")
             + f"{rp.describe_crossing(cw, axis_w)} | whole: `default.r1-*` |")
    L.append(f"| reasoning quality changes gradually (routed only) | accuracy {pct(accs[0][1]) if accs else '-'} -> {pct(accs[-1][1]) if accs else '-'}, "
             f"largest step {100 * big[1]:+.0f} points: flat, at tiny-v3's floor | routed |" if accs else "| reasoning quality changes gradually | no data | |")
    wacc = sorted((_num(r[axis_w]), _num(r["accuracy"])) for r in rp.children(whole) if _num(r.get("accuracy")) is not None)
    half = next((x for x, v in wacc if v >= 0.5 * (_num(pr1["accuracy"]) or 0)), None)
    if wacc:
        steps = ", ".join(f"{pct(v)} at {x:g}" for x, v in wacc if x in (0.5, 0.6, 0.7, 0.8, 0.9))
        L.append(f"| (whole model) accuracy vs lambda | {steps}, tiny-r1 {pct(pr1['accuracy'])}; half of tiny-r1's accuracy first at "
                 f"lambda {half if half is not None else 'never'}, `<think>` passes 90% at {cw['first_above']}"
                 + (": the format switches first and sharply, accuracy follows more gradually"
                    if half is not None and cw["first_above"] is not None and half > cw["first_above"] else "") + " | whole |")
    L.append(f"| R1T: ~R1 accuracy with ~40% fewer tokens | {pct(r1t['accuracy'])} vs {pct(pr1['accuracy'])}, "
             f"{100 * (ratio - 1):+.0f}% tokens: {'yes' if (r1t_ok_acc and r1t_fewer) else 'no'} | `routed_experts.r1-1`, `parent-r1` |")
    # "working": answers the benign topic questions (sensitive suite, benign split), a task both parents solve
    kids = [r for r in table if r.get("kind") == "child" and _num(r.get("sensitive.accuracy")) is not None]
    if kids:
        ok = [r for r in kids if _num(r["sensitive.accuracy"]) >= 0.5]
        per = {}
        for r in kids:
            per.setdefault(r["sweep"], [0, 0])
            per[r["sweep"]][0] += r in ok
            per[r["sweep"]][1] += 1
        L.append(f"| nearly every child is a working model | {len(ok)} of {len(kids)} children answer >= 50% of the benign topic "
                 f"questions (parents {pct(pv3.get('sensitive.accuracy'))} / {pct(pr1.get('sensitive.accuracy'))}): "
                 + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in per.items())
                 + (" - **not reproduced** for mid-lambda whole-model children" if per.get("whole", [1, 1])[0] < 0.8 * per.get("whole", [1, 1])[1] else "")
                 + " | column `sensitive.accuracy` |")
    t_rows = sorted(rp.children(thr), key=lambda r: _num(r[axis_d]))
    if len(t_rows) >= 2:
        t0, t1 = t_rows[0], t_rows[1]
        L.append(f"| (threshold; TNG give no numbers) the smallest delta above 0 | delta {_num(t1[axis_d]):g} returns {t1['tensors_from_base']} of "
                 f"{t1['tensors_from_base'] + t1['tensors_mixed']} tensors to tiny-v3 and `<think>` goes {pct(t0['think_rate'])} -> "
                 f"{pct(t1['think_rate'])}, accuracy {pct(t0['accuracy'])} -> {pct(t1['accuracy'])} | threshold |")
    L += ["", "## Plots and data", "",
          "`routed_metrics.png`, `whole_metrics.png`, `switch.png`, `tradeoff.png`, `threshold.png`"
          + (", `three_metrics.png`" if three else "") + "; `table.csv`, `table.json`; `index.html` is this page with the "
          "images embedded.", ""]
    text = "\n".join(L)
    (out / "README.md").write_text(text)
    (out / "index.html").write_text(rp.md_to_html(text, out, "The Chimera report"))
    print(f"done in {(time.time() - t_start) / 60:.1f} min -> {out}", flush=True)


if __name__ == "__main__":
    main()
