"""Merges and sweeps on a real local Ray cluster (2 CPUs, started here): the same bytes and rows as
the local executor, a worker killed mid-shard retried with the same bytes, --resume after a failed
shard, finished sweep points resumed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import yaml

from chimera.errors import ChimeraError

REPO = Path(__file__).resolve().parents[1]
N, MAX_NEW, SUITES = 4, 32, "arithmetic,sensitive"


@pytest.fixture(scope="module")
def pause_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-pause")


@pytest.fixture(scope="module")
def cluster(pause_dir):
    env = {"PYTHONPATH": str(Path(__file__).parent), "CHIMERA_TEST_PAUSE_DIR": str(pause_dir)}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             logging_level="WARNING",
             runtime_env={"env_vars": env, "worker_process_setup_hook": "ray_hooks.pause_after_first_write"})
    yield ray
    ray.shutdown()


def sha_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def merge_case(ds_pair, tmp_path_factory):
    """A recipe with copies and mixes over several shards, and its output from the local executor."""
    from chimera.merge import merge

    a, b, *_ = ds_pair
    d = tmp_path_factory.mktemp("raymerge")
    shutil.copytree(b, d / "r1", copy_function=shutil.copy2)   # a parent this module may damage and restore
    rec = d / "recipe.yaml"
    rec.write_text(yaml.safe_dump({"parents": {"v3": str(a), "r1": str(d / "r1")}, "base": "v3",
                                   "weights": {"default": {"v3": 0.7, "r1": 0.3}, "routed_experts": {"r1": 1.0}},
                                   "output": {"shard_size": "200KB"}}))
    ref = merge(rec, d / "local")
    assert ref.shards >= 4 and set(ref.ops) == {"copy", "mix"}
    return rec, d, sha_dir(d / "local")


def test_merge_on_ray_is_byte_identical(cluster, merge_case, tmp_path):
    """`chimera merge --executor ray --address ...` (a second driver joining this cluster)."""
    rec, _, want = merge_case
    address = ray.get_runtime_context().gcs_address
    p = subprocess.run([sys.executable, "-m", "chimera", "merge", str(rec), "-o", str(tmp_path / "out"),
                        "--executor", "ray", "--address", address], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sha_dir(tmp_path / "out") == want


def test_worker_killed_mid_shard_is_retried(cluster, merge_case, pause_dir, tmp_path):
    from chimera.merge import merge

    rec, _, want = merge_case
    (pause_dir / "armed").write_text("")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(merge, rec, tmp_path / "out", executor="ray")
        t0 = time.time()
        while not (pause_dir / "claimed").exists():
            assert time.time() - t0 < 120 and not running.done(), "no worker paused"
            time.sleep(0.1)
        time.sleep(0.2)
        pid_s, partial = (pause_dir / "claimed").read_text().split(" ", 1)
        pid = int(pid_s)
        assert Path(partial).exists() and Path(partial).stat().st_size > 0   # a shard half written
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")  # a Ray worker process
        os.kill(pid, signal.SIGKILL)
        (pause_dir / "armed").unlink()
        res = running.result(timeout=300)
    assert not Path(f"/proc/{pid}").exists()
    assert res.written == res.shards and sha_dir(tmp_path / "out") == want
    assert not list((tmp_path / "out").glob(".*partial"))


def test_resume_on_ray_after_a_failed_shard(cluster, merge_case, tmp_path):
    """A shard whose parent bytes hold NaN codes fails (one-line error); the rest stay done; with the
    bytes restored (same size and mtime: the same plan) --resume on Ray finishes the same output."""
    from chimera.merge import build_plan, load, merge

    rec, d, want = merge_case
    plan = build_plan(load(rec))
    it = next(i for i in plan.jobs[-1].items if i.op == "mix" and i.fp8_out)
    w = it.source("r1").weight
    data, st = w.file.read_bytes(), w.file.stat()
    with open(w.file, "r+b") as f:
        f.seek(w.start)
        f.write(b"\x7f" * w.nbytes)                                          # e4m3fn NaN
    os.utime(w.file, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        with pytest.raises(ChimeraError, match=f"tensor {it.name}: the mix produced NaN/Inf"):
            merge(rec, tmp_path / "out", executor="ray")
    finally:
        w.file.write_bytes(data)
        os.utime(w.file, ns=(st.st_atime_ns, st.st_mtime_ns))
    done = json.loads((tmp_path / "out" / ".chimera" / "progress.json").read_text())["done"]
    assert plan.jobs[-1].filename not in done and len(done) >= 1
    res = merge(rec, tmp_path / "out", resume=True, executor="ray")
    assert res.written == len(plan.jobs) - len(done) and sha_dir(tmp_path / "out") == want


@pytest.fixture(scope="module")
def zoo_recipe(tmp_path_factory):
    from chimera.zoo import family

    assert {"tiny-v3", "tiny-r1"} <= set(family.available()), "bundled tiny-v3 / tiny-r1 missing"
    rec = tmp_path_factory.mktemp("raysweep") / "recipe.yaml"
    rec.write_text(f"parents: {{v3: {family.model_path('tiny-v3')}, r1: {family.model_path('tiny-r1')}}}\n"
                   "base: v3\nweights: {default: {v3: 1.0}}\n")
    return rec


def _metrics(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_sweep_on_ray_matches_local_and_resumes(cluster, zoo_recipe):
    from chimera.sweep import run_sweep

    vary = ["default.r1=0:1:0.5"]
    kw = dict(suites=SUITES, n=N, max_new_tokens=MAX_NEW, parents=False, progress=False)
    on_ray = run_sweep(zoo_recipe, vary, zoo_recipe.parent / "ray", executor="ray", **kw)
    assert sorted(on_ray.computed) == ["default.r1-0", "default.r1-0.5", "default.r1-1"]
    ran_on = [json.loads((on_ray.out / "points" / f"{p}.json").read_text())["ran_on"] for p in on_ray.computed]
    assert os.getpid() not in {r["pid"] for r in ran_on}  # in Ray's worker processes, not here
    local = run_sweep(zoo_recipe, vary, zoo_recipe.parent / "local", **kw)
    assert _metrics(on_ray.rows) == _metrics(local.rows)  # same children, same greedy evaluations
    assert on_ray.rows[1]["accuracy_n"] == N
    # finished points are reused; a lost one is recomputed on the cluster
    (on_ray.out / "points" / "default.r1-0.5.json").unlink()
    again = run_sweep(zoo_recipe, vary, on_ray.out, executor="ray", **kw)
    assert again.computed == ["default.r1-0.5"] and sorted(again.reused) == ["default.r1-0", "default.r1-1"]
    assert _metrics(again.rows) == _metrics(on_ray.rows)


def test_executor_flags_are_checked(zoo_recipe, tmp_path):
    from chimera.sweep import run_sweep

    with pytest.raises(ChimeraError, match="--gpus-per-point needs --executor ray"):
        run_sweep(zoo_recipe, ["default.r1=1"], tmp_path / "o", gpus_per_point=1, progress=False)
    p = subprocess.run([sys.executable, "-m", "chimera", "sweep", str(zoo_recipe), "--vary", "default.r1=1",
                        "-o", str(tmp_path / "o"), "--executor", "slurm"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: --executor slurm: expected one of local, ray"]
