"""`chimera eval`, `chimera generate`, `chimera train-zoo`: check the arguments, call the library, print."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Optional

import typer

from chimera.commands import ui
from chimera.errors import ChimeraError

METRIC_ORDER = ("accuracy", "think_rate", "refusal_rate", "reasoning_language", "output_tokens_mean",
                "output_tokens_p90")


def _model(model: str, endpoint: Optional[str], api_key: Optional[str]):
    from chimera.eval.endpoint import Endpoint

    if endpoint:
        return Endpoint(endpoint, model=model or None, api_key=api_key), None
    from chimera.eval import harness

    with ui.status(f"loading {model}"):
        return harness.load(model)


def _switch(model, off: list, on: list, mode: str):
    """The MoTE switch context when --off/--on is given (imported only then)."""
    if not off and not on:
        return contextlib.nullcontext()
    from chimera.moe.switch import switched

    return switched(model, off=off, on=on, mode=mode)


def _check_switch(off: Optional[str], on: Optional[str], mode: str, endpoint: Optional[str],
                  model: str) -> tuple[list, list]:
    if (off or on) and endpoint:
        raise ChimeraError("--off/--on switch experts of a local model; they cannot apply to --endpoint")
    return ui.experts(off, on, mode, None if endpoint else model)


def _fmt(name: str, m: dict) -> tuple[str, str]:
    v, lo, hi = m["value"], m["lo"], m["hi"]
    if name.startswith("output_tokens"):
        return f"{v:.1f}", f"[{lo:.1f}, {hi:.1f}]"
    if isinstance(v, float) and math.isnan(v):
        return "-", "-"
    return f"{100 * v:.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def print_report(report: dict, title: str) -> None:
    """One table: a suite's whole-sample row ('all') and one row group per split; then how many were sampled."""
    table = ui.table(title, ["suite", "split", "metric", "value", "95% CI", "n"], right=("value", "n"))
    for suite, entry in report.items():
        groups = [("all", entry["metrics"])] + list(entry["splits"].items())
        for split, metrics in groups:
            for name in METRIC_ORDER:
                if name in metrics:
                    value, ci = _fmt(name, metrics[name])
                    table.add_row(suite, split, name, value, ci, str(metrics[name]["n"]))
        table.add_section()
    ui.out().print(table)
    for suite, entry in report.items():
        if entry.get("of") and entry["n"] < entry["of"]:
            per = ", ".join(f"{s} {v['n']} of {v['of']}" for s, v in entry.get("sample", {}).items())
            ui.out().print(f"{suite}: sampled {entry['n']} of {entry['of']} items" + (f" ({per})" if per else ""))
        if "refusal_rate" not in entry["metrics"] and any("refusal_rate" in m for m in entry["splits"].values()):
            ui.out().print(f"{suite}: refusal rate per split only (sensitive vs benign prompts)")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Argument(..., help="model directory, bundled name (tiny-r1), or served model name with --endpoint"),
        suite: str = typer.Option("all", "--suite", "-s", help="arithmetic, sensitive, language, all, or a .jsonl file (comma-separated)"),
        n: Optional[int] = typer.Option(None, "--n", help="items per suite, each split in proportion (at least 5 per split)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report here"),
        endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible URL (/v1/completions or /v1/chat/completions)"),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY"),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
        batch_size: int = typer.Option(32, "--batch-size"),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
        seed: int = typer.Option(0, "--seed"),
        off: Optional[str] = typer.Option(None, "--off", help="experts to switch off, e.g. 1:7,2:3 or @ftri.json:10"),
        on: Optional[str] = typer.Option(None, "--on", help="experts to force on"),
        mode: str = typer.Option("replace", "--mode", help="replace | drop"),
    ):
        """Score a model on evaluation suites (accuracy, <think> rate, length, refusal, reasoning language)."""
        from chimera.eval import harness

        ui.positive(n, "--n")
        ui.positive(max_new_tokens, "--max-new-tokens")
        ui.positive(batch_size, "--batch-size")
        items = harness.planned(suite, n)  # bad suites fail before the model loads
        ui.output_file(json_out, "--json")
        off_l, on_l = _check_switch(off, on, mode, endpoint, model)
        m, tok = _model(model, endpoint, api_key)
        with _switch(m, off_l, on_l, mode), ui.progress() as bar:
            tasks = {name: bar.add_task(f"eval {Path(name).stem}", total=len(it)) for name, it in items.items()}
            report = harness.evaluate(m, tok, suite, n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      temperature=temperature, seed=seed,
                                      progress=lambda s, done, total: bar.update(tasks[s], completed=done))
        print_report(report, f"chimera eval {model}")
        if json_out:
            ui.write_text(json_out, json.dumps({"model": model, "endpoint": endpoint, "off": off, "on": on,
                                                "mode": mode, "suites": report}, indent=2, ensure_ascii=False) + "\n")

    @app.command("generate")
    def generate_cmd(
        model: str = typer.Argument(..., help="model directory, bundled name, or served model name with --endpoint"),
        prompt: list[str] = typer.Argument(..., help="one or more prompts"),
        endpoint: Optional[str] = typer.Option(None, "--endpoint"),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY"),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
        temperature: float = typer.Option(0.0, "--temperature"),
        seed: int = typer.Option(0, "--seed"),
        raw: bool = typer.Option(False, "--raw", help="no chat template"),
        off: Optional[str] = typer.Option(None, "--off", help="experts to switch off, e.g. 1:7,2:3 or @ftri.json:10"),
        on: Optional[str] = typer.Option(None, "--on", help="experts to force on"),
        mode: str = typer.Option("replace", "--mode", help="replace | drop"),
    ):
        """Generate a response for each prompt."""
        from chimera.eval import harness

        ui.positive(max_new_tokens, "--max-new-tokens")
        off_l, on_l = _check_switch(off, on, mode, endpoint, model)
        m, tok = _model(model, endpoint, api_key)
        with _switch(m, off_l, on_l, mode), ui.task("generate", total=len(prompt)) as advance:
            texts = harness.generate(m, tok, list(prompt), max_new_tokens, temperature=temperature, seed=seed,
                                     chat=not raw, on_batch=advance)
        for t in texts:
            typer.echo(t)

    @app.command("train-zoo")
    def train_zoo_cmd(
        out: Path = typer.Option(Path("zoo-build"), "--out", help="a new or empty folder to write the family into"),
        install: bool = typer.Option(False, "--install", help="write into the bundled chimera/zoo/models instead of --out, replacing the shipped models"),
        scale: float = typer.Option(1.0, "--scale", help="multiply every phase's steps (e.g. 0.01 for a smoke run)"),
        fp8: bool = typer.Option(True, "--fp8/--no-fp8", help="also write the FP8 copies"),
        summary: Optional[Path] = typer.Option(None, "--summary", help="write the training summary JSON here"),
    ):
        """Rebuild the tiny model family from scratch into a new folder (seeded, one thread; 35 min measured
        on 2 shared cores, see docs/model-family.md). The bundled models are never touched unless --install is given."""
        from chimera.zoo import family, train

        if scale <= 0:
            raise ChimeraError(f"--scale must be positive, got {scale}")
        target = family.MODELS_DIR if install else out
        if not install and target.resolve() == family.MODELS_DIR.resolve():
            raise ChimeraError(f"{target}: this is the bundled model folder; use --install to replace it")
        if not install and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ChimeraError(f"{target}: output exists and is not empty; choose a new folder with --out")
        partial = target.parent / f".{target.name}.partial"  # nothing half-written under the final name
        if partial.exists():
            shutil.rmtree(partial)
        s = train.build_family(partial, scale=scale, fp8=fp8, log=typer.echo)
        target.mkdir(parents=True, exist_ok=True)
        for d in sorted(partial.iterdir()):
            if (target / d.name).exists():  # only with --install: one bundled model at a time
                shutil.rmtree(target / d.name)
            d.rename(target / d.name)
        partial.rmdir()
        text = json.dumps(s, indent=2, default=str)
        if summary:
            summary.write_text(text + "\n")
        typer.echo(f"trained {', '.join(s['plan']['children'])} into {target} in {s['seconds_total']:.0f} s "
                   f"({s['params']:,} parameters each); fp8: {', '.join(s.get('fp8', [])) or 'none'}")
