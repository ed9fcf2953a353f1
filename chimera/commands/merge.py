"""`chimera plan | merge | diff | convert`: thin commands over chimera.merge."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from chimera.commands import ui

METRICS = ("relative", "symmetric", "rms")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def plan(recipe: Path = typer.Argument(..., help="recipe YAML (chimera schema or mergekit linear)"),
         distances: bool = typer.Option(False, "--distances", help="also read the parents to compute distances (implied by a threshold)"),
         out_dir: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory whose free space to check (default: here)"),
         top: int = typer.Option(10, "--top", help="largest distances to print"),
         json_out: Optional[Path] = typer.Option(None, "--json", help="write the full per-tensor plan as JSON")) -> None:
    """Show what the merge will do (operations, bytes copied and computed, free space, distances); writes no checkpoint."""
    from chimera.merge.recipe import load

    ui.output_file(json_out, "--json")
    ui.positive(top, "--top")
    r = load(recipe)
    from chimera.merge.output import free_bytes
    from chimera.merge.plan import build_plan
    from chimera.merge.report import plan_report

    p = build_plan(r)
    with_d = distances or p.recipe.threshold is not None
    with ui.status("reading the parents for distances") if with_d else ui.progress():
        rep = plan_report(p, with_distances=with_d)
    t = ui.table(f"plan {p.plan_id}: {p.arch}, {len(p.recipe.parents)} parents, base {p.recipe.base}",
                 ["class", "tensors", "operation", "lambdas", "bytes"], right=("tensors", "bytes"))
    for row in rep["rows"]:
        t.add_row(row["class"], str(row["tensors"]), row["op"], row["lambdas"], _gb(row["bytes"]))
    out = ui.out()
    out.print(t)
    s = rep["summary"]
    free = free_bytes(out_dir or Path.cwd())
    out.print(f"{s['tensors']} tensors in {s['shards']} shard(s)")
    if "copy_bytes" in s:
        out.print(f"writes {_gb(s['file_bytes'])}: {_gb(s['copy_bytes'])} copied, {_gb(s['computed_bytes'])} computed")
        out.print(f"reads up to {_gb(s['parent_bytes'])} of parents")
    else:
        out.print(f"writes {_gb(s['file_bytes'])}; reads up to {_gb(s['parent_bytes'])} of parents")
    fits = "fits" if s["file_bytes"] < free else "does NOT fit"
    out.print(f"free space at {out_dir or 'the current directory'}: {_gb(free)} (the output {fits})")
    for key, vals in rep["config_from_base"].items():
        out.print(f"config {key} differs ({', '.join(f'{k}={v}' for k, v in vals.items())}): the child has the base's")
    fm = rep["formats"]
    out.print(f"output formats (output.dtype {p.recipe.dtype}): " + ", ".join(f"{f} x{n}" for f, n in fm["output"].items()))
    for conv, n in fm["converted"].items():
        out.print(f"converted: {n} tensor(s) {conv}")
    if fm["segments"]:
        out.print(f"{fm['segments']} fused experts tensor(s) split per expert by the recipe's expert selectors")
    if "threshold" in rep:
        th = rep["threshold"]
        out.print(f"threshold delta={th['delta']} ({th['metric']}): {th['merged']} tensor(s) merged, "
                  f"{th['from_base']} from the base")
    if rep.get("distances"):
        d = rep["distances"]
        t = ui.table(f"{rep['metric']} distance to the base, per class", ["class", "tensors", "mean", "max"],
                     right=("tensors", "mean", "max"))
        by: dict[str, list[float]] = {}
        for it in p.items:
            if it.name in d:
                by.setdefault(it.cls or "override", []).append(d[it.name])
        for c, ds in sorted(by.items()):
            t.add_row(c, str(len(ds)), f"{sum(ds) / len(ds):.4g}", f"{max(ds):.4g}")
        out.print(t)
        t = ui.table(f"largest {min(top, len(d))}", ["tensor", "distance"], right=("distance",))
        for name, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]:
            t.add_row(name, f"{v:.4g}")
        out.print(t)
    if json_out:
        import json

        ui.write_text(json_out, json.dumps(rep, indent=2, default=str))


def merge(recipe: Path = typer.Argument(..., help="recipe YAML"),
          out: Path = typer.Option(..., "-o", "--out", help="output directory"),
          resume: bool = typer.Option(False, "--resume", help="finish an interrupted merge into OUT"),
          force: bool = typer.Option(False, "--force", help="overwrite a non-empty OUT"),
          workers: int = typer.Option(2, "--workers", "-j", help="shard jobs run in parallel"),
          compile: str = typer.Option("auto", "--compile", help="fused FP8 kernel under torch.compile: auto | on | off"),
          distances: bool = typer.Option(True, "--distances/--no-distances",
                                         help="record every tensor's distance to the base (--no-distances: copies run at disk speed)"),
          executor: str = typer.Option("local", "--executor", help="local (a thread pool) | ray (one Ray task per shard; OUT on a filesystem all nodes share)"),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address ('auto': the running cluster; default RAY_ADDRESS, else a new local one)"),
          device: str = typer.Option("auto", "--device", help="where mixes run: auto | cpu | cuda[:N] (auto: a CUDA device when there is one)")) -> None:
    """Build the child checkpoint described by RECIPE."""
    from chimera.merge.recipe import load

    ui.one_of(compile, ("auto", "on", "off"), "--compile")
    ui.one_of(executor, ("local", "ray"), "--executor")
    ui.positive(workers, "--workers")
    ui.output_dir(out, "-o")
    r = load(recipe)
    from chimera.merge.execute import run_merge
    from chimera.merge.plan import build_plan

    p = build_plan(r)
    t0 = time.perf_counter()
    with ui.task("merge", total=sum(j.nbytes for j in p.jobs), nbytes=True) as advance:
        res = run_merge(p, out, resume=resume, force=force, workers=workers, on_bytes=advance, compile=compile,
                        distances=distances, executor=executor, address=address, device=device)
    dt = time.perf_counter() - t0
    ui.out().print(f"wrote {res.out} ({res.written} of {res.shards} shard(s) this run) in {dt:.1f}s; "
                   f"operations: {res.ops}")


def diff(a: str = typer.Argument(..., help="parent A (the one measured): directory or bundled name"),
         b: str = typer.Argument(..., help="parent B (the reference, e.g. the base): directory or bundled name"),
         metric: str = typer.Option("relative", "--metric", help="relative | symmetric | rms"),
         csv: Optional[Path] = typer.Option(None, "--csv", help="write every tensor's distance"),
         plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: distance per layer and class"),
         top: int = typer.Option(15, "--top", help="rows to print")) -> None:
    """Per-tensor normalized distance between two checkpoints of one architecture."""
    from chimera.resolve import resolve_model

    ui.one_of(metric, METRICS, "--metric")
    ui.positive(top, "--top")
    ui.output_file(csv, "--csv")
    ui.output_file(plot, "--plot")
    pa, pb = resolve_model(a), resolve_model(b)
    from chimera.merge.report import diff_checkpoints, plot_diff, write_csv

    with ui.progress() as bar:
        task = bar.add_task("diff", total=None)
        rows = diff_checkpoints(pa, pb, metric, progress=lambda done, total: bar.update(task, completed=done,
                                                                                          total=total))
    out = ui.out()
    t = ui.table(f"{metric} distance of {a} to {b}, per class", ["class", "tensors", "mean", "max"],
                 right=("tensors", "mean", "max"))
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(str(r["class"]), []).append(r["distance"])
    for c, ds in sorted(by.items()):
        t.add_row(c, str(len(ds)), f"{sum(ds) / len(ds):.4g}", f"{max(ds):.4g}")
    out.print(t)
    t2 = ui.table(f"largest {top}", ["tensor", "distance"], right=("distance",))
    for r in sorted(rows, key=lambda r: -r["distance"])[:top]:
        t2.add_row(r["tensor"], f"{r['distance']:.4g}")
    out.print(t2)
    if csv:
        csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, csv)
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_diff(rows, plot, f"{metric} distance {pa.name} vs {pb.name}")


def convert(model: str = typer.Argument(..., help="checkpoint directory or bundled name"),
            out: Path = typer.Option(..., "-o", "--out"),
            dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float32 | float8 (DeepSeek 128x128 blocks)"),
            force: bool = typer.Option(False, "--force"),
            shard_size: str = typer.Option("5GB", "--shard-size")) -> None:
    """Convert FP8 <-> BF16/FP32 with DeepSeek's exact block semantics; a merged child keeps its record."""
    from chimera.merge.recipe import parse_size

    ui.one_of(dtype, ("bfloat16", "float32", "float8"), "--dtype")
    size = parse_size(shard_size, "--shard-size")
    ui.output_dir(out, "-o")
    from chimera.merge.convert import convert as run

    t0 = time.perf_counter()
    with ui.task("convert", total=None, nbytes=True) as advance:
        res = run(model, out, dtype, force=force, shard_size=size, on_bytes=advance)
    ui.out().print(f"wrote {res.out} ({dtype}, {res.shards} shard(s)) in {time.perf_counter() - t0:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
    app.command("merge")(merge)
    app.command("diff")(diff)
    app.command("convert")(convert)
