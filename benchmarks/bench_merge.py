"""Merge speed and peak memory against the disk floor (not a test; results -> benchmarks/results/).

    python benchmarks/make_parents.py            # once: ~7 GB of generated parents in benchmarks/_data
    python benchmarks/bench_merge.py [--repeat 2]

Floor = `cat` of both parents to /dev/null + a copy of one parent (what any merge must at least do),
warm page cache. Each merge runs as `python -m chimera merge` in a fresh process (wall time includes
start-up), peak RSS from the kernel's rusage of that process.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "_data"
RESULTS = ROOT / "results"
MERGEKIT_GBPS = 0.11  # shared/docs/anchors.md: mergekit 0.1.5 linear merge, 2-core machine like CI's


def gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, (peak if peak > before else float("nan")) / 1e6


def rss_of(cmd: list[str]) -> tuple[float, float]:
    """Run via a tiny wrapper so each measurement gets its own max-RSS (RUSAGE_CHILDREN is a max over all)."""
    wrap = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
            "subprocess.run(sys.argv[1:],check=True,stdout=subprocess.DEVNULL);"
            "print(json.dumps([time.perf_counter()-t,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1e6]))")
    out = subprocess.run([sys.executable, "-c", wrap, *cmd], check=True, capture_output=True, text=True).stdout
    wall, rss = json.loads(out)
    return wall, rss


def floor(a: Path, b: Path, tmp: Path) -> float:
    t = time.perf_counter()
    subprocess.run(f"cat {a}/*.safetensors {b}/*.safetensors > /dev/null", shell=True, check=True)
    shutil.copytree(a, tmp / "floor-copy")
    subprocess.run(["sync", "-f", str(tmp / "floor-copy")], check=False)
    dt = time.perf_counter() - t
    shutil.rmtree(tmp / "floor-copy")
    return dt


def recipe(tmp: Path, name: str, a: Path, b: Path, weights: dict, **out) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"parents": {"a": str(a), "b": str(b)}, "base": "a", "weights": weights,
                                 "output": {"dtype": "keep", "shard_size": "1GB", **out}}))
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    tmp = DATA / "out"
    tmp.mkdir(parents=True, exist_ok=True)
    ds_a, ds_b, mx_a, mx_b = (DATA / n for n in ("ds-a", "ds-b", "mx-a", "mx-b"))
    for p in (ds_a, ds_b, mx_a, mx_b):
        if not (p / "config.json").exists():
            sys.exit(f"missing {p}: run python benchmarks/make_parents.py first")
    cases = [
        ("fp8 selection (R1T recipe)", ds_a, ds_b, {"default": {"a": 1.0}, "routed_experts": {"b": 1.0}}, [], 1.5),
        ("fp8 fractional 0.5/0.5, compiled kernel", ds_a, ds_b, {"default": {"a": 0.5, "b": 0.5}}, ["--compile", "on"], 3.0),
        ("fp8 fractional 0.5/0.5, eager kernel", ds_a, ds_b, {"default": {"a": 0.5, "b": 0.5}}, ["--compile", "off"], 3.0),
        ("bf16 linear 0.5/0.5 (Mixtral)", mx_a, mx_b, {"default": {"a": 0.5, "b": 0.5}}, [], None),
    ]
    rows = []
    for name, a, b, w, flags, target in cases:
        if args.only and args.only not in name:
            continue
        parent_gb = gb(a) + gb(b)
        floors = [floor(a, b, tmp) for _ in range(args.repeat)]
        r = recipe(tmp, "r", a, b, w)
        runs = []
        for _ in range(args.repeat):
            out = tmp / "child"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(rss_of([sys.executable, "-m", "chimera", "merge", str(r), "-o", str(out), *flags]))
        wall = min(x[0] for x in runs)
        fl = min(floors)
        row = {"case": name, "parent_GB": round(parent_gb, 3), "floor_s": round(fl, 2), "merge_s": round(wall, 2),
               "x_floor": round(wall / fl, 2), "parent_GB_per_s": round(parent_gb / wall, 3),
               "peak_rss_GB": round(max(x[1] for x in runs), 3), "target_x_floor": target}
        if "bf16" in name:
            mk = parent_gb / MERGEKIT_GBPS
            row.update({"mergekit_s_anchor": round(mk, 1), "speedup_vs_mergekit": round(mk / wall, 1)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(tmp / "child", ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    res = {"machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "note": "warm page cache; merge_s is end to end (process start, plan, merge, finalize), best of --repeat",
           "rows": rows}
    (RESULTS / "merge.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
