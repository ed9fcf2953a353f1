"""Merges and sweeps on a real local Ray cluster (2 CPUs, started here): the same bytes and rows as
the local executor, finished points resumed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from chimera.errors import ChimeraError

REPO = Path(__file__).resolve().parents[1]
N, MAX_NEW, SUITES = 4, 32, "arithmetic,sensitive"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


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
