"""Terminal output shared by the commands.

Progress (bars, spinners) goes to stderr and only when stderr is a terminal, so `chimera eval ... > f`
or `| head` get the results alone. Results go to stdout; tables are built to stay readable at 80
columns (`COLUMNS=80`). Checks of arguments that need no model live here too, so every command can
fail on them before it loads anything.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from chimera.errors import ChimeraError


@cache
def err():
    from rich.console import Console

    return Console(stderr=True)


@cache
def out():
    from rich.console import Console

    return Console()


def warn(message: str) -> None:
    """A one-line `warning: ...` on stderr (always shown, terminal or not)."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def table(title: str | None, columns: list[str], right: tuple[str, ...] = ()):
    """A rich Table that wraps cells rather than clipping them when the terminal is narrow."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", min_width=len(title) if title else None)  # title on one line when it fits
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    return t


@contextmanager
def progress(nbytes: bool = False, count: bool = True) -> Iterator:
    """A rich Progress on stderr (disabled unless stderr is a terminal); transient. Bars count items, or
    bytes with `nbytes`; `count=False` is a spinner with the elapsed time."""
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    cols = [SpinnerColumn(), TextColumn("{task.description}")]
    if count:
        cols += [BarColumn(bar_width=24), *([DownloadColumn(), TransferSpeedColumn()] if nbytes
                                            else [MofNCompleteColumn()])]
    cols += [TimeElapsedColumn()] + ([TimeRemainingColumn()] if count else [])
    with Progress(*cols, console=err(), transient=True, disable=not err().is_terminal) as p:
        yield p


@contextmanager
def task(description: str, total: int | None = None, nbytes: bool = False) -> Iterator[Callable[[int], None]]:
    """One progress bar; yields `advance(n)`."""
    with progress(nbytes) as p:
        t = p.add_task(description, total=total)
        yield lambda n=1: p.advance(t, n)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while something without a count runs (loading a model)."""
    with progress(count=False) as p:
        p.add_task(message, total=None)
        yield


# --------------------------------------------------------------------------- argument checks (no model needed)

def _creatable(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` is a folder we may write in (so `path` can be made there)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ChimeraError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ChimeraError(f"{flag} {path}: {parent} is not writable")


def output_file(path: Path | None, flag: str) -> Path | None:
    """An output file the command will write: not a directory, and its folder exists or can be made there."""
    if path is None:
        return None
    if path.is_dir():
        raise ChimeraError(f"{flag} {path}: is a directory (give a file name)")
    _creatable(path, flag)
    return path


def output_dir(path: Path, flag: str = "-o") -> Path:
    """An output directory the command will create or fill: not a file, under a writable folder."""
    if path.exists() and not path.is_dir():
        raise ChimeraError(f"{flag} {path}: exists and is a file, not a directory")
    if not path.exists():
        _creatable(path, flag)
    return path


def write_text(path: Path, text: str) -> None:
    """Write a result file (making its folder); a failure (a full disk, ...) is one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise ChimeraError(f"{path}: cannot write ({e.strerror or e})") from None


def positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ChimeraError(f"{flag} must be at least 1, got {value}")


def one_of(value: str, choices: tuple[str, ...], flag: str) -> str:
    if value not in choices:
        raise ChimeraError(f"{flag} must be {' | '.join(choices)}, got {value!r}")
    return value


def experts(off: str | None, on: str | None, mode: str, model: str | None = None) -> tuple[list, list]:
    """Parse --off/--on/--mode before any model loads: syntax, @ftri.json files and their length, the mode,
    and, given the model, layer and expert numbers within its config.json (`num_hidden_layers`, the routed
    expert count). Which layers are MoE layers is checked against the loaded model."""
    from chimera.moe.experts import MODES, parse_experts

    one_of(mode, MODES, "--mode")
    off_l, on_l = (parse_experts(off) if off else []), (parse_experts(on) if on else [])
    if model is not None and (off_l or on_l):
        import json

        from chimera.resolve import resolve_model

        cfg = json.loads((resolve_model(model) / "config.json").read_text())
        layers = cfg.get("num_hidden_layers")
        n_exp = next((cfg[k] for k in ("n_routed_experts", "num_local_experts", "num_experts") if cfg.get(k)), None)
        for flag, pairs in (("--off", off_l), ("--on", on_l)):
            for layer, e in pairs:
                if isinstance(layers, int) and not 0 <= layer < layers:
                    raise ChimeraError(f"{flag} {layer}:{e}: {model} has decoder layers 0-{layers - 1}")
                if isinstance(n_exp, int) and not 0 <= e < n_exp:
                    raise ChimeraError(f"{flag} {layer}:{e}: {model} has routed experts 0-{n_exp - 1}")
    return off_l, on_l
