"""How long `chimera --help` takes (goal: <= 0.5 s), median of several runs, end to end in a fresh process.

    python benchmarks/bench_cli.py                          # this checkout -> results/cli.json["current"]
    python benchmarks/bench_cli.py --src OTHER --label before   # another checkout's chimera/ package

Also records a bare `python -c pass` (the interpreter's own start-up) and the machine's load average, which
on a shared machine moves every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cli.json"


def timed(cmd: list[str], env: dict, cwd: Path, runs: int) -> list[float]:
    subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=True)  # warm the page cache once
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=True)
        out.append(round(time.perf_counter() - t, 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--src", type=Path, default=ROOT, help="the folder holding the chimera/ package to time")
    ap.add_argument("--label", default="current")
    args = ap.parse_args()
    src = args.src.resolve()
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; sys.argv = ['chimera', '--help']; from chimera.cli import main; main()"
    where = subprocess.run([sys.executable, "-c", "import chimera; print(chimera.__file__)"], env=env, cwd=src,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(src)), where
    runs = timed([sys.executable, "-c", code], env, src, args.runs)
    bare = timed([sys.executable, "-c", "pass"], env, src, args.runs)
    probe = ("import sys; sys.argv = ['chimera', '--help']\nfrom chimera.cli import main\ntry:\n    main()\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') "
             "if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", probe], env=env, cwd=src, capture_output=True,
                              text=True).stdout.strip()
    row = {"command": "chimera --help", "median_s": statistics.median(runs), "runs_s": runs,
           "python_startup_median_s": statistics.median(bare), "heavy_modules_imported": imported.splitlines()[-1],
           "goal_s": 0.5, "load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[args.label] = row
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({args.label: row}, indent=2))


if __name__ == "__main__":
    main()
