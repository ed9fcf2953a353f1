"""The merge engine on real machines and other people's files: selections that stay copies under a
threshold, what `plan` shows, distances in the record, full disks, two writers, the hot paths."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ckpt
from ckpt import recipe, sha_dir
from chimera.checkpoint.arch import classify
from chimera.merge import build_plan, merge
from chimera.merge.execute import run_merge
from chimera.merge.recipe import load
from chimera.merge.report import plan_report

SCALE = ".weight_scale_inv"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def other_quantizer(tmp_path_factory):
    """Base `a` (scales amax/448) and `b` from another quantizer (scales amax/240: codes never reach
    448); only the routed experts differ much."""
    root = tmp_path_factory.mktemp("oq")
    sd, cfg = ckpt.ds_state(40, mtp=False)
    sd2 = ckpt.perturb(ckpt.perturb(sd, 41, scale=0.5, only="mlp.experts."), 42, scale=0.001)
    a = ckpt.write(root / "a", sd, cfg, "fp8")
    b = ckpt.write(root / "b", sd2, cfg, "fp8", fp8_max=240.0)
    return a, b, cfg


def test_selection_under_a_threshold_is_a_copy(other_quantizer, tmp_path):
    a, b, cfg = other_quantizer
    got_b = tensors(b)
    q = got_b["model.layers.1.mlp.experts.0.up_proj.weight"].float().abs()
    assert float(q.max()) <= 240                                     # the other quantizer's codes
    base = {"parents": {"a": str(a), "b": str(b)}, "base": "a", "threshold": {"delta": 0.1, "metric": "relative"},
            "output": {"shard_size": "300KB"}}
    # R1T + threshold: the experts are far from the base, so they are b's stored bytes, recorded as copy
    r = recipe(tmp_path, dict(base, weights={"default": {"a": 1.0}, "routed_experts": {"b": 1.0}}))
    rep = plan_report(build_plan(load(r)), with_distances=True)
    assert rep["summary"]["computed_bytes"] == 0 and rep["summary"]["copy_bytes"] == rep["summary"]["output_bytes"]
    res = merge(r, tmp_path / "r1t")
    got, pa, pb = ckpt.raw(tmp_path / "r1t"), ckpt.raw(a), ckpt.raw(b)
    for name, rec in res.records.items():
        want = pb if rec["class"] == "routed_experts" else pa
        assert rec["op"] == "copy", (name, rec)
        assert got[name] == want[name], name
        if name[: -len(".weight")] + SCALE in want:
            assert got[name[: -len(".weight")] + SCALE] == want[name[: -len(".weight")] + SCALE]
    # select b everywhere: below the threshold a tensor is the base's bytes, above it b's bytes
    r = recipe(tmp_path, dict(base, weights={"default": {"b": 1.0}}), "all-b.yaml")
    res = merge(r, tmp_path / "all-b")
    got = ckpt.raw(tmp_path / "all-b")
    ops = Counter(rec["op"] for rec in res.records.values())
    assert ops["copy"] > 0 and ops["base"] > 0 and set(ops) == {"copy", "base"}
    for name, rec in res.records.items():
        want = pb if rec["op"] == "copy" else pa
        assert (rec["distance"] >= 0.1) == (rec["op"] == "copy")
        assert got[name] == want[name], name


def test_plan_shows_what_the_merge_does(tmp_path):
    """With a threshold, plan's rows (class, operation) are the merge's records, not the recipe's lambdas."""
    sd, cfg = ckpt.ds_state(5, mtp=False)
    sd2 = ckpt.perturb(ckpt.perturb(sd, 6, scale=0.5, only="mlp.experts."), 7, scale=0.001)
    a = ckpt.write(tmp_path / "a", sd, cfg, "fp8")
    b = ckpt.write(tmp_path / "b", sd2, cfg, "fp8")
    r = recipe(tmp_path, {"parents": {"r1": str(b), "v3": str(a)}, "base": "v3",
                          "weights": {"default": {"v3": 0.7, "r1": 0.3}}, "threshold": {"delta": 0.1}})
    p = subprocess.run([sys.executable, "-m", "chimera", "plan", str(r), "--json", str(tmp_path / "plan.json")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    res = merge(r, tmp_path / "child")
    want = Counter((rec["class"], rec["op"]) for rec in res.records.values())
    assert Counter({(row["class"], row["op"]): row["tensors"] for row in rows}) == want
    norm_rows = [line for line in p.stdout.splitlines() if line.startswith("│ norm ") and " MB " in line]
    assert norm_rows and all("base" in line and "v3=1" in line and "mix" not in line for line in norm_rows)
    assert f"{want[('routed_experts', 'mix')]} tensor(s) merged" in p.stdout
    s = json.loads((tmp_path / "plan.json").read_text())["summary"]
    written = sum(f.stat().st_size for f in (tmp_path / "child").glob("*.safetensors"))
    assert s["file_bytes"] == written and s["copy_bytes"] + s["computed_bytes"] == s["output_bytes"]
    mixed = sum(it.nbytes for it in build_plan(load(r)).items if res.records[it.name]["op"] == "mix")
    assert s["computed_bytes"] == mixed
    assert "free space at" in p.stdout and "copied" in p.stdout and "computed" in p.stdout


def test_plan_distances_printed_at_80_columns(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    r = recipe(tmp_path, {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                          "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}})
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.run([sys.executable, "-m", "chimera", "plan", str(r), "--distances", "--top", "5",
                        "--json", str(tmp_path / "p.json")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 80
    d = json.loads((tmp_path / "p.json").read_text())["distances"]
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    top = max(d, key=d.get)
    assert abs(d[top] - float((fb[top] - fa[top]).norm() / fa[top].norm())) < 1e-6
    assert top in p.stdout and "per class" in p.stdout and "largest 5" in p.stdout
    cfg = json.loads((a / "config.json").read_text())
    for cls in {classify(n, cfg) for n in d}:
        assert any(line.startswith(f"│ {cls} ") for line in p.stdout.splitlines()), cls


def test_every_tensor_records_its_distance(ds_pair, tmp_path):
    """R1T (copies only): each record holds max_i d(P_i, base), measured in several row chunks."""
    a, b, *_ = ds_pair
    r = recipe(tmp_path, {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                          "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}})
    res = run_merge(build_plan(load(r)), tmp_path / "child", chunk_elems=128 * 136)
    report = json.loads((tmp_path / "child" / "chimera_merge.json").read_text())
    assert report["metric"] == "relative" and report["tensors"] == res.records
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    assert set(res.records) == set(fa)
    for name, rec in res.records.items():
        want = float((fb[name] - fa[name]).norm() / fa[name].norm())
        assert abs(rec["distance"] - want) <= 1e-6 * max(want, 1e-3), name
    run_merge(build_plan(load(r)), tmp_path / "fast", distances=False)
    assert {k: v for k, v in sha_dir(tmp_path / "fast").items() if k.endswith(".safetensors")} == \
        {k: v for k, v in sha_dir(tmp_path / "child").items() if k.endswith(".safetensors")}


def test_pure_selection_computes_nothing(ds_pair, tmp_path):
    """A pure selection imports no torch (nor transformers): planning reads the architecture's roles from the
    cached table (`checkpoint/archcache.py`, warmed here by a first plan, which derives them with torch), the
    copies are kernel copies and the distances are summed from the FP8 codes by the C kernel. No arithmetic
    module is loaded and every tensor is a copy."""
    import os

    a, b, *_ = ds_pair
    r = recipe(tmp_path, {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                          "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}})
    env = {**os.environ, "CHIMERA_CACHE": str(tmp_path / "cache")}
    warm = subprocess.run([sys.executable, "-c", "import sys; from chimera.merge import build_plan, load; "
                           "build_plan(load(sys.argv[1]))", str(r)], capture_output=True, text=True, env=env)
    assert warm.returncode == 0, warm.stderr
    code = ("import sys; from chimera.merge import merge; res = merge(sys.argv[1], sys.argv[2]); "
            "print(sorted(res.ops), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m in ('chimera.merge.mix', 'chimera.checkpoint.fp8', 'chimera.checkpoint.mxfp4', "
            "'chimera.checkpoint.int4')))")
    p = subprocess.run([sys.executable, "-c", code, str(r), str(tmp_path / "child")], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "['copy'] []"
    got, pa, pb = ckpt.raw(tmp_path / "child"), ckpt.raw(a), ckpt.raw(b)
    assert all(got[k] in (pa[k], pb[k]) for k in got)
    rec = json.loads((tmp_path / "child" / "chimera_merge.json").read_text())
    assert rec["tensors"] and all("distance" in t for t in rec["tensors"].values())


# ------------------------------------------------------------------ full disks

RUNNER = r"""
import os, resource, sys
from pathlib import Path
from chimera.errors import ChimeraError
from chimera.merge import build_plan, load, run_merge

recipe, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
plan = build_plan(load(recipe))
seen, hit = [0], [False]

def fill():  # after shard 1: leave 64 KB (records and progress fit, shard 2 does not)
    if mode == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        return
    st = os.statvfs(out)
    left = st.f_bavail * st.f_frsize - 64 * 1024
    with open(out.parent / "filler", "wb") as f:
        while left > 0:
            left -= f.write(b"\0" * min(left, 1 << 16))

def on_bytes(n):
    seen[0] += n
    if seen[0] >= plan.jobs[0].nbytes and not hit[0]:
        hit[0] = True
        fill()

try:
    run_merge(plan, out, workers=1, on_bytes=on_bytes)
except ChimeraError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _in_tmpfs(tmp: Path, size: int, body: str) -> bool:
    """Run a shell script with a fresh tmpfs of `size` bytes at tmp/mnt (a private mount namespace).
    False where this machine cannot make one."""
    if not shutil.which("unshare"):
        return False
    (tmp / "mnt").mkdir()
    script = f"mount -t tmpfs -o size={size} tmpfs {tmp / 'mnt'} || exit 99\n{body}"
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True)
    return p.returncode != 99 and "unshare:" not in p.stderr


def test_disk_fills_up_then_resume(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    r = recipe(tmp_path, {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                          "weights": {"default": {"v3": 0.7, "r1": 0.3}}, "output": {"shard_size": "300KB"}})
    plan = build_plan(load(r))
    merge(r, tmp_path / "ref")
    (tmp_path / "runner.py").write_text(RUNNER)
    py, mnt = sys.executable, tmp_path / "mnt"
    size = (plan.summary()["file_bytes"] + (4 << 20)) // 4096 * 4096
    body = (f"{py} {tmp_path / 'runner.py'} {r} {mnt / 'out'} tmpfs 2> {tmp_path / 'err1'}; echo $? > {tmp_path / 'rc1'}\n"
            f"cp -a {mnt / 'out'} {tmp_path / 'after'}\nrm -f {mnt / 'filler'}\n"
            f"{py} -m chimera merge {r} -o {mnt / 'out'} --resume 2> {tmp_path / 'err2'}; echo $? > {tmp_path / 'rc2'}\n"
            f"cp -a {mnt / 'out'} {tmp_path / 'final'}\n")
    if _in_tmpfs(tmp_path, size, body):
        out, why = mnt / "out", "No space left on device"
    else:  # no mount namespace here: the kernel's per-process file size limit fails the writes instead
        out, why = tmp_path / "out", "File too large"
        p = subprocess.run([py, str(tmp_path / "runner.py"), str(r), str(out), "fsize"], capture_output=True, text=True)
        (tmp_path / "err1").write_text(p.stderr)
        (tmp_path / "rc1").write_text(str(p.returncode))
        shutil.copytree(out, tmp_path / "after")
        p = subprocess.run([py, "-m", "chimera", "merge", str(r), "-o", str(out), "--resume"], capture_output=True, text=True)
        (tmp_path / "err2").write_text(p.stderr)
        (tmp_path / "rc2").write_text(str(p.returncode))
        shutil.copytree(out, tmp_path / "final")
    err = (tmp_path / "err1").read_text().strip()
    assert int((tmp_path / "rc1").read_text()) == 2
    assert err.startswith("error: ") and "\n" not in err and why in err, err
    assert str(out / plan.jobs[1].filename) in err
    after = tmp_path / "after"
    assert (after / plan.jobs[0].filename).read_bytes() == (tmp_path / "ref" / plan.jobs[0].filename).read_bytes()
    for f in ("config.json", "model.safetensors.index.json", "README.md", "chimera_merge.json"):
        assert not (after / f).exists(), f
    assert not list(after.glob(".*.partial")) and not (after / plan.jobs[1].filename).exists()
    assert list(json.loads((after / ".chimera" / "progress.json").read_text())["done"]) == [plan.jobs[0].filename]
    assert int((tmp_path / "rc2").read_text()) == 0, (tmp_path / "err2").read_text()
    assert sha_dir(tmp_path / "final") == sha_dir(tmp_path / "ref")


def test_refused_up_front_when_it_cannot_fit(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    r = recipe(tmp_path, {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                          "weights": {"default": {"v3": 0.7, "r1": 0.3}}})
    mnt = tmp_path / "mnt"
    body = (f"{sys.executable} -m chimera merge {r} -o {mnt / 'out'} 2> {tmp_path / 'err'}; echo $? > {tmp_path / 'rc'}\n"
            f"ls -A {mnt} > {tmp_path / 'ls'}\n")
    if not _in_tmpfs(tmp_path, 256 * 1024, body):
        pytest.skip("cannot mount a small tmpfs here (no user/mount namespaces)")
    err = (tmp_path / "err").read_text().strip()
    assert int((tmp_path / "rc").read_text()) == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "free" in err and str(mnt / "out") in err
    assert (tmp_path / "ls").read_text().strip() == ""                 # nothing left behind


# ------------------------------------------------------------------ one writer per output

HOLDER = r"""
import sys, time
from pathlib import Path
from chimera.merge import build_plan, load, run_merge

recipe, out, gate = sys.argv[1], sys.argv[2], Path(sys.argv[3])
plan = build_plan(load(recipe))

def on_bytes(n):  # after the first tensor: wait (holding the output) until the test opens the gate
    if n and not gate.exists():
        (gate.parent / "waiting").write_text("")
        t = time.time()
        while not gate.exists() and time.time() - t < 120:
            time.sleep(0.05)

run_merge(plan, out, workers=1, on_bytes=on_bytes)
"""


def test_two_merges_on_one_output(ds_pair, tmp_path):
    a, b, *_ = ds_pair
    r = recipe(tmp_path, {"parents": {"v3": str(a), "r1": str(b)}, "base": "v3",
                          "weights": {"default": {"v3": 0.7, "r1": 0.3}}, "output": {"shard_size": "300KB"}})
    merge(r, tmp_path / "ref")
    (tmp_path / "holder.py").write_text(HOLDER)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(r), str(out), str(tmp_path / "gate")],
                              stderr=subprocess.PIPE, text=True)
    try:
        t = time.time()
        while not (tmp_path / "waiting").exists():
            assert holder.poll() is None and time.time() - t < 120, holder.stderr.read() if holder.poll() else "timeout"
            time.sleep(0.05)
        partial = list(out.glob(".*.partial"))
        assert len(partial) == 1 and str(holder.pid) in partial[0].name   # temp names unique per run
        before = sorted(p.name for p in out.iterdir())
        for extra in ([], ["--resume"], ["--force"]):
            p = subprocess.run([sys.executable, "-m", "chimera", "merge", str(r), "-o", str(out), *extra],
                               capture_output=True, text=True)
            err = p.stderr.strip()
            assert p.returncode == 2 and err.startswith("error: ") and "\n" not in err, (extra, err)
            assert f"pid {holder.pid}" in err and str(out) in err, err
            assert sorted(p.name for p in out.iterdir()) == before and partial[0].exists()   # nothing deleted
        (tmp_path / "gate").write_text("")
        assert holder.wait(timeout=300) == 0, holder.stderr.read()
    finally:
        if holder.poll() is None:
            holder.kill()
    assert sha_dir(out) == sha_dir(tmp_path / "ref")


# ------------------------------------------------------------------ the hot paths, end to end

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """DeepSeek parents whose projections have whole 128-column blocks (hidden 256, experts 128 wide),
    in float scales and in ue8m0 (V3.1 style) scales."""
    root = tmp_path_factory.mktemp("wide")
    sd, cfg = ckpt.ds_state(50, mtp=True, hidden_size=256, moe_intermediate_size=128, intermediate_size=384)
    sd2 = ckpt.perturb(sd, 51, scale=0.3)
    return {"a": ckpt.write(root / "a", sd, cfg, "fp8"), "b": ckpt.write(root / "b", sd2, cfg, "fp8"),
            "a_ue": ckpt.write(root / "a_ue", sd, cfg, "fp8", ue8m0=True),
            "b_ue": ckpt.write(root / "b_ue", sd2, cfg, "fp8", ue8m0=True), "cfg": cfg}


def _check_fp8_block_mix(q: torch.Tensor, s: torch.Tensor, ref: torch.Tensor, ue8m0: bool, name: str) -> None:
    """Every 128x128 block: scale from the float64 reference's amax, values within e4m3 rounding."""
    deq = ckpt.dequant_ref(q, s)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            r, c = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            want = max(float(ref[r, c].abs().max()), 1e-4) / 448
            got = float(s[bi, bj])
            if ue8m0:
                assert got == 2.0 ** round(math.log2(got)), (name, got)          # a power of two
                assert want * (1 - 1e-6) <= got < 2 * want * (1 + 1e-6), (name, bi, bj, got, want)
            else:
                assert abs(got - want) <= want * 1e-5, (name, bi, bj)
            err = (deq[r, c] - ref[r, c]).abs()
            assert torch.all(err <= ref[r, c].abs() * 2**-4 + got * 2**-9 + 1e-6), (name, bi, bj)


def test_row_chunks_and_fused_kernel_in_a_merge(wide, tmp_path):
    a, b = wide["a"], wide["b"]
    r = recipe(tmp_path, {"parents": {"a": str(a), "b": str(b)}, "base": "a",
                          "weights": {"default": {"a": 0.5, "b": 0.5}}, "output": {"shard_size": "1GB"}})
    plan = build_plan(load(r))
    small = run_merge(plan, tmp_path / "chunked", chunk_elems=128 * 128, compile="off")
    whole = run_merge(plan, tmp_path / "whole", compile="off")
    chunked = {k: v for k, v in sha_dir(tmp_path / "chunked").items() if k != "chimera_merge.json"}
    assert chunked == {k: v for k, v in sha_dir(tmp_path / "whole").items() if k != "chimera_merge.json"}
    for n, rec in small.records.items():                                  # chunking never changes bytes
        assert rec["distance"] == pytest.approx(whole.records[n]["distance"], rel=1e-9), n
    shapes = {it.name: it.shape for it in plan.items}
    kernels = {n: rec.get("kernel") for n, rec in small.records.items()}
    fused = [n for n, k in kernels.items() if k == "fused-fp8" and shapes[n][0] > 128]   # several row chunks
    tail = [n for n, k in kernels.items() if k == "fused-fp8" and shapes[n][0] % 128]    # a partial row block
    assert fused and tail and kernels["model.embed_tokens.weight"] == "fused-float"   # bf16 in its own dtype
    got = tensors(tmp_path / "chunked")
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    for n in (fused[0], tail[0]):
        _check_fp8_block_mix(got[n], got[n[: -len(".weight")] + SCALE], 0.5 * fa[n] + 0.5 * fb[n], False, n)
    emb = "model.embed_tokens.weight"
    assert torch.allclose(got[emb].double(), 0.5 * fa[emb] + 0.5 * fb[emb], rtol=2**-8, atol=1e-6)


def test_ue8m0_merged_end_to_end(wide, tmp_path):
    a, b = wide["a_ue"], wide["b_ue"]
    r = recipe(tmp_path, {"parents": {"a": str(a), "b": str(b)}, "base": "a",
                          "weights": {"default": {"a": 1.0}, "routed_experts": {"a": 0.3, "b": 0.7},
                                      "attention": {"b": 1.0}}})
    res = merge(r, tmp_path / "child")
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    got, pb = tensors(tmp_path / "child"), tensors(b)
    for n, s in got.items():
        if n.endswith(SCALE):
            e = np.log2(s.numpy())
            assert np.array_equal(e, np.round(e)), n                     # every scale a power of two
    fa, fb = ckpt.load_float(a), ckpt.load_float(b)
    mixed = [n for n, rec in res.records.items() if rec["op"] == "mix"]
    assert len(mixed) > 10 and {res.records[n]["kernel"] for n in mixed} >= {"fused-fp8"}
    for n in mixed[:6]:
        _check_fp8_block_mix(got[n], got[n[: -len(".weight")] + SCALE], 0.3 * fa[n] + 0.7 * fb[n], True, n)
    copied = [n for n, rec in res.records.items() if rec["op"] == "copy" and rec["class"] == "attention"]
    assert copied and all(torch.equal(got[n].view(torch.uint8), pb[n].view(torch.uint8)) for n in copied)


def test_scale_formats_resolved_by_the_recipe(wide, tmp_path):
    """Parents in float and ue8m0 scales: refused unless `use_base_config`; then a copy into a float-scale
    child stays a copy (powers of two are valid float scales), a copy into a ue8m0 child is re-quantized."""
    for base, other, op in (("a", "b_ue", "copy"), ("a_ue", "b", "cast")):
        d = {"parents": {"v3": str(wide[base]), "r1": str(wide[other])}, "base": "v3",
             "weights": {"default": {"v3": 1.0}, "routed_experts": {"r1": 1.0}}}
        with pytest.raises(Exception, match="quantization_config.scale_fmt"):
            build_plan(load(recipe(tmp_path, d, f"{base}.yaml")))
        r = recipe(tmp_path, dict(d, use_base_config=["quantization_config"]), f"{base}-ok.yaml")
        res = merge(r, tmp_path / base)
        cfg = json.loads((tmp_path / base / "config.json").read_text())
        assert cfg["quantization_config"] == json.loads((wide[base] / "config.json").read_text())["quantization_config"]
        routed = {n: rec for n, rec in res.records.items() if rec["class"] == "routed_experts"}
        assert {rec["op"] for rec in routed.values()} == {op}
        report = json.loads((tmp_path / base / "chimera_merge.json").read_text())
        assert "quantization_config" in report["config_from_base"]
        got, src = tensors(tmp_path / base), tensors(wide[other])
        fo = ckpt.load_float(wide[other])
        for n in list(routed)[:8]:
            sn = n[: -len(".weight")] + SCALE
            if op == "copy":
                assert torch.equal(got[n].view(torch.uint8), src[n].view(torch.uint8)) and torch.equal(got[sn], src[sn])
            else:
                _check_fp8_block_mix(got[n], got[sn], fo[n], True, n)


def test_compiled_kernel_in_a_merge_matches_eager(wide, tmp_path):
    """`--compile on` against eager on one tensor shape (one compile): same scales, codes at most one
    e4m3 step apart (float32 rounding order in generated code)."""
    a, b = wide["a"], wide["b"]
    r = recipe(tmp_path, {"parents": {"a": str(a), "b": str(b)}, "base": "a", "weights": {"default": {"a": 1.0}},
                          "overrides": [{"match": "*.experts.*.gate_proj.weight", "weights": {"a": 0.4, "b": 0.6}}]})
    plan = build_plan(load(r))
    on = run_merge(plan, tmp_path / "on", compile="on")
    run_merge(plan, tmp_path / "off", compile="off")
    mixed = [n for n, rec in on.records.items() if rec["op"] == "mix"]
    assert mixed and all(on.records[n]["kernel"] == "fused-fp8" for n in mixed)
    g_on, g_off = tensors(tmp_path / "on"), tensors(tmp_path / "off")
    for n in g_on:
        if n.endswith(SCALE):
            assert torch.allclose(g_on[n], g_off[n], rtol=1e-6, atol=0), n
        elif g_on[n].dtype == torch.float8_e4m3fn:
            c1, c2 = g_on[n].view(torch.uint8).int(), g_off[n].view(torch.uint8).int()
            same_sign = (c1 & 0x80) == (c2 & 0x80)
            assert torch.all(same_sign | (g_on[n].float() == 0) | (g_off[n].float() == 0)), n
            assert int(((c1 & 0x7F) - (c2 & 0x7F)).abs().max()) <= 1, n
        else:
            assert torch.equal(g_on[n], g_off[n]), n


# ------------------------------------------------------------------ a parent truncated during the merge

TRUNCATE = r"""
import os, sys
from pathlib import Path
from chimera.merge import kernels
kernel, parent, recipe, out = sys.argv[1:5]
real = getattr(kernels, kernel)
done = []

def truncating(*args, **kw):  # someone else truncates the parent while the kernel reads it through its mapping
    if not done:
        for f in Path(parent).glob("*.safetensors"):
            os.truncate(f, 0)
        done.append(1)
    return real(*args, **kw)

setattr(kernels, kernel, truncating)
from chimera.cli import main
main(["merge", recipe, "-o", out])
"""


@pytest.mark.parametrize("kernel, weights", [
    ("norms_fp8", {"default": {"a": 1.0}, "routed_experts": {"b": 1.0}}),      # a copy's distance sums
    ("mix_fp8", {"default": {"a": 0.5, "b": 0.5}}),                             # the fused FP8 mix
])
def test_parent_truncated_during_the_merge(wide, tmp_path, kernel, weights):
    """A parent file truncated by another process while a C kernel reads it through its mapping: the SIGBUS is
    caught in the kernel call and the merge ends with one line naming the file, exit status 2, nothing final."""
    a, b = (shutil.copytree(wide[k], tmp_path / k) for k in ("a", "b"))
    r = recipe(tmp_path, {"parents": {"a": str(a), "b": str(b)}, "base": "a", "weights": weights})
    p = subprocess.run([sys.executable, "-c", TRUNCATE, kernel, str(b), str(r), str(tmp_path / "child")],
                       capture_output=True, text=True)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    # the kernel's SIGBUS (caught), or the kernel copy running into the new end first (a copy's distances run
    # on another thread, so either can see the truncation first)
    assert str(b / "model.safetensors") in lines[0], lines[0]
    assert "shrank while tensor" in lines[0] or (kernel == "norms_fp8" and "short read" in lines[0]), lines[0]
    assert not (tmp_path / "child" / "config.json").exists()
    assert not list((tmp_path / "child").glob("*.index.json"))
