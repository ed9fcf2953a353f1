"""What a plan or a pair of parents looks like: per-class plan rows, distances, CSV and plots."""
from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path

from chimera.checkpoint import arch
from chimera.checkpoint.files import Checkpoint
from chimera.errors import ChimeraError
from chimera.merge.distance import Norms
from chimera.merge.execute import distance_to_base, row_chunks
from chimera.merge.plan import Plan


def plan_report(plan: Plan, with_distances: bool = False, metric: str | None = None) -> dict:
    """Rows grouped by (class, operation, lambdas); with distances, the threshold's merged/base counts."""
    groups: dict[tuple, dict] = {}
    for it in plan.items:
        lam = ", ".join(f"{p}={v:g}" for p, v in it.lambdas)
        key = (it.cls or "override", it.op, lam)
        g = groups.setdefault(key, {"class": key[0], "op": it.op, "lambdas": lam, "tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += it.nbytes
    summary = plan.summary()
    summary["parent_bytes"] = sum(plan.parent_bytes.values())
    rep: dict = {"plan_id": plan.plan_id, "rows": list(groups.values()), "summary": summary}
    if with_distances:
        parents = list(plan.recipe.parents)
        metric = metric or (plan.recipe.threshold.metric if plan.recipe.threshold else "relative")
        dist = {}
        for it in plan.items:
            if len(it.sources) > 1 or it.threshold is not None:
                srcs = [s.parent for s in it.sources]
                if it.base not in srcs:  # a mix without the base: measure each parent against the base anyway
                    continue
                dist[it.name] = distance_to_base(it, srcs, metric)
        rep["distances"] = dist
        th = plan.recipe.threshold
        if th is not None:
            merged = sum(1 for it in plan.items if it.threshold is not None and dist[it.name] >= th.delta)
            thresholded = sum(1 for it in plan.items if it.threshold is not None)
            rep["threshold"] = {"delta": th.delta, "metric": th.metric, "merged": merged,
                                "from_base": thresholded - merged, "parents": parents}
    return rep


def diff_checkpoints(a: str | Path, b: str | Path, metric: str = "relative",
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Distance of every tensor of A to the same tensor of B (dequantized float32); `progress(done, total)`
    after each tensor."""
    if metric not in ("relative", "symmetric", "rms"):
        raise ChimeraError(f"unknown metric {metric!r} (relative | symmetric | rms)")
    ca, cb = Checkpoint(a), Checkpoint(b)
    la, lb = ca.logical(), cb.logical()
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
        for rows_ in row_chunks(la[name].shape, ca.block_size()[0]):
            n.add(ca.read_float(name, rows_), cb.read_float(name, rows_))
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
