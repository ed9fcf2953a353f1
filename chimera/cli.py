"""The `chimera` command line: each wing registers its thin typer commands here.

Every command parses its arguments, calls one library function and prints. A `ChimeraError` becomes a
one-line `error: ...` on stderr and exit status 2; an `OSError` (a full disk, a missing directory) one
line naming the file, exit status 1. `CHIMERA_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import os
import sys

import typer

from chimera.errors import ChimeraError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="chimera: Assembly of Experts merges and Mixture of Tunable Experts switches for MoE LLMs.")


def _register() -> None:
    from chimera.commands import demo, eval, merge, moe, sweep

    for wing in (merge, eval, moe, sweep, demo):
        wing.register(app)


_register()


def main() -> None:
    try:
        app(standalone_mode=False)
    except (ChimeraError, OSError) as e:
        if os.environ.get("CHIMERA_DEBUG"):
            raise
        if isinstance(e, ChimeraError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:  # pragma: no cover - typer's own exits
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise
