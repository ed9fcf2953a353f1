"""The two quick-start commands: `python3 tasks.py demo` and `python3 tasks.py test`.

Each creates `.venv` (once), installs the CPU build of torch and chimera into it, then runs the job.
Only Python 3.11 and pip are needed.
"""
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
TORCH = "torch==2.13.0"  # the CPU build; never let pip pick a multi-GB CUDA wheel


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def setup() -> None:
    stamp = VENV / ".chimera-installed"
    if stamp.exists() and stamp.read_text() == (ROOT / "pyproject.toml").read_text():
        return
    if not PY.exists():
        venv.create(VENV, with_pip=True)
    sh(str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH)
    # the extras the test suite exercises (Ray: tests/test_ray.py); torch stays pinned to the CPU build
    sh(str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", ".[dev,ray]", TORCH)
    stamp.write_text((ROOT / "pyproject.toml").read_text())


def main() -> int:
    job = sys.argv[1] if len(sys.argv) > 1 else ""
    if job not in ("demo", "test", "setup"):
        print("usage: python3 tasks.py demo|test|setup", file=sys.stderr)
        return 2
    setup()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if job == "demo":
        return subprocess.run([str(PY), "-m", "chimera", "demo", *sys.argv[2:]], cwd=ROOT, env=env).returncode
    if job == "test":
        return subprocess.run([str(PY), "-m", "pytest", "-q", *sys.argv[2:]], cwd=ROOT, env=env).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
