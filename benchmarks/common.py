"""Shared by the benchmark scripts: timed child processes with their peak RSS, the load average at
each measurement, medians, and one JSON file per run in benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"

# runs a command, then prints its wall seconds and its process tree's peak RSS (the largest child's)
_WRAP = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
         "p=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
         "dt=time.perf_counter()-t;"
         "print(json.dumps([p.returncode,dt,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1e6,p.stderr[-2000:]]))")


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, peak RSS (GB) and the 1-minute load average before/after, of one command."""
    before = load1()
    out = subprocess.run([sys.executable, "-c", _WRAP, *map(str, cmd)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True).stdout
    rc, wall, rss, err = json.loads(out)
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {rc}: {err.strip().splitlines()[-1:]}")
    return {"s": round(wall, 3), "peak_rss_GB": round(rss, 3), "load1": [before, load1()]}


def summary(samples: list[dict]) -> dict:
    """Median, min and max wall time of repeated runs, with every sample kept."""
    walls = [s["s"] for s in samples]
    return {"median_s": round(statistics.median(walls), 3), "min_s": min(walls), "max_s": max(walls),
            "peak_rss_GB": max(s.get("peak_rss_GB", 0.0) for s in samples),
            "load1_max": max(max(s["load1"]) for s in samples), "samples": samples}


def timed(fn, reps: int) -> dict:
    """Median of `reps` in-process calls of fn() (after one warm-up), with the load average."""
    fn()
    samples = []
    for _ in range(reps):
        before = load1()
        t = time.perf_counter()
        fn()
        samples.append({"s": round(time.perf_counter() - t, 5), "load1": [before, load1()]})
    return summary(samples)


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name"))
        info["mem_GB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    return info


def write_result(name: str, data: dict) -> Path:
    """benchmarks/results/<name>-<UTC time>.json (this run) and <name>.json (the latest run)."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data = {"benchmark": name, "utc": stamp, "machine": machine(), **data}
    text = json.dumps(data, indent=2) + "\n"
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(text)
    (RESULTS / f"{name}.json").write_text(text)
    return path
