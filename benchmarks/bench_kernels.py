"""The merge's per-chunk kernels in isolation, on this CPU: Gparam/s of output and the fraction of a
plain copy's speed (memory traffic per parameter differs, so the copy is the yardstick, not a goal).
Not a test: one JSON per run in benchmarks/results/ (kernels-<UTC>.json, kernels.json = latest).

    .venv/bin/python benchmarks/bench_kernels.py [--rows 2048] [--cols 7168] [--reps 7]

Each kernel runs on one chunk of [rows, cols] (the merge's chunk size), torch's threads as set
(`torch.get_num_threads()`); the torch rows are chimera's fallback path (no C compiler) and the
eager torch code the merge used before the fused kernels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, timed, write_result  # noqa: E402

sys.path.insert(0, str(REPO))
from chimera.checkpoint import fp8  # noqa: E402
from chimera.merge import kernels, mix, native  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    r, n = args.rows, args.cols
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(r, n, generator=g).to(torch.bfloat16) for _ in range(2))
    qs = [(torch.randn(r, n, generator=g) * 30).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(2)]
    ss = [torch.rand(fp8.scale_shape((r, n)), generator=g) * 1e-2 + 1e-4 for _ in range(2)]
    w = fp8.dequantize(qs[0], ss[0])
    lam_t = torch.tensor([0.5, 0.5])
    xr, yr = (t.view(torch.int16).numpy().view("uint16") for t in (x, y))         # stored bytes
    qr, sr = [q.view(torch.uint8).numpy() for q in qs], [s.numpy() for s in ss]
    wr = w.numpy()
    assert native.lib() is not None, native.build_error

    cases = {
        "copy bf16 (yardstick)": lambda: x.clone(),
        "copy fp8 (yardstick)": lambda: qs[0].clone(),
        "bf16 mix, fused C": lambda: kernels.mix_float([xr, yr], ["BF16", "BF16"], [0.5, 0.5], "BF16"),
        "bf16 mix, torch lerp (one op, reference)": lambda: torch.lerp(x, y, 0.5),
        "bf16 mix, torch tiles (fallback)": lambda: _torch(kernels.mix_float, [xr, yr], ["BF16", "BF16"], [0.5, 0.5], "BF16"),
        "bf16 mix, old path (float32 copies)": lambda: x.float().mul_(0.5).add_(y.float(), alpha=0.5).to(torch.bfloat16),
        "fp8 block mix, fused C": lambda: kernels.mix_fp8(qr, sr, [0.5, 0.5]),
        "fp8 block mix, eager torch (fallback)": lambda: mix.mix_fp8_blocks(qs, ss, lam_t),
        "fp8 decode, fused C": lambda: kernels.decode_fp8(qr[0], sr[0]),
        "fp8 decode, torch": lambda: fp8.dequantize(qs[0], ss[0]),
        "fp8 encode, fused C": lambda: kernels.encode_fp8(wr),
        "fp8 encode, torch": lambda: fp8.quantize(w),
        "distance sums, bf16, fused C": lambda: kernels.norms(xr, "BF16", yr, "BF16"),
        "distance sums, block FP8, fused C": lambda: kernels.norms_fp8(qr[0], sr[0], qr[1], sr[1]),
    }
    rows = {}
    for name, fn in cases.items():
        s = timed(fn, args.reps)
        s["Gparam_per_s"] = round(r * n / s["median_s"] / 1e9, 3)
        rows[name] = s
        print(f"{name:44s} {s['Gparam_per_s']:7.3f} Gparam/s  (median {s['median_s'] * 1e3:.1f} ms, "
              f"load {s['load1_max']})", flush=True)
    for name, s in rows.items():
        ref = rows["copy fp8 (yardstick)" if "fp8" in name else "copy bf16 (yardstick)"]
        s["x_copy_time"] = round(s["median_s"] / ref["median_s"], 2)
    print(write_result("kernels", {"chunk": [r, n], "threads": torch.get_num_threads(), "rows": rows}))


def _torch(fn, *a):  # chimera.merge.kernels without its C library
    with native.disabled():
        return fn(*a)


if __name__ == "__main__":
    main()
