"""`run_sweep`: validate, build the grid, reuse finished points, run the rest, write the table."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from chimera.errors import ChimeraError
from chimera.merge.executor import Executor, map_unordered
from chimera.merge.recipe import Recipe
from chimera.sweep.grid import build_grid, parent_points, parse_vary
from chimera.sweep.runner import (MANIFEST, POINTS_DIR, Settings, json_default, load_done, make_task, point_key,
                                  run_point)
from chimera.sweep.servers import EndpointSpec
from chimera.sweep.table import row, write_table
from chimera.sweep.ui import progress_bar


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]
    computed: list[str]        # point ids evaluated in this run
    reused: list[str]          # point ids taken from an earlier run
    skipped: int               # infeasible grid points


def run_sweep(recipe: Recipe | str | os.PathLike, vary: list[str], out: str | os.PathLike,
              suites: str | list[str] = "all", n: int | None = None, *, max_new_tokens: int = 256,
              batch_size: int = 32, temperature: float = 0.0, seed: int = 0, workers: int = 1,
              parents: bool = True, keep_children: bool = False, endpoint: EndpointSpec | None = None,
              progress: bool = True, on_point=None, executor: str = "local", address: str | None = None,
              gpus_per_point: float = 0) -> SweepResult:
    """Run (or resume) a sweep into `out`; returns the table rows (parents first, then the grid).

    `executor="local"` evaluates `workers` points at a time in worker processes; `executor="ray"`
    runs every point as a Ray task (cluster at `address`) asking for `gpus_per_point` GPUs, and
    needs `out` on a filesystem all nodes share.
    """
    from chimera.eval import suites as suites_mod
    from chimera.merge.recipe import load

    if not isinstance(recipe, Recipe):
        recipe = load(Path(recipe))
    if workers < 1:
        raise ChimeraError(f"--workers must be >= 1, got {workers}")
    if n is not None and n <= 0:
        raise ChimeraError(f"--n must be positive, got {n}")
    if gpus_per_point < 0:
        raise ChimeraError(f"--gpus-per-point must be >= 0, got {gpus_per_point:g}")
    if gpus_per_point and executor != "ray":
        raise ChimeraError("--gpus-per-point needs --executor ray")
    ex = Executor(executor, workers, address)
    suite_list = suites_mod.resolve(suites)
    for s in suite_list:
        suites_mod.suite_path(s)  # unknown suite: fail before any work
    suite_list = [str(Path(s).resolve()) if s not in suites_mod.BUILTIN else s for s in suite_list]
    axes = [parse_vary(v, recipe) for v in vary]
    grid, skipped = build_grid(recipe, axes)
    for name, path in recipe.parents.items():
        if not (Path(path) / "config.json").is_file():
            raise ChimeraError(f"parent {name}: {path} is not a model directory (no config.json)")
    points = (parent_points(recipe) if parents else []) + grid
    settings = Settings(suite_list, n, max_new_tokens, batch_size, temperature, seed)

    out = Path(out).resolve()
    (out / POINTS_DIR).mkdir(parents=True, exist_ok=True)
    manifest = {"recipe": recipe.to_dict(), "axes": [{"name": a.name, "class": a.cls, "parent": a.parent,
                                                       "values": list(a.values)} for a in axes],
                "settings": settings.to_dict(), "parents": list(recipe.parents), "base": recipe.base,
                "endpoint": endpoint.cmd if endpoint else None, "skipped_infeasible": skipped}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=json_default))

    done: dict[str, dict] = {}
    tasks: list[dict] = []
    threads = max(1, (os.cpu_count() or 1) // workers) if executor == "local" and workers > 1 else None
    for p in points:
        key = point_key(p, settings)
        rec = load_done(out, p, key)
        if rec is not None:
            done[p.id] = rec
        else:
            tasks.append(make_task(p, settings, key, out, endpoint, keep_children, threads))
    reused = list(done)

    def resources(i: int) -> dict:
        return {"num_cpus": 1, "num_gpus": gpus_per_point}

    computed: list[str] = []
    with progress_bar(progress) as bar:
        task_id = bar.add_task(f"sweep {out.name}", total=len(points), completed=len(done))
        for _, rec in map_unordered(run_point, tasks, ex, processes=True, resources=resources):
            done[rec["id"]] = rec
            computed.append(rec["id"])
            bar.advance(task_id)
            if on_point:
                on_point(rec)
    axis_names = [a.name for a in axes]
    rows = [row(done[p.id], axis_names) for p in points if p.id in done]
    write_table(rows, out)
    return SweepResult(out, rows, computed, reused, skipped)
