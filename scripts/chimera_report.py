"""The Chimera report: AoE's behaviour map, redrawn on chimera's bundled tiny models (family v2.1).

    .venv/bin/python scripts/chimera_report.py [--n 60] [--workers 2] [--out docs/report]

Runs the sweeps with `chimera.sweep.run_sweep` (resumable: sweep directories live in --work) and
writes docs/report/: table.csv / table.json (every row, with a `sweep` column), the PNG plots,
README.md (the analysis; every number in it comes from a row of the table or a point file) and a
self-contained index.html. Verdicts follow docs/evidence-criteria.md (declared before the runs).

0. how far apart the parents are: per-tensor relative distances, per class (AoE's distance figure);
1. routed-experts-only sweep tiny-v3 -> tiny-r1 (the R1T family), refined around the <think> switch;
2. the R1T child (routed experts from tiny-r1, everything else from tiny-v3) against both parents on
   the whole arithmetic suite, and the variant whose router follows the experts;
3. the whole-model sweep (every class) against routed-only, at equal accuracy;
4. threshold delta on a whole-model child that thinks; which tensor classes carry the behaviour (one
   class swapped between the parents at a time) and which layers (one layer's routed experts at a time);
5. three parents (tiny-v3, tiny-r1, tiny-r1-long): an R1T2-style child.
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


def write_recipe(path: Path, parents: dict[str, Path], weights: dict, threshold: dict | None = None,
                 overrides: list[dict] | None = None) -> Path:
    import yaml

    d = {"parents": {k: str(v) for k, v in parents.items()}, "base": "v3", "weights": weights}
    if threshold:
        d["threshold"] = threshold
    if overrides:
        d["overrides"] = overrides
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


def _single(job) -> list[dict]:
    """One single-point sweep (a worker process); its rows carry the job's extra fields."""
    rec, vary, d, kw, extra = job
    import torch

    torch.set_num_threads(1)
    rows = run_sweep(rec, [vary], d, parents=False, **kw).rows
    return [{**r, **extra} for r in rows]


def run_singles(jobs: list, workers: int) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor

    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return [r for rows in pool.map(_single, jobs) for r in rows]


def point_report(sweep_dir: Path, point: str) -> dict:
    return json.loads((sweep_dir / "points" / f"{point}.json").read_text())["report"]


def split_metric(report: dict, suite: str, split: str | None, metric: str) -> dict:
    e = report[suite]
    return (e["splits"][split] if split else e["metrics"])[metric]


def distances(a: Path, b: Path) -> list[dict]:
    from chimera.merge.report import diff_checkpoints

    return diff_checkpoints(a, b, "relative")


def plot_distances(pairs: dict[str, list[dict]], classes: list[str], path: Path) -> None:
    """AoE's distance figure: the distribution of per-tensor relative distances, per class, per pair."""
    plt = rp._plt()
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(1, len(pairs))
    for i, (label, rows) in enumerate(pairs.items()):
        data = [[r["distance"] for r in rows if r["class"] == c] or [float("nan")] for c in classes]
        pos = [j + (i - (len(pairs) - 1) / 2) * width for j in range(len(classes))]
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=True,
                        flierprops={"markersize": 2})
        for b in bp["boxes"]:
            b.set_facecolor(rp._PARENT_STYLE[i % 4][0])
            b.set_alpha(0.6)
        ax.plot([], [], "s", color=rp._PARENT_STYLE[i % 4][0], label=label)
    ax.axhline(0.2, ls="--", lw=1, color="grey", label="0.2 (the issue's target for routed experts)")
    ax.set_xticks(range(len(classes)), classes, rotation=20)
    ax.set_ylabel("||A - B||_F / ||B||_F")
    ax.set_title("relative distance per tensor, by class")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


