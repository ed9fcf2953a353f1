"""One OpenAI-compatible server per evaluated model, started from a command template and stopped after.

    with serving(EndpointSpec("vllm serve {model} --port {port}"), model_dir, log) as endpoint:
        harness.evaluate(endpoint, None, suites)

The server runs in its own process group (so a server that forks workers is stopped whole), on a free
port of the machine running the point; it is ready when it answers any HTTP request.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chimera.errors import ChimeraError


@dataclass
class EndpointSpec:
    """Start one OpenAI-compatible server per model: `cmd` with {model} and {port}; `url` likewise."""

    cmd: str
    url: str = "http://127.0.0.1:{port}/v1/chat/completions"
    served_name: str | None = "{model}"   # the request's `model` field; vLLM serves the path by default
    startup_timeout: float = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    """Until the server answers any HTTP request (a 404/405 counts) or dies."""
    base = re.match(r"(https?://[^/]+)", url).group(1)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise ChimeraError(f"endpoint server exited with status {proc.returncode} before serving"
                               + (f" ({tail[0][:160]})" if tail else ""))
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise ChimeraError(f"endpoint server did not answer on {base} within {timeout:g}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


@contextmanager
def serving(spec: EndpointSpec, model_dir: Path, log: Path) -> Iterator:
    """A started server for `model_dir` (its output in `log`), as an `Endpoint` client; stopped on exit."""
    from chimera.eval.endpoint import Endpoint

    port = free_port()
    fill = {"model": str(model_dir), "port": port}
    cmd = shlex.split(spec.cmd.format(**fill))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = spec.url.format(**fill)
        wait_ready(proc, url, spec.startup_timeout, log)
        yield Endpoint(url, model=spec.served_name.format(**fill) if spec.served_name else None)
    finally:
        stop(proc)
