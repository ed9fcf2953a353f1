"""What a plan or a pair of parents looks like: per-class plan rows, distances, CSV and plots."""
from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from pathlib import Path

from chimera.checkpoint import arch
from chimera.checkpoint.decode import read_array
from chimera.checkpoint.files import Checkpoint
from chimera.errors import ChimeraError
from chimera.merge.distance import CHUNK_ELEMS, Norms, ToBase, row_chunks
from chimera.merge.plan import Plan
from chimera.merge.recipe import METRICS


def _lambdas(lams) -> str:
    return ", ".join(f"{p}={v:g}" for p, v in lams)


def plan_report(plan: Plan, with_distances: bool = False, metric: str | None = None,
                chunk_elems: int = CHUNK_ELEMS) -> dict:
    """What the merge will do, grouped by (class, operation, lambdas), with bytes copied vs computed.

    With distances (read from the parents, a few row chunks in memory) every tensor's distance to the
    base is measured and a threshold is resolved exactly as the merge resolves it: rows then say how
    many tensors of a class are merged and how many come from the base. Without distances a
    thresholded row says `mix or base`.
    """
    th = plan.recipe.threshold
    metric = metric or plan.metric
    dist: dict[str, float] = {}
    decide: dict[str, float] = {}
    if with_distances:
        for it in plan.items:
            if not it.others:
                continue
            acc = ToBase(it)
            for rows in row_chunks(it.shape, it.align, chunk_elems):
                acc.add(rows)
            dist[it.name] = acc.value(metric)
            if it.threshold is not None:
                decide[it.name] = acc.value(it.threshold.metric)
    groups: dict[tuple, dict] = {}
    merged = copied = 0
    for it in plan.items:
        op, lams = it.op, it.lambdas
        if it.threshold is not None:
            if it.name not in decide:
                op = f"{it.op} or base"
            elif decide[it.name] >= it.threshold.delta:
                merged += 1
            else:
                op, lams = "base", ((it.base, 1.0),)
        if op == "copy" or (op == "base" and it.base_op == "copy"):
            copied += it.nbytes
        key = (it.cls or "override", op, _lambdas(lams))
        g = groups.setdefault(key, {"class": key[0], "op": op, "lambdas": key[2], "tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += it.nbytes
        if it.name in dist:
            g["d_max"] = max(g.get("d_max", 0.0), dist[it.name])
            g["d_sum"] = g.get("d_sum", 0.0) + dist[it.name]
    for g in groups.values():
        if "d_sum" in g:
            g["d_mean"] = g.pop("d_sum") / g["tensors"]
    summary = plan.summary()
    summary["parent_bytes"] = sum(plan.parent_bytes.values())
    if with_distances or summary["thresholded"] == 0:
        summary["copy_bytes"], summary["computed_bytes"] = copied, summary["output_bytes"] - copied
    rep: dict = {"plan_id": plan.plan_id, "rows": list(groups.values()), "summary": summary,
                 "config_from_base": plan.resolved}
    if with_distances:
        rep["metric"] = metric
        rep["distances"] = dist
        if th is not None:
            thresholded = sum(1 for it in plan.items if it.threshold is not None)
            rep["threshold"] = {"delta": th.delta, "metric": th.metric, "merged": merged,
                                "from_base": thresholded - merged, "parents": list(plan.recipe.parents)}
    return rep


def diff_checkpoints(a: str | Path, b: str | Path, metric: str = "relative", chunk_elems: int = CHUNK_ELEMS,
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Distance of every tensor of A to the same tensor of B (dequantized float32); `progress(done, total)`
    after each tensor."""
    if metric not in METRICS:
        raise ChimeraError(f"unknown metric {metric!r} (relative | symmetric | rms)")
    ca, cb = Checkpoint(a), Checkpoint(b)
    la, lb = ca.stored, cb.stored
    if ca.model_type != cb.model_type:
        raise ChimeraError(f"{a} is {ca.model_type}, {b} is {cb.model_type}: different architectures")
    missing = sorted(set(la) ^ set(lb))
    if missing:
        raise ChimeraError(f"{a} and {b} have different tensor names ({len(missing)}, e.g. {missing[0]})")
    rows = []
    for done, name in enumerate(sorted(la), 1):
        if la[name].shape != lb[name].shape:
            raise ChimeraError(f"tensor {name}: shape {la[name].shape} in {a} vs {lb[name].shape} in {b}")
        n = Norms()
        align = math.lcm(la[name].block if la[name].scale else 1, lb[name].block if lb[name].scale else 1)
        for rows_ in row_chunks(la[name].shape, align, chunk_elems):
            n.add(read_array(la[name], rows_), read_array(lb[name], rows_))
        m = re.search(r"layers\.(\d+)\.", name)
        rows.append({"tensor": name, "class": arch.classify(name, ca.config) if arch.supported(ca.model_type) else None,
                     "layer": int(m.group(1)) if m else -1, "distance": n.distance(metric)})
        if progress:
            progress(done, len(la))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["tensor", "class", "layer", "distance"])
        w.writeheader()
        w.writerows(rows)


def plot_diff(rows: list[dict], path: Path, title: str) -> None:
    """Heatmap: layers (x) by tensor class (y), mean distance per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = sorted({str(r["class"]) for r in rows})
    layers = sorted({r["layer"] for r in rows})
    grid = np.full((len(classes), len(layers)), np.nan)
    acc: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        acc.setdefault((classes.index(str(r["class"])), layers.index(r["layer"])), []).append(r["distance"])
    for (i, j), v in acc.items():
        grid[i, j] = float(np.mean(v))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3), 0.45 * len(classes) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xticks(range(len(layers)), [("global" if l < 0 else str(l)) for l in layers], rotation=90)
    ax.set_xlabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
