"""Behaviour sweeps: a grid of lambdas -> recipes -> child checkpoints -> evaluations -> one table.

    chimera sweep recipe.yaml --vary routed_experts.r1=0:1:0.1 [--vary default.r1=0,0.5] --suite all -o sweep/

Grid axes (`--vary AXIS=SPEC`, SPEC is `start:stop:step` with an inclusive, rounding-safe stop, or a
comma list):

- `CLASS.PARENT=x` (CLASS a tensor class or `default`): PARENT gets lambda x for that class. The
  remaining mass 1 - x goes to the class's other parents in proportion to their lambdas in the base
  recipe's vector for that class (the class's own vector, else `default`); with two parents the other
  simply gets 1 - x. Several axes on the same class fix several parents at once (a simplex sweep over
  three parents); grid points whose fixed lambdas sum above 1 are infeasible and skipped. A vary that
  can't be satisfied (the rest would have to be split among several parents that all have lambda 0
  in the base vector) is an error. `default` applies to classes without their own vector; overrides
  are left as they are.
- `threshold.delta=d`: the recipe's threshold delta (metric from the recipe, else `relative`).

Each grid point is a child written by the merge engine into `OUT/children/<id>` (removed after its
evaluation unless `keep_children`), evaluated by the harness in memory, or on an OpenAI-compatible
server started per child from `endpoint_cmd` (a template with `{model}` and `{port}`). Every parent
is evaluated as well (the table's reference rows). One JSON file per point in `OUT/points/` makes an
interrupted sweep resumable: a point whose file holds the same settings is not recomputed. The table
is written to `OUT/table.csv` and `OUT/table.json`; `chimera report OUT` draws it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from chimera.checkpoint.arch import CLASSES
from chimera.errors import ChimeraError
from chimera.merge.recipe import Recipe, from_dict

POINTS_DIR, CHILDREN_DIR, MANIFEST = "points", "children", "sweep.json"
HEADLINE = ("accuracy", "think_rate", "output_tokens_mean", "output_tokens_p90", "refusal_rate",
            "reasoning_language")
# where each headline metric is read from (first suite/split present wins; else the first suite with it)
HEADLINE_SOURCES = {
    "accuracy": ["arithmetic"], "think_rate": ["arithmetic"], "output_tokens_mean": ["arithmetic"],
    "output_tokens_p90": ["arithmetic"], "refusal_rate": ["sensitive/sensitive", "sensitive"],
    "reasoning_language": ["language"],
}
EPS = 1e-9


# ------------------------------------------------------------------ the grid

@dataclass(frozen=True)
class Axis:
    """One `--vary`: `cls.parent` (lambda) or `threshold.delta`, with its values."""

    name: str                  # e.g. "routed_experts.r1" or "threshold.delta"
    cls: str | None            # tensor class or "default"; None for the threshold axis
    parent: str | None
    values: tuple[float, ...]


@dataclass
class Point:
    id: str
    kind: str                  # "child" | "parent"
    label: str
    coords: dict[str, float] = field(default_factory=dict)
    recipe: dict | None = None   # the child's recipe (absolute parent paths); None for a parent
    model: str | None = None     # a parent's directory


def parse_values(spec: str, where: str) -> list[float]:
    """`0:1:0.1` (inclusive stop, rounding-safe) or `0,0.25,1` -> sorted unique floats."""
    spec = spec.strip()
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ChimeraError(f"{where}: a range is start:stop:step, got {spec!r}")
            start, stop, step = (float(p) for p in parts)
            if not step > 0:
                raise ChimeraError(f"{where}: step must be > 0, got {step:g}")
            if stop < start:
                raise ChimeraError(f"{where}: stop {stop:g} is below start {start:g}")
            k = int(math.floor((stop - start) / step + 1e-6))
            vals = [start + i * step for i in range(k + 1)]
            if abs(vals[-1] - stop) > 1e-6 * max(1.0, abs(step)) and vals[-1] < stop:
                vals.append(stop)  # a step that doesn't land on stop: stop is still included
            if len(vals) > 10000:
                raise ChimeraError(f"{where}: {len(vals)} values is too many")
        else:
            vals = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ChimeraError(f"{where}: values must be numbers (start:stop:step or a comma list), got {spec!r}") from None
    if not vals:
        raise ChimeraError(f"{where}: no values given")
    vals = [round(v, 10) + 0.0 for v in vals]
    if any(not math.isfinite(v) for v in vals):
        raise ChimeraError(f"{where}: values must be finite")
    return sorted(set(vals))


def parse_vary(text: str, recipe: Recipe) -> Axis:
    """One `--vary` argument, validated against the recipe's parents and the tensor classes."""
    where = f"--vary {text}"
    if "=" not in text:
        raise ChimeraError(f"{where}: expected CLASS.PARENT=VALUES or threshold.delta=VALUES")
    name, spec = (s.strip() for s in text.split("=", 1))
    if "." not in name:
        raise ChimeraError(f"{where}: expected CLASS.PARENT=VALUES (e.g. routed_experts.r1=0:1:0.1)")
    cls, parent = name.split(".", 1)
    values = parse_values(spec, where)
    if cls == "threshold":
        if parent != "delta":
            raise ChimeraError(f"{where}: only threshold.delta can be varied")
        if any(v < 0 for v in values):
            raise ChimeraError(f"{where}: threshold.delta must be >= 0")
        return Axis(name, None, None, tuple(values))
    if cls != "default" and cls not in CLASSES:
        raise ChimeraError(f"{where}: unknown tensor class {cls!r} (classes: default, {', '.join(CLASSES)})")
    if parent not in recipe.parents:
        raise ChimeraError(f"{where}: unknown parent {parent!r} (parents: {', '.join(recipe.parents)})")
    bad = [v for v in values if v < -EPS or v > 1 + EPS]
    if bad:
        raise ChimeraError(f"{where}: lambda {bad[0]:g} is outside [0, 1]")
    if len(recipe.parents) < 2:
        raise ChimeraError(f"{where}: a lambda sweep needs at least two parents")
    return Axis(name, cls, parent, tuple(values))


