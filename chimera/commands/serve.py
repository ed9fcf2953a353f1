"""`chimera serve`: parse, build the app, run uvicorn."""
from __future__ import annotations

from typing import Optional

import typer

from chimera.errors import ChimeraError


def _serve(model: str = typer.Argument(..., help="model directory or bundled model name"),
           host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (localhost unless told)"),
           port: int = typer.Option(8000, "--port"),
           api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHIMERA_API_KEY",
                                                 help="require 'Authorization: Bearer KEY'"),
           name: Optional[str] = typer.Option(None, "--served-model-name", help="model id clients send "
                                                                                "(default: the directory name)"),
           max_batch: int = typer.Option(8, "--max-batch", help="requests with the same switch decoded together"),
           max_queue: int = typer.Option(64, "--max-queue", help="queued requests before answering 429"),
           max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens")) -> None:
    """OpenAI-compatible server; requests may switch experts ("experts": {"off": ["2:14"]}) and ask for
    "return_routed_experts"."""
    try:
        import uvicorn
    except ImportError:
        raise ChimeraError("chimera serve needs the serve extra: pip install 'chimera[serve]'") from None
    if max_batch < 1 or max_queue < 1:
        raise ChimeraError("--max-batch and --max-queue must be at least 1")
    from chimera.serve import build

    app, server = build(model, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                        max_prompt_tokens=max_prompt_tokens, name=name)
    typer.echo(f"serving {server.name} on http://{host}:{port}/v1 (MoE layers {list(server.engine.layers)})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(_serve)
