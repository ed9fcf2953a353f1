"""The benchmark's own environment for mergekit (never a dependency of chimera).

    python3 benchmarks/mergekit_env.py        # -> benchmarks/.venv-mergekit (git-ignored), ~1.6 GB

mergekit 0.1.5 (the anchor in shared/docs/anchors.md) with the CPU build of torch 2.13.0 pinned, so
pip never pulls a CUDA wheel. Idempotent: an existing environment with mergekit is reused.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-mergekit"
PINS = ["torch==2.13.0", "mergekit==0.1.5"]


def mergekit_yaml() -> Path:
    """The `mergekit-yaml` executable, installing the environment first if needed."""
    exe = VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        if not (VENV / "bin" / "python").exists():
            venv.create(VENV, with_pip=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *PINS], check=True)
    return exe


if __name__ == "__main__":
    print(mergekit_yaml())
    sys.exit(0)
