"""The `chimera` command line: each wing registers its thin typer commands here.

Every command checks its arguments, calls one library function and prints. Whatever goes wrong for a
user's reason ends as one line on stderr, never a traceback:

- a usage mistake (unknown command or option, missing or malformed argument): `error: ...`, status 2;
- a `ChimeraError` (bad input, failed check): `error: ...`, status 2;
- an `OSError` (missing file, full disk, permissions): `error: FILE: reason`, status 2;
- Ctrl-C: `error: interrupted`, status 130.

`CHIMERA_DEBUG=1` shows the traceback of the last two as well. Bare `chimera` prints the help; the
commands' modules import torch, transformers and numpy only inside the commands that need them, so
`chimera --help` stays fast.
"""
from __future__ import annotations

import os
import sys

import typer

from chimera.errors import ChimeraError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="chimera: Assembly of Experts merges and Mixture of Tunable Experts switches for MoE LLMs.")


def _version(value: bool) -> None:
    if value:
        from chimera import __version__

        typer.echo(f"chimera {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """chimera: Assembly of Experts merges and Mixture of Tunable Experts switches for MoE LLMs."""


def _register() -> None:
    from chimera.commands import demo, eval, merge, moe, prune, serve, sweep

    for wing in (merge, eval, moe, sweep, demo, serve, prune):
        wing.register(app)


_register()


def _click_exceptions():
    """The exceptions module of the click that typer runs on (typer >= 0.22 vendors its own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:  # an older typer on the real click
        from click import exceptions
    return exceptions


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _os_message(e: OSError) -> str:
    where = e.filename if e.filename is not None else None
    what = e.strerror or str(e)
    return f"{where}: {what}" if where is not None else what


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("CHIMERA_DEBUG", "") not in ("", "0")
    ce = _click_exceptions()
    try:
        code = app(args=argv, prog_name="chimera", standalone_mode=False)
        sys.stdout.flush()
    except ce.NoArgsIsHelpError:  # bare `chimera`: the help was printed; that is not an error
        sys.exit(0)
    except ce.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) is not None else ""
        _fail(e.format_message().rstrip(".") + hint)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C inside click's own handling
        _fail("interrupted", 130)
    except ce.ClickException as e:
        _fail(e.format_message(), e.exit_code or 2)
    except ChimeraError as e:
        if debug:
            raise
        _fail(str(e))
    except BrokenPipeError:  # `chimera ... | head`: the reader went away; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        if debug:
            raise
        _fail(_os_message(e))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    if isinstance(code, int) and code:  # typer.Exit(code) from a command
        sys.exit(code)
