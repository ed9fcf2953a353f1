"""One grid point: merge the child (for a parent, nothing), evaluate it, write `OUT/points/<id>.json`.

`run_point(task)` is a plain function of a JSON-able dict, so the same call runs in this process, a
worker process or a Ray task on another machine that shares the sweep directory. A point's result file
carries a key of everything its numbers depend on (settings, recipe, the parents' file fingerprints),
so a re-run reuses exactly the points whose key still matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from chimera.merge.recipe import from_dict
from chimera.sweep.grid import Point
from chimera.sweep.servers import EndpointSpec, serving

POINTS_DIR, CHILDREN_DIR, MANIFEST = "points", "children", "sweep.json"


@dataclass
class Settings:
    suites: list[str]
    n: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 32
    temperature: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return {"suites": list(self.suites), "n": self.n, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "temperature": self.temperature, "seed": self.seed}


def fingerprint(model_dir: str | Path) -> str:
    """Name, size and mtime of a checkpoint's files: a parent rebuilt in place invalidates its results."""
    d = Path(model_dir)
    files = sorted(f for f in d.iterdir() if f.is_file()) if d.is_dir() else []
    blob = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]


def point_key(point: Point, settings: Settings) -> str:
    """What a finished point's result depends on (not where the sweep directory lives)."""
    models = sorted(point.recipe["parents"].values()) if point.recipe else [point.model]
    blob = {"settings": settings.to_dict(), "recipe": point.recipe, "model": point.model, "kind": point.kind,
            "parents": {m: fingerprint(m) for m in models}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def load_done(out: Path, point: Point, key: str) -> dict | None:
    """The finished record of `point` in `out` if its key matches, else None."""
    f = out / POINTS_DIR / f"{point.id}.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("key") == key else None


def evaluate_dir(model_dir: Path, settings: Settings, endpoint: EndpointSpec | None, log: Path) -> dict:
    """The harness's report for one model directory, in process or on a server started for it."""
    from chimera.eval import harness

    kw = dict(n=settings.n, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
              temperature=settings.temperature, seed=settings.seed)
    if endpoint is None:
        model, tok = harness.load(model_dir)
        return harness.evaluate(model, tok, settings.suites, **kw)
    with serving(endpoint, model_dir, log) as ep:
        return harness.evaluate(ep, None, settings.suites, **kw)


def merge_child(recipe_d: dict, out: Path) -> dict:
    """Write the child with the merge engine; returns the operation counts."""
    from chimera.merge.execute import run_merge
    from chimera.merge.plan import build_plan

    recipe = from_dict(recipe_d, "sweep recipe")
    res = run_merge(build_plan(recipe), out, force=True, workers=1)
    ops = res.ops
    thresholded = [r for r in res.records.values() if "distance" in r]
    return {"ops": ops, "tensors": len(res.records),
            "tensors_mixed": ops.get("mix", 0), "tensors_from_base": ops.get("base", 0),
            "tensors_thresholded": len(thresholded)}


def make_task(point: Point, settings: Settings, key: str, out: Path, endpoint: EndpointSpec | None,
              keep_children: bool, threads: int | None) -> dict:
    """The JSON-able argument of `run_point`."""
    return {"point": point.__dict__, "settings": settings.to_dict(), "key": key, "out": str(out),
            "endpoint": endpoint.__dict__ if endpoint else None, "keep_children": keep_children,
            "threads": threads}


def run_point(task: dict) -> dict:
    """Merge (for a child) and evaluate one point; write its result file atomically; return it."""
    if task.get("threads"):
        import torch

        torch.set_num_threads(int(task["threads"]))
    p = Point(**task["point"])
    settings = Settings(**task["settings"])
    endpoint = EndpointSpec(**task["endpoint"]) if task.get("endpoint") else None
    out = Path(task["out"])
    t0 = time.time()
    merge_info = None
    child_dir = None
    try:
        if p.kind == "child":
            child_dir = out / CHILDREN_DIR / p.id
            merge_info = merge_child(p.recipe, child_dir)
            model_dir = child_dir
        else:
            model_dir = Path(p.model)
        report = evaluate_dir(model_dir, settings, endpoint, out / "logs" / f"{p.id}.server.log")
    finally:
        if child_dir is not None and not task.get("keep_children"):
            shutil.rmtree(child_dir, ignore_errors=True)
    for entry in report.values():  # keep the files small: a few examples are enough
        entry.pop("responses", None)
    rec = {"id": p.id, "kind": p.kind, "label": p.label, "coords": p.coords, "recipe": p.recipe,
           "model": p.model, "key": task["key"], "settings": settings.to_dict(),
           "endpoint": bool(endpoint), "merge": merge_info, "seconds": round(time.time() - t0, 2),
           "ran_on": {"host": socket.gethostname(), "pid": os.getpid()},
           "report": report}
    path = out / POINTS_DIR / f"{p.id}.json"
    tmp = path.with_name(f".{p.id}.{os.getpid()}.json.partial")
    tmp.write_text(json.dumps(rec, indent=1, default=json_default))
    os.replace(tmp, path)
    return rec


def json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
