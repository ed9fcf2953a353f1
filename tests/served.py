"""Start real servers for the tests: `chimera serve` (and `transformers serve`) as subprocesses on free
localhost ports, waited for through their own /health or /v1/models route, stopped at the end."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


class Served:
    def __init__(self, argv: list[str], port: int, probe: str, headers: dict | None = None, timeout: float = 120,
                 extra_env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"served-{port}.log", "w+")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env(**(extra_env or {})), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + probe, headers=headers or {}, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server on {self.url} did not come up in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
        self.log.close()


def chimera_serve(model: str = "tiny-r1", *args: str, extra_env: dict | None = None) -> Served:
    port = free_port()
    argv = [sys.executable, "-m", "chimera", "serve", model, "--port", str(port), "--api-key", API_KEY, *args]
    return Served(argv, port, "/health", extra_env=extra_env)
