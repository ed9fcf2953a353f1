"""The merge's mix kernels on a GPU: Gparam/s and the fraction of the device's own copy bandwidth.
Not a test; needs a CUDA device (exits with a message otherwise). One JSON per run in
benchmarks/results/ (gpu-<UTC>.json, gpu.json = latest).

    .venv/bin/python benchmarks/bench_gpu.py [--rows 16384] [--cols 7168] [--reps 20] [--merge]

- copy: `dst.copy_(src)` of a 4 GiB buffer; bandwidth = bytes read + bytes written per second.
- FP8 block mix of two parents (the kernel of `--device cuda`, eager and under torch.compile):
  moves 2 x 1 byte in + 1 byte out per parameter (+ 3 block scales per 16 K parameters); its
  fraction of copy bandwidth = Gparam/s x 3 bytes / copy bandwidth. Goal (issue 12): >= 70%.
- bf16 mix of two parents: 2 x 2 bytes in + 2 out per parameter.
- host -> device: pinned-memory upload bandwidth, which bounds a merge whose parents stream from
  host memory; `--merge` also times a whole `chimera merge --device cuda` of the generated FP8 pair
  (benchmarks/make_parents.py) against it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ROOT, load1, write_result  # noqa: E402

sys.path.insert(0, str(REPO))
from chimera.checkpoint import fp8  # noqa: E402
from chimera.merge import kernels, mix  # noqa: E402

GOAL_FRACTION = 0.70


def cuda_time(fn, reps: int) -> dict:
    """Median seconds of fn() on the current stream (CUDA events), after two warm-ups."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--merge", action="store_true", help="also time a whole merge with --device cuda")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "load1": load1()}

    src = torch.empty(4 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), args.reps)
    copy_bw = 2 * src.numel() / t["median_s"]
    res["copy"] = {**t, "GB_per_s": round(copy_bw / 1e9, 1)}
    del src, dst

    r, n = args.rows, args.cols
    g = torch.Generator(device=dev).manual_seed(0)
    qs = [(torch.randn(r, n, device=dev, generator=g) * 30).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(2)]
    ss = [torch.rand(fp8.scale_shape((r, n)), device=dev, generator=g) * 1e-2 + 1e-4 for _ in range(2)]
    lam = torch.tensor([0.5, 0.5], device=dev)
    kernels = {"fp8 mix, eager": mix.mix_fp8_blocks, "fp8 mix, torch.compile": mix.compiled_mix_fp8_blocks()}
    bytes_per_param = 3 + 2 * 4 / (128 * 128) + 4 / (128 * 128)
    for name, k in kernels.items():
        t = cuda_time(lambda: k(qs, ss, lam), args.reps)
        gps = r * n / t["median_s"]
        res[name] = {**t, "Gparam_per_s": round(gps / 1e9, 1),
                     "fraction_of_copy_bw": round(gps * bytes_per_param / copy_bw, 3)}
    # the device path must give the CPU path's bytes (or differ by at most one FP8 code, see README)
    q_dev, s_dev, _ = kernels["fp8 mix, torch.compile"](qs, ss, lam)
    q_cpu, s_cpu, _ = kernels.mix_fp8([q.cpu().view(torch.uint8).numpy() for q in qs], [s.cpu().numpy() for s in ss],
                                      [0.5, 0.5])
    d = (q_dev.cpu().view(torch.uint8).int() - torch.from_numpy(q_cpu).int()).abs()
    res["compiled_vs_cpu"] = {"scales_equal": bool(torch.equal(s_dev.cpu(), torch.from_numpy(s_cpu))),
                              "codes_differing": int((d > 0).sum()), "max_code_diff": int(d.max())}

    x, y = (torch.randn(r, n, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    t = cuda_time(lambda: torch.lerp(x, y, 0.5), args.reps)
    gps = r * n / t["median_s"]
    res["bf16 mix (lerp)"] = {**t, "Gparam_per_s": round(gps / 1e9, 1), "fraction_of_copy_bw": round(gps * 6 / copy_bw, 3)}
    del qs, ss, x, y

    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    on_dev = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    t = cuda_time(lambda: on_dev.copy_(host, non_blocking=True), args.reps)
    res["host_to_device"] = {**t, "GB_per_s": round(host.numel() / t["median_s"] / 1e9, 1)}

    if args.merge:
        res["merge"] = merge_on_device()
    frac = res["fp8 mix, torch.compile"]["fraction_of_copy_bw"]
    res["goal"] = {"fp8_mix_fraction_of_copy_bw": GOAL_FRACTION, "met": frac >= GOAL_FRACTION}
    for k, v in res.items():
        print(f"{k}: {v}")
    print(write_result("gpu", res))


def merge_on_device() -> dict:
    """A whole fractional FP8 merge of the generated parents with --device cuda (wall, fresh process)."""
    import time

    import yaml

    data = ROOT / "_data"
    a, b = data / "ds-a", data / "ds-b"
    if not (a / "config.json").exists():
        return {"skipped": f"no parents in {data} (run benchmarks/make_parents.py)"}
    tmp = Path(tempfile.mkdtemp(dir=data))
    try:
        rec = tmp / "r.yaml"
        rec.write_text(yaml.safe_dump({"parents": {"a": str(a), "b": str(b)}, "base": "a",
                                       "weights": {"default": {"a": 0.5, "b": 0.5}}}))
        subprocess.run(["bash", "-c", f"cat {a}/*.safetensors {b}/*.safetensors > /dev/null"], check=True)
        chimera = str(Path(sys.executable).parent / "chimera")
        out = {}
        for device in ("cuda", "cpu"):
            shutil.rmtree(tmp / "o", ignore_errors=True)
            t = time.perf_counter()
            subprocess.run([chimera, "merge", str(rec), "-o", str(tmp / "o"), "--device", device], check=True)
            out[f"{device}_s"] = round(time.perf_counter() - t, 2)
        gb = sum(f.stat().st_size for p in (a, b) for f in p.glob("*.safetensors")) / 1e9
        out["parent_GB"] = round(gb, 2)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
