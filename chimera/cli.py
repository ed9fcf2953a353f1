"""The `chimera` command line: each wing registers its thin typer commands here.

Every command parses its arguments, calls one library function and prints. A `ChimeraError` becomes a
one-line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import sys

import typer

from chimera.errors import ChimeraError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="chimera: Assembly of Experts merges and Mixture of Tunable Experts switches for MoE LLMs.")


def _register() -> None:
    from chimera.commands import demo, eval, merge, moe, prune, serve, sweep

    for wing in (merge, eval, moe, sweep, demo, serve, prune):
        wing.register(app)


_register()


def main() -> None:
    try:
        app(standalone_mode=False)
    except ChimeraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
