"""`chimera serve`: an OpenAI-compatible server with per-request expert switches (see `app.py`, `engine.py`)."""
from __future__ import annotations


def build(model: str, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
          max_prompt_tokens: int | None = None, name: str | None = None):
    """(Starlette app, Server) for a model directory or zoo name, loaded once, on CPU or wherever it loads."""
    from pathlib import Path

    from chimera.eval.harness import load
    from chimera.serve.app import Server, build_app
    from chimera.serve.engine import Engine

    m, tok = load(model)
    server = Server(Engine(m, tok, max_batch=max_batch, max_queue=max_queue), name or Path(str(model)).name,
                    api_key=api_key, max_prompt_tokens=max_prompt_tokens)
    return build_app(server), server
