"""`chimera eval`, `chimera generate`, `chimera train-zoo`: parse, call the library, print."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Optional

import typer

from chimera.errors import ChimeraError

METRIC_ORDER = ("accuracy", "think_rate", "refusal_rate", "reasoning_language", "output_tokens_mean",
                "output_tokens_p90")


def _model(model: str, endpoint: Optional[str], api_key: Optional[str]):
    from chimera.eval import harness
    from chimera.eval.endpoint import Endpoint

    if endpoint:
        return Endpoint(endpoint, model=model or None, api_key=api_key), None
    return harness.load(model)


def _switch(model, off: Optional[str], on: Optional[str], mode: str):
    """The MoTE switch context when --off/--on is given (imported only then)."""
    if not off and not on:
        return contextlib.nullcontext()
    if mode not in ("replace", "drop"):
        raise ChimeraError(f"--mode must be replace or drop, got {mode!r}")
    from chimera.eval.endpoint import Endpoint

    if isinstance(model, Endpoint):
        raise ChimeraError("--off/--on switch experts of a local model; they cannot apply to --endpoint")
    from chimera.moe.switch import parse_experts, switched

    return switched(model, off=parse_experts(off) if off else [], on=parse_experts(on) if on else [], mode=mode)


def _fmt(name: str, m: dict) -> tuple[str, str]:
    v, lo, hi = m["value"], m["lo"], m["hi"]
    if name.startswith("output_tokens"):
        return f"{v:.1f}", f"[{lo:.1f}, {hi:.1f}]"
    if isinstance(v, float) and math.isnan(v):
        return "-", "-"
    return f"{100 * v:.1f}%", f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def print_report(report: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("suite", "split", "metric", "value", "95% CI", "n"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for suite, entry in report.items():
        groups = [("all", entry["metrics"])] + list(entry["splits"].items())
        for split, metrics in groups:
            for name in METRIC_ORDER:
                if name in metrics:
                    value, ci = _fmt(name, metrics[name])
                    table.add_row(suite, split, name, value, ci, str(metrics[name]["n"]))
        table.add_section()
    Console().print(table)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Argument(..., help="model directory, zoo name (tiny-r1), or served model name with --endpoint"),
        suite: str = typer.Option("all", "--suite", "-s", help="arithmetic, sensitive, language, all, or a .jsonl file (comma-separated)"),
        n: Optional[int] = typer.Option(None, "--n", help="items per suite (spread over the file)"),
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
        from chimera.eval import harness, suites

        for name in suites.resolve(suite):  # bad suites fail before the model loads
            suites.load(name)
        m, tok = _model(model, endpoint, api_key)
        with _switch(m, off, on, mode):
            report = harness.evaluate(m, tok, suite, n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      temperature=temperature, seed=seed)
        print_report(report, f"chimera eval {model}")
        if json_out:
            json_out.write_text(json.dumps({"model": model, "endpoint": endpoint, "off": off, "on": on,
                                            "mode": mode, "suites": report}, indent=2, ensure_ascii=False) + "\n")

    @app.command("generate")
    def generate_cmd(
        model: str = typer.Argument(..., help="model directory, zoo name, or served model name with --endpoint"),
        prompt: list[str] = typer.Argument(..., help="one or more prompts"),
        endpoint: Optional[str] = typer.Option(None, "--endpoint"),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY"),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
        temperature: float = typer.Option(0.0, "--temperature"),
        seed: int = typer.Option(0, "--seed"),
        raw: bool = typer.Option(False, "--raw", help="no chat template"),
        off: Optional[str] = typer.Option(None, "--off"),
        on: Optional[str] = typer.Option(None, "--on"),
        mode: str = typer.Option("replace", "--mode"),
    ):
        """Generate a response for each prompt."""
        from chimera.eval import harness

        m, tok = _model(model, endpoint, api_key)
        with _switch(m, off, on, mode):
            texts = harness.generate(m, tok, list(prompt), max_new_tokens, temperature=temperature, seed=seed,
                                     chat=not raw)
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
        """Rebuild the tiny model family from scratch into a new folder (seeded, one thread; about 80 min,
        see docs/model-family.md). The bundled models are never touched unless --install is given."""
        from chimera.zoo import family, train

        if scale <= 0:
            raise ChimeraError(f"--scale must be positive, got {scale}")
        target = family.MODELS_DIR if install else out
        if not install and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ChimeraError(f"{target}: output exists and is not empty; choose a new folder with --out")
        if not install and target.resolve() == family.MODELS_DIR.resolve():
            raise ChimeraError(f"{target}: this is the bundled model folder; use --install to replace it")
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
