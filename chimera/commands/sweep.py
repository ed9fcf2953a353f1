"""`chimera sweep` and `chimera report`: thin commands over chimera.sweep and chimera.report."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def sweep(
    recipe: Path = typer.Argument(..., help="base recipe YAML (parents, base, the lambdas not varied)"),
    vary: List[str] = typer.Option(..., "--vary", help="CLASS.PARENT=start:stop:step | a,b,c (or threshold.delta=...); repeat for a 2-D grid"),
    out: Path = typer.Option(..., "-o", "--out", help="sweep directory (re-run to resume)"),
    suite: str = typer.Option("all", "--suite", "-s", help="arithmetic, sensitive, language, all, or .jsonl files (comma-separated)"),
    n: Optional[int] = typer.Option(None, "--n", help="items per suite (spread over the file)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    batch_size: int = typer.Option(32, "--batch-size"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers", "-j", help="grid points evaluated in parallel worker processes"),
    no_parents: bool = typer.Option(False, "--no-parents", help="don't evaluate the parents as reference rows"),
    keep_children: bool = typer.Option(False, "--keep-children", help="keep each child checkpoint in OUT/children/"),
    endpoint_cmd: Optional[str] = typer.Option(None, "--endpoint-cmd", help="serve each child: a command template with {model} and {port}, e.g. 'vllm serve {model} --port {port}'"),
    endpoint_url: str = typer.Option("http://127.0.0.1:{port}/v1/chat/completions", "--endpoint-url", help="URL template of the served child"),
    served_name: str = typer.Option("{model}", "--served-name", help="the request's model field ('' for none)"),
    startup_timeout: float = typer.Option(900.0, "--startup-timeout", help="seconds to wait for each server"),
    report: bool = typer.Option(True, "--report/--no-report", help="also write OUT/report/ (markdown, PNGs, HTML)"),
    executor: str = typer.Option("local", "--executor", help="local (worker processes) | ray (one Ray task per point; OUT on a shared filesystem)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address ('auto': the running cluster; default RAY_ADDRESS, else a new local one)"),
    gpus_per_point: float = typer.Option(0, "--gpus-per-point", help="GPUs each Ray task asks for (with --executor ray)"),
) -> None:
    """Evaluate a grid of children (lambdas per tensor class) into one table: OUT/table.csv|json."""
    from rich.console import Console

    from chimera import sweep as sw

    endpoint = None
    if endpoint_cmd:
        endpoint = sw.EndpointSpec(endpoint_cmd, endpoint_url, served_name or None, startup_timeout)
    res = sw.run_sweep(recipe, vary, out, suite, n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       temperature=temperature, seed=seed, workers=workers, parents=not no_parents,
                       keep_children=keep_children, endpoint=endpoint, executor=executor, address=address,
                       gpus_per_point=gpus_per_point)
    con = Console()
    con.print(f"{len(res.rows)} point(s): {len(res.computed)} evaluated, {len(res.reused)} reused"
              + (f", {res.skipped} infeasible skipped" if res.skipped else "") + f" -> {res.out / 'table.csv'}")
    if report:
        from chimera import report as rp

        page = rp.write_report(res.out)
        con.print(f"report: {page}")


def report(
    sweep_dir: Path = typer.Argument(..., help="a sweep directory (from `chimera sweep`)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="where to write (default SWEEP_DIR/report)"),
    title: Optional[str] = typer.Option(None, "--title"),
) -> None:
    """Markdown + PNG plots + a self-contained HTML page of a sweep's table."""
    from chimera import report as rp

    page = rp.write_report(sweep_dir, out, title=title)
    print(page)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
    app.command("report")(report)