def _fmt(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def point_id(coords: dict[str, float]) -> str:
    s = "__".join(f"{k}-{_fmt(v)}" for k, v in coords.items())
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", s) or "point"


def child_weights(recipe: Recipe, cls: str, fixed: dict[str, float], where: str) -> dict[str, float] | None:
    """The lambda vector of `cls` with `fixed` parents set; None when infeasible (fixed sum > 1)."""
    total = sum(fixed.values())
    if total > 1 + 1e-9:
        return None
    base_vec = recipe.weights.get(cls, recipe.weights["default"])
    others = [p for p in recipe.parents if p not in fixed]
    rest = 1.0 - total
    out = dict(fixed)
    if rest <= 1e-12:
        out.update({p: 0.0 for p in others})
    elif not others:
        return None  # every parent fixed and they don't sum to 1
    else:
        mass = {p: base_vec.get(p, 0.0) for p in others}
        m = sum(mass.values())
        if m > 0:
            out.update({p: rest * mass[p] / m for p in others})
        elif len(others) == 1:
            out[others[0]] = rest
        else:
            raise ChimeraError(f"{where}: cannot split the remaining {_fmt(rest)} among {', '.join(others)} "
                               f"(all have lambda 0 in the recipe's {cls} vector; give it one, or vary them too)")
    out = {p: round(out[p], 12) for p in recipe.parents if out.get(p, 0.0) > 1e-12}
    s = sum(out.values())
    return {p: v / s for p, v in out.items()}


def build_grid(recipe: Recipe, axes: list[Axis]) -> tuple[list[Point], int]:
    """(feasible child points in grid order, number of infeasible points skipped)."""
    if not axes:
        raise ChimeraError("a sweep needs at least one --vary")
    names = [a.name for a in axes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ChimeraError(f"--vary {sorted(dup)[0]} is given twice")
    base = recipe.to_dict()
    points, skipped = [], 0
    for combo in product(*(a.values for a in axes)):
        coords = {a.name: v for a, v in zip(axes, combo)}
        d = json.loads(json.dumps(base))
        by_cls: dict[str, dict[str, float]] = {}
        for a, v in zip(axes, combo):
            if a.cls is None:
                d["threshold"] = {"delta": v, "metric": (recipe.threshold.metric if recipe.threshold else "relative")}
            else:
                by_cls.setdefault(a.cls, {})[a.parent] = v
        feasible = True
        for cls, fixed in by_cls.items():
            vec = child_weights(recipe, cls, fixed, "--vary " + ",".join(f"{cls}.{p}" for p in fixed))
            if vec is None:
                feasible = False
                break
            d["weights"][cls] = vec
        if not feasible:
            skipped += 1
            continue
        pid = point_id(coords)
        child = from_dict(d, f"sweep point {pid}")  # validates the derived recipe
        points.append(Point(pid, "child", pid, coords, child.to_dict()))
    if not points:
        raise ChimeraError("every grid point is infeasible (lambdas fixed on one class sum above 1)")
    return points, skipped


def parent_points(recipe: Recipe) -> list[Point]:
    return [Point(f"parent-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}", "parent", name, {}, None, str(path))
            for name, path in recipe.parents.items()]


# ------------------------------------------------------------------ evaluating one point

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


@dataclass
class EndpointSpec:
    """Start one OpenAI-compatible server per model: `cmd` with {model} and {port}; `url` likewise."""

    cmd: str
    url: str = "http://127.0.0.1:{port}/v1/chat/completions"
    served_name: str | None = "{model}"   # the request's `model` field; vLLM serves the path by default
    startup_timeout: float = 900.0


def fingerprint(model_dir: str | Path) -> str:
    """Name, size and mtime of a checkpoint's files: a parent rebuilt in place invalidates its results."""
    d = Path(model_dir)
    files = sorted(f for f in d.iterdir() if f.is_file()) if d.is_dir() else []
    blob = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]


def _key(point: Point, settings: Settings) -> str:
    """What a finished point's result depends on (not where the sweep directory lives)."""
    models = sorted(point.recipe["parents"].values()) if point.recipe else [point.model]
    blob = {"settings": settings.to_dict(), "recipe": point.recipe, "model": point.model, "kind": point.kind,
            "parents": {m: fingerprint(m) for m in models}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    """Until the server answers any HTTP request (a 404/405 counts) or dies."""
    base = re.match(r"(https?://[^/]+)", url).group(1)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise ChimeraError(f"endpoint server exited with status {proc.returncode} before serving"
                               + (f" ({tail[0][:160]})" if tail else ""))
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise ChimeraError(f"endpoint server did not answer on {base} within {timeout:g}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def _evaluate_dir(model_dir: Path, settings: Settings, endpoint: EndpointSpec | None, log: Path) -> dict:
    from chimera.eval import harness

    kw = dict(n=settings.n, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
              temperature=settings.temperature, seed=settings.seed)
    if endpoint is None:
        model, tok = harness.load(model_dir)
        return harness.evaluate(model, tok, settings.suites, **kw)
    from chimera.eval.endpoint import Endpoint

    port = _free_port()
    fill = {"model": str(model_dir), "port": port}
    cmd = shlex.split(endpoint.cmd.format(**fill))
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = endpoint.url.format(**fill)
        _wait_ready(proc, url, endpoint.startup_timeout, log)
        ep = Endpoint(url, model=endpoint.served_name.format(**fill) if endpoint.served_name else None)
        return harness.evaluate(ep, None, settings.suites, **kw)
    finally:
        _stop(proc)


def _merge_child(recipe_d: dict, out: Path) -> dict:
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


def run_point(task: dict) -> dict:
    """Merge (for a child) and evaluate one point; write its result file atomically; return it.

    A plain function of a JSON-able dict so it runs the same in this process or a worker process."""
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
            merge_info = _merge_child(p.recipe, child_dir)
            model_dir = child_dir
        else:
            model_dir = Path(p.model)
        if endpoint is not None:
            (out / "logs").mkdir(exist_ok=True)
        report = _evaluate_dir(model_dir, settings, endpoint, out / "logs" / f"{p.id}.server.log")
    finally:
        if child_dir is not None and not task.get("keep_children"):
            shutil.rmtree(child_dir, ignore_errors=True)
    for entry in report.values():  # keep the files small: a few examples are enough
        entry.pop("responses", None)
    rec = {"id": p.id, "kind": p.kind, "label": p.label, "coords": p.coords, "recipe": p.recipe,
           "model": p.model, "key": task["key"], "settings": settings.to_dict(),
           "endpoint": bool(endpoint), "merge": merge_info, "seconds": round(time.time() - t0, 2),
           "report": report}
    path = out / POINTS_DIR / f"{p.id}.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(rec, indent=1, default=_json_default))
    os.replace(tmp, path)
    return rec


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# ------------------------------------------------------------------ the table

def _metric(report: dict, metric: str) -> dict | None:
    for src in HEADLINE_SOURCES.get(metric, []):
        suite, _, split = src.partition("/")
        entry = report.get(suite)
        if entry is None:
            continue
        ms = entry["splits"].get(split, {}) if split else entry["metrics"]
        if metric in ms:
            return ms[metric]
    for entry in report.values():
        if metric in entry["metrics"]:
            return entry["metrics"][metric]
    return None


def weights_text(recipe: dict | None) -> str:
    if not recipe:
        return ""
    parts = []
    for cls, vec in recipe["weights"].items():
        parts.append(f"{cls}: " + " ".join(f"{p}={_fmt(v)}" for p, v in vec.items()))
    return "; ".join(parts)


def row(rec: dict, axes: list[str]) -> dict:
    """One table row: identity, lambdas, headline metrics with intervals, then every suite metric."""
    r: dict = {"point": rec["id"], "kind": rec["kind"], "label": rec["label"]}
    for a in axes:
        r[a] = rec["coords"].get(a)
    r["weights"] = weights_text(rec.get("recipe"))
    th = (rec.get("recipe") or {}).get("threshold")
    r["delta"] = th["delta"] if th else None
    m = rec.get("merge") or {}
    r["tensors_mixed"] = m.get("tensors_mixed")
    r["tensors_from_base"] = m.get("tensors_from_base")
    for name in HEADLINE:
        v = _metric(rec["report"], name)
        r[name] = v["value"] if v else None
        r[f"{name}_lo"] = v["lo"] if v else None
        r[f"{name}_hi"] = v["hi"] if v else None
        r[f"{name}_n"] = v["n"] if v else None
    for suite, entry in rec["report"].items():
        for name, v in entry["metrics"].items():
            r[f"{suite}.{name}"] = v["value"]
            r[f"{suite}.{name}_lo"] = v["lo"]
            r[f"{suite}.{name}_hi"] = v["hi"]
    r["seconds"] = rec.get("seconds")
    return r


def write_table(rows: list[dict], out: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    tmp = out / "table.json.partial"
    tmp.write_text(json.dumps(rows, indent=1, default=_json_default, allow_nan=True))
    os.replace(tmp, out / "table.json")


def load_table(sweep_dir: str | Path) -> tuple[list[dict], dict]:
    """(rows, manifest) of a finished (or partly finished) sweep directory."""
    d = Path(sweep_dir)
    if not (d / MANIFEST).is_file():
        raise ChimeraError(f"{d}: not a sweep directory (no {MANIFEST})")
    manifest = json.loads((d / MANIFEST).read_text())
    if (d / "table.json").is_file():
        return json.loads((d / "table.json").read_text()), manifest
    axes = [a["name"] for a in manifest["axes"]]
    recs = [json.loads(f.read_text()) for f in (d / POINTS_DIR).glob("*.json")]
    recs.sort(key=lambda r: (r["kind"] != "parent",
                             [r["coords"].get(a, -1.0) for a in axes] if r["kind"] == "child" else [],
                             manifest["parents"].index(r["label"]) if r["label"] in manifest["parents"] else 0))
    rows = [row(r, axes) for r in recs]
    if not rows:
        raise ChimeraError(f"{d}: no finished points yet")
    return rows, manifest


# ------------------------------------------------------------------ the sweep

@dataclass
class SweepResult:
    out: Path
    rows: list[dict]
    computed: list[str]        # point ids evaluated in this run
    reused: list[str]          # point ids taken from an earlier run
    skipped: int               # infeasible grid points


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_terminal))


def run_sweep(recipe: Recipe | str | os.PathLike, vary: list[str], out: str | os.PathLike,
              suites: str | list[str] = "all", n: int | None = None, *, max_new_tokens: int = 256,
              batch_size: int = 32, temperature: float = 0.0, seed: int = 0, workers: int = 1,
              parents: bool = True, keep_children: bool = False, endpoint: EndpointSpec | None = None,
              progress: bool = True, on_point=None) -> SweepResult:
    """Run (or resume) a sweep into `out`; returns the table rows (parents first, then the grid)."""
    from chimera.eval import suites as suites_mod
    from chimera.merge.recipe import load

    if not isinstance(recipe, Recipe):
        recipe = load(Path(recipe))
    if workers < 1:
        raise ChimeraError(f"--workers must be >= 1, got {workers}")
    if n is not None and n <= 0:
        raise ChimeraError(f"--n must be positive, got {n}")
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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))

    done: dict[str, dict] = {}
    todo: list[tuple[Point, str]] = []
    for p in points:
        key = _key(p, settings)
        f = out / POINTS_DIR / f"{p.id}.json"
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
            except json.JSONDecodeError:
                rec = None
            if rec and rec.get("key") == key:
                done[p.id] = rec
                continue
        todo.append((p, key))
    reused = list(done)

    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    tasks = [{"point": p.__dict__, "settings": settings.to_dict(), "key": key, "out": str(out),
              "endpoint": endpoint.__dict__ if endpoint else None, "keep_children": keep_children,
              "threads": threads} for p, key in todo]
    computed: list[str] = []
    with _progress(progress) as bar:
        task_id = bar.add_task(f"sweep {out.name}", total=len(points), completed=len(done))

        def finished(rec: dict) -> None:
            done[rec["id"]] = rec
            computed.append(rec["id"])
            bar.advance(task_id)
            if on_point:
                on_point(rec)

        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                finished(run_point(t))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(run_point, t) for t in tasks}
                try:
                    while futures:
                        fin, futures = wait(futures, return_when=FIRST_COMPLETED)
                        for fut in fin:
                            finished(fut.result())
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    axis_names = [a.name for a in axes]
    rows = [row(done[p.id], axis_names) for p in points if p.id in done]
    write_table(rows, out)
    return SweepResult(out, rows, computed, reused, skipped)