CLASSES = ("embed", "lm_head", "norm", "attention", "dense_mlp", "router", "shared_experts", "routed_experts", "mtp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "report")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chimera-report"), help="sweep directories (resumable)")
    ap.add_argument("--n", type=int, default=60, help="items per suite")
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
    cfg = json.loads((v3 / "config.json").read_text())
    moe_layer_ids = list(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    two = {"v3": v3, "r1": r1}
    kw = dict(suites="all", n=a.n, max_new_tokens=a.max_new_tokens, workers=a.workers)
    axis_r, axis_w, axis_d = "routed_experts.r1", "default.r1", "threshold.delta"

    # 0. distances between the parents
    print("[0/5] distances between the parents", flush=True)
    pairs = {"tiny-r1 vs tiny-v3": distances(r1, v3)}
    if r1long is not None:
        pairs["tiny-r1-long vs tiny-r1"] = distances(r1long, r1)
        pairs["tiny-r1-long vs tiny-v3"] = distances(r1long, v3)
    classes = [c for c in CLASSES if any(r["class"] == c for rows in pairs.values() for r in rows)]
    plot_distances(pairs, classes, out / "distances.png")

    # 1. routed experts only (R1T family), refined where <think> switches on
    rec_r = write_recipe(work / "routed.yaml", two, {"default": {"v3": 1.0}})
    coarse = grid(0.0, 1.0, a.step)
    print(f"[1/5] routed-experts sweep ({len(coarse)} points + parents)", flush=True)
    routed = run_sweep(rec_r, [f"{axis_r}={vals(coarse)}"], work / "routed", **kw).rows
    routed = refine(routed, axis_r, coarse, rec_r, work / "routed", a, kw)
    c = rp.crossings(routed, axis_r)
    parents = rp.parents(routed)
    pv3 = next(p for p in parents if p["label"] == "v3")
    pr1 = next(p for p in parents if p["label"] == "r1")

    # 2. R1T on the whole arithmetic suite (criterion 2), and the router-follows-experts variant
    print("[2/5] R1T child on the whole arithmetic suite", flush=True)
    kw_full = dict(suites="arithmetic", n=None if not a.quick else 8, max_new_tokens=a.max_new_tokens, workers=a.workers)
    r1t_sweep = run_sweep(rec_r, [f"{axis_r}=1"], work / "r1t", **kw_full).rows
    rec_rr = write_recipe(work / "r1t-router.yaml", two, {"default": {"v3": 1.0}, "router": {"r1": 1.0}})
    r1t_router = run_sweep(rec_rr, [f"{axis_r}=1"], work / "r1t-router", parents=False, **kw_full).rows
    full = {"tiny-v3": point_report(work / "r1t", "parent-v3"), "tiny-r1": point_report(work / "r1t", "parent-r1"),
            "R1T child": point_report(work / "r1t", f"{axis_r}-1"),
            "R1T child, router from tiny-r1": point_report(work / "r1t-router", f"{axis_r}-1")}
    hard = {k: split_metric(v, "arithmetic", "hard", "accuracy") for k, v in full.items()}
    think = {k: split_metric(v, "arithmetic", None, "think_rate") for k, v in full.items()}
    toks = {k: split_metric(v, "arithmetic", None, "output_tokens_mean") for k, v in full.items()}
    c2 = {"accuracy": hard["R1T child"]["value"] >= 0.9 * hard["tiny-r1"]["value"] and hard["tiny-r1"]["value"] > 0,
          "think": think["R1T child"]["value"] >= 0.9,
          "tokens": toks["R1T child"]["value"] <= toks["tiny-r1"]["value"]}
    c2["reproduced"] = all(c2.values())

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

    # 4b. one tensor class swapped at a time, both directions; 4c. one layer's routed experts at a time
    swap_classes = [k for k in CLASSES if k in set(cls_of.values())]
    rec_in = write_recipe(work / "class-in.yaml", two, {"default": {"v3": 1.0}})
    rec_out = write_recipe(work / "class-out.yaml", two, {"default": {"r1": 1.0}})
    single = {**kw, "workers": 1, "progress": False}
    jobs = []
    for cls in swap_classes if not a.quick else swap_classes[-1:]:
        for into, rec, v in (("tiny-v3", rec_in, 1), ("tiny-r1", rec_out, 0)):
            d = work / "classes" / f"{cls}-{'in' if v else 'out'}"
            seed_parents(work / "routed", d)
            src = "tiny-r1" if v else "tiny-v3"
            jobs.append((str(rec), f"{cls}.r1={v}", str(d), single,
                         {"label": f"{into} with {cls} from {src}", "swap_class": cls, "swap_into": into}))
    for L in moe_layer_ids if not a.quick else moe_layer_ids[:1]:
        for into, base_w, donor in (("tiny-v3", {"v3": 1.0}, "r1"), ("tiny-r1", {"r1": 1.0}, "v3")):
            rec = write_recipe(work / f"layer{L}-{into}.yaml", two, {"default": base_w},
                               overrides=[{"match": f"model.layers.{L}.mlp.experts.*", "weights": {donor: 1.0}}])
            d = work / "layers" / f"L{L}-{into}"
            src = "tiny-r1" if donor == "r1" else "tiny-v3"
            jobs.append((str(rec), f"default.{'v3' if donor == 'r1' else 'r1'}=1", str(d), single,
                         {"label": f"{into} with layer {L}'s routed experts from {src}", "swap_layer": L, "swap_into": into}))
    print(f"[4b/5] class swaps and layer swaps ({len(jobs)} points)", flush=True)
    results = run_singles(jobs, a.workers)
    swaps = [r for r in results if "swap_class" in r]
    layer_swaps = [r for r in results if "swap_layer" in r]

    # 5. three parents: routed experts from tiny-r1 and tiny-r1-long, the rest from tiny-v3 (R1T2-style)
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
        if f.name != "distances.png":
            f.unlink()
    table = []
    for name, rows in (("routed", routed), ("r1t", r1t_sweep + r1t_router), ("whole", whole), ("threshold", thr),
                       ("classes", swaps), ("layers", layer_swaps), ("three", three or [])):
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
    half = 100 * 1.96 * math.sqrt(0.25 / max(1, s["n"]))
    L += ["# The Chimera report: AoE's behaviour map on chimera's tiny models (family v2.1)", "",
          "Generated by `scripts/chimera_report.py` "
          f"(n = {s['n']} prompts per suite for the sweeps, the whole arithmetic suite (300) for the R1T child; suites "
          f"arithmetic / sensitive / language, greedy, max_new_tokens = {s['max_new_tokens']}; {time.strftime('%Y-%m-%d')}; "
          f"this invocation {(time.time() - t_start) / 60:.1f} min on 2 shared CPU cores; finished points are resumed "
          "from the `--work` directory). Every number below is a row of `table.csv` / `table.json` (column `sweep` "
          "names the sweep, `point` the row) or, for the R1T section, a point file of that sweep. Rates carry 95% "
          f"Wilson intervals, token counts 95% bootstrap intervals: with n = {s['n']} an interval is roughly "
          f"+-{half:.0f} points at 50% (+-{100 * 1.96 * math.sqrt(0.05 * 0.95 / max(1, s['n'])):.0f} at 5% or 95%), "
          "so differences inside it are not findings.", "",
          "What counts as reproduced was declared before these runs in [../evidence-criteria.md](../evidence-criteria.md); "
          "the verdicts below apply it unchanged.", "",
          "Models: " + ", ".join(f"`{m}` ({z.get('style')}, {z.get('params', 0) / 1e6:.2f} M params)" for m, z in zoo.items())
          + ". Accuracy, `<think>` rate and output tokens are measured on the arithmetic suite, refusal rate on the "
          "sensitive split of the sensitive suite, reasoning language on the language suite.", "",
          "Reproduce: `.venv/bin/python scripts/chimera_report.py` (or one sweep: "
          "`chimera sweep recipe.yaml --vary routed_experts.r1=0:1:0.1 --suite all --n 60 -o sweep/ && chimera report sweep/`).", ""]

    # 0
    L += ["## 0. How far apart the parents are", "",
          "Relative distance ||A - B||_F / ||B||_F of every tensor (the AoE paper's distance figure; "
          "`chimera diff A B --plot` draws the per-layer map). Median (and 10th-90th percentile) per class:", "",
          "| class | n | " + " | ".join(pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for cls in classes:
        cells = []
        for rows in pairs.values():
            ds = sorted(r["distance"] for r in rows if r["class"] == cls)
            cells.append(f"{ds[len(ds) // 2]:.3f} ({ds[int(0.1 * (len(ds) - 1))]:.3f}-{ds[int(0.9 * (len(ds) - 1))]:.3f})")
        n_cls = sum(1 for r in next(iter(pairs.values())) if r["class"] == cls)
        L.append(f"| {cls} | {n_cls} | " + " | ".join(cells) + " |")
    L += ["", "![distances](distances.png)", ""]

    # 1
    sharp = c["window"] is not None and c["window"] <= 0.2 + 1e-9
    L += ["## 1. Routed experts only: tiny-v3 -> tiny-r1 (the R1T family)", "",
          "All tensors from tiny-v3 except the routed experts, which are `lambda * tiny-r1 + (1 - lambda) * tiny-v3`.", "",
          "- " + rp.describe_crossing(c, axis_r),
          f"- **Criterion 1 (`<think>` from < 10% to > 90% within a lambda window <= 0.2): "
          f"{'reproduced' if sharp else 'not reproduced'}.**"]
    accs = sorted((_num(r[axis_r]), _num(r["accuracy"])) for r in rp.children(routed) if _num(r.get("accuracy")) is not None)
    big = (None, 0)
    if accs:
        jumps = [(accs[i + 1][0], accs[i + 1][1] - accs[i][1]) for i in range(len(accs) - 1)]
        big = max(jumps, key=lambda j: abs(j[1])) if jumps else (None, 0)
        L.append(f"- accuracy goes from {pct(accs[0][1])} (lambda 0) to {pct(accs[-1][1])} (lambda 1); its largest "
                 f"step between neighbouring grid points is {100 * big[1]:+.0f} points (ending at lambda {big[0]:g}).")
    L += ["", "![routed-only metrics](routed_metrics.png)", "", rp.markdown_table(routed, [axis_r]), ""]

    # 2
    L += ["## 2. The R1T child against its parents", "",
          "R1T: routed experts from tiny-r1 (lambda 1), everything else (attention, router, shared expert, dense "
          "layer, embeddings, norms, lm_head) from tiny-v3; measured on the whole arithmetic suite (100 easy + 200 hard "
          "items; sweep `r1t`). The variant whose router (weight and bias) follows the experts is shown beside it.", "",
          "| model | hard-sum accuracy | accuracy (all 300) | `<think>` rate | mean output tokens | p90 output tokens |",
          "|---|---|---|---|---|---|"]
    for lab, rep in full.items():
        m = rep["arithmetic"]["metrics"]

        def f_(x, tok=False):
            return (f"{x['value']:.1f} [{x['lo']:.1f}, {x['hi']:.1f}]" if tok else
                    f"{100 * x['value']:.1f}% [{100 * x['lo']:.1f}, {100 * x['hi']:.1f}]")
        L.append(f"| {lab} | {f_(hard[lab])} | {f_(m['accuracy'])} | {f_(m['think_rate'])} | "
                 f"{f_(m['output_tokens_mean'], True)} | {m['output_tokens_p90']['value']:.0f} |")
    rel = hard["R1T child"]["value"] / hard["tiny-r1"]["value"] if hard["tiny-r1"]["value"] else float("nan")
    L += ["", f"- hard sums: {100 * hard['R1T child']['value']:.1f}% vs tiny-r1's {100 * hard['tiny-r1']['value']:.1f}% "
          f"({100 * rel:.0f}% of it; bar 90%: {'met' if c2['accuracy'] else 'NOT met'});",
          f"- `<think>`: {100 * think['R1T child']['value']:.1f}% (bar 90%: {'met' if c2['think'] else 'NOT met'});",
          f"- tokens: {toks['R1T child']['value']:.1f} vs tiny-r1's {toks['tiny-r1']['value']:.1f} "
          f"({100 * (toks['R1T child']['value'] / toks['tiny-r1']['value'] - 1):+.0f}%; bar: no more than tiny-r1: "
          f"{'met' if c2['tokens'] else 'NOT met'}).",
          f"- **Criterion 2 (R1T >= 90% of tiny-r1's hard-sum accuracy, thinks >= 90%, no more tokens): "
          f"{'reproduced' if c2['reproduced'] else 'not reproduced'}.**", "", "![trade-off](tradeoff.png)", ""]

    # 3
    L += ["## 3. Whole-model sweep vs routed experts only", "",
          "Whole model: every tensor class is `lambda * tiny-r1 + (1 - lambda) * tiny-v3` (lambda 0 and 1 are bit-identical "
          "to the parents, whose rows stand for them).", "", "- " + rp.describe_crossing(cw, axis_w), ""]

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
        L += [f"At equal accuracy (the cheapest child with accuracy {how}):", ""]
        for lab, b in (("routed only", br), ("whole model", bw)):
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
          "![threshold](threshold.png)", "",
          "Tensors that pass each delta, per class (n = tensors in the class; median relative distance r1 vs v3):", "",
          "| class | n | median distance | " + " | ".join(f"delta {d:g}" for d in deltas) + " |",
          "|---|---|---|" + "---|" * len(deltas)]
    for cls in swap_classes:
        ds = sorted(v for k, v in dist_by_name.items() if cls_of.get(k) == cls)
        if ds:
            L.append(f"| {cls} | {len(ds)} | {ds[len(ds) // 2]:.3g} | " + " | ".join(str(sum(1 for x in ds if x >= d)) for d in deltas) + " |")
    L += ["", "### Where the behaviour lives: tensor classes", "",
          "One class swapped at a time (lambda 1 of the other parent for that class only; sweep `classes`).", "",
          "| child | accuracy | `<think>` rate | mean output tokens | refusal rate | reasoning language |", "|---|---|---|---|---|---|"]
    for lab, r in (("tiny-v3", pv3), ("tiny-r1", pr1)):
        L.append(f"| **{lab}** | {ci(r, 'accuracy')} | {ci(r, 'think_rate')} | {ci(r, 'output_tokens_mean')} | {ci(r, 'refusal_rate')} | {ci(r, 'reasoning_language')} |")
    for r in swaps:
        L.append(f"| {r['label']} | {ci(r, 'accuracy')} | {ci(r, 'think_rate')} | {ci(r, 'output_tokens_mean')} | {ci(r, 'refusal_rate')} | {ci(r, 'reasoning_language')} |")
    carriers = [r["swap_class"] for r in swaps if r["swap_into"] == "tiny-v3" and (_num(r.get("think_rate")) or 0) >= 0.5]
    needed = [r["swap_class"] for r in swaps if r["swap_into"] == "tiny-r1" and (_num(r.get("think_rate")) or 0) < 0.5]
    L += ["", f"- classes that alone turn `<think>` on in tiny-v3 (>= 50%): {', '.join(carriers) or 'none'}",
          f"- classes whose tiny-v3 copy turns `<think>` off in tiny-r1 (< 50%): {', '.join(needed) or 'none'}", "",
          "### Where the behaviour lives: layers", "",
          "The routed experts of one MoE layer swapped at a time (every other tensor from the receiving model; sweep `layers`).", "",
          "| child | accuracy | `<think>` rate | mean output tokens | refusal rate | reasoning language |", "|---|---|---|---|---|---|"]
    for r in layer_swaps:
        L.append(f"| {r['label']} | {ci(r, 'accuracy')} | {ci(r, 'think_rate')} | {ci(r, 'output_tokens_mean')} | {ci(r, 'refusal_rate')} | {ci(r, 'reasoning_language')} |")
    L.append("")

    # 5
    L += ["## 5. Three parents (R1T2-style)", ""]
    if three:
        L += ["Parents tiny-v3 (base), tiny-r1, tiny-r1-long (the R1-0528 analogue). Routed experts "
              "`x * tiny-r1-long + (1 - x) * tiny-r1`, everything else from tiny-v3: TNG's R1T2 assembled R1-0528, R1 "
              "and V3-0324 in the same roles (its exact per-tensor choices are unpublished).", "",
              rp.markdown_table(three, ["routed_experts.r1long"]), "", "![three parents](three_metrics.png)", ""]
    else:
        L += [f"Not run: `tiny-r1-long` is not built (`chimera.zoo.family.available()` = {', '.join(avail)}).", ""]

    # summary
    L += ["## Against the criteria declared before the run", "",
          "| criterion (docs/evidence-criteria.md) | measured | verdict |", "|---|---|---|",
          f"| 1. routed-only sweep: `<think>` < 10% -> > 90% within a lambda window <= 0.2 | "
          f"{rp.describe_crossing(c, axis_r).replace('|', '/')} | **{'reproduced' if sharp else 'not reproduced'}** |",
          f"| 2. R1T: >= 90% of tiny-r1's hard-sum accuracy, `<think>` >= 90%, no more tokens than tiny-r1 | "
          f"{100 * hard['R1T child']['value']:.1f}% vs {100 * hard['tiny-r1']['value']:.1f}% hard sums ({100 * rel:.0f}%), "
          f"`<think>` {100 * think['R1T child']['value']:.1f}%, {toks['R1T child']['value']:.1f} vs {toks['tiny-r1']['value']:.1f} tokens | "
          f"**{'reproduced' if c2['reproduced'] else 'not reproduced'}** |",
          "| 3. MoTE: fTRI top 10 off halves refusals, random 10 at most a quarter as much, benign accuracy within 2 points | "
          "see [../mote-evidence.md](../mote-evidence.md) | (there) |", "",
          "Other AoE / TNG observations:", "", "| AoE / TNG finding | here | rows |", "|---|---|---|"]
    L.append(f"| (the `<think>` switch on the whole model) | {rp.describe_crossing(cw, axis_w)} | whole: `default.r1-*` |")
    if accs:
        L.append(f"| reasoning quality changes gradually (routed only) | accuracy {pct(accs[0][1])} -> {pct(accs[-1][1])}, "
                 f"largest step {100 * big[1]:+.0f} points | routed |")
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
                 + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in per.items()) + " | column `sensitive.accuracy` |")
    t_rows = sorted(rp.children(thr), key=lambda r: _num(r[axis_d]))
    if len(t_rows) >= 2:
        t0, t1 = t_rows[0], t_rows[1]
        L.append(f"| (threshold; TNG give no numbers) the smallest delta above 0 | delta {_num(t1[axis_d]):g} returns {t1['tensors_from_base']} of "
                 f"{t1['tensors_from_base'] + t1['tensors_mixed']} tensors to tiny-v3 and `<think>` goes {pct(t0['think_rate'])} -> "
                 f"{pct(t1['think_rate'])}, accuracy {pct(t0['accuracy'])} -> {pct(t1['accuracy'])} | threshold |")
    L += ["", "## Plots and data", "",
          "`distances.png`, `routed_metrics.png`, `whole_metrics.png`, `switch.png`, `tradeoff.png`, `threshold.png`"
          + (", `three_metrics.png`" if three else "") + "; `table.csv`, `table.json`, `verdicts.json`; `index.html` is this "
          "page with the images embedded.", ""]
    verdicts = {"criterion_1": {"crossing": c, "reproduced": sharp},
                "criterion_2": {**c2, "hard_accuracy": {k: v["value"] for k, v in hard.items()},
                                "think_rate": {k: v["value"] for k, v in think.items()},
                                "output_tokens_mean": {k: v["value"] for k, v in toks.items()}},
                "distance_medians": {p_: {cls: sorted(r["distance"] for r in rows if r["class"] == cls)[
                    sum(1 for r in rows if r["class"] == cls) // 2] for cls in classes} for p_, rows in pairs.items()},
                "minutes": round((time.time() - t_start) / 60, 1)}
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1, default=str) + "\n")
    text = "\n".join(L)
    (out / "README.md").write_text(text)
    (out / "index.html").write_text(rp.md_to_html(text, out, "The Chimera report"))
    print(f"done in {(time.time() - t_start) / 60:.1f} min -> {out}", flush=True)


if __name__ == "__main__":
    main()
