"""Where a chunk's arithmetic runs: this CPU (the fused C kernels) or a torch device (`--device cuda`).

    m = mixer("auto")                       # "cpu" | "cuda" | "cuda:1" | "auto" (cuda if present)
    q, s, bad = m.mix_fp8(qs, ss, lams, ue8m0, block)      # numpy in (host buffers), numpy out
    out, bad = m.mix_float(xs, tags, lams, out_tag)

Both take the stored bytes of a chunk's parents (numpy views of the reader's buffers; pinned host
memory for a CUDA device, so the upload is asynchronous) and return the output chunk's bytes.

`DeviceMixer` runs torch ops on its device with the arithmetic of `kernels.py` operation by operation
(products and fused multiply-adds in float32, true division, round-to-nearest-even casts). On the CPU
(`mixer("torch:cpu")`, what the tests run) its bytes equal the C kernels' exactly. On a GPU, eager
kernels give the same bytes where the device's fused multiply-add and division round like the CPU's
(CUDA's do); the FP8 kernel under `torch.compile` (the default on CUDA: ~70% of copy bandwidth on an
H200 against ~3% eager) may differ by one FP8 code where the generated code orders the block sum
differently; `benchmarks/bench_gpu.py` counts those codes.
"""
from __future__ import annotations

import numpy as np

from chimera.errors import ChimeraError
from chimera.merge import kernels

DEVICES = ("auto", "cpu", "cuda")


class CpuMixer:
    """The fused C kernels on numpy arrays (torch fallback without a compiler)."""

    name = "cpu"
    pinned = False

    def mix_fp8(self, qs, ss, lams, ue8m0, block, buf=None):
        return kernels.mix_fp8(qs, ss, lams, ue8m0, block, buf)

    def mix_float(self, xs, tags, lams, out_tag, buf=None):
        return kernels.mix_float(xs, tags, lams, out_tag, buf)


class DeviceMixer:
    """torch ops on one device: upload the chunk, mix there, download the result."""

    def __init__(self, device, compiled: bool = False):
        import torch

        self.device = torch.device(device)
        self.name = str(self.device)
        self.pinned = self.device.type == "cuda"
        self.compiled = compiled

    def _up(self, a: np.ndarray, tag: str = ""):
        return kernels.as_torch(a, tag).to(self.device, non_blocking=True)

    def mix_fp8(self, qs, ss, lams, ue8m0, block, buf=None):
        import torch

        from chimera.merge import mix

        fn = mix.compiled_mix_fp8_blocks() if self.compiled else mix.mix_fp8_blocks
        q, s, bad = kernels.torch_mix_fp8([self._up(q) for q in qs], [self._up(s) for s in ss],
                                          torch.tensor(lams, dtype=torch.float32, device=self.device),
                                          ue8m0, block, fn)
        return q.cpu().numpy(), s.cpu().numpy(), bool(bad)

    def mix_float(self, xs, tags, lams, out_tag, buf=None):
        tile = kernels.TILE if self.device.type == "cpu" else None   # a GPU holds the float32 chunk
        out, bad = kernels.torch_mix_float([self._up(x, t) for x, t in zip(xs, tags)], lams, out_tag, tile)
        return kernels.as_numpy(out.cpu()), bool(bad)


def _nvidia_driver() -> bool:
    import os

    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def cuda_requested(device: str) -> bool:
    """Whether `--device` means a CUDA device here (auto: when this machine has an NVIDIA driver)."""
    return device.startswith("cuda") or (device == "auto" and _nvidia_driver())


def mixer(device: str = "cpu", compiled: bool | None = None) -> CpuMixer | DeviceMixer:
    """The mixer for `--device`: cpu (C kernels), cuda / cuda:N (torch on that GPU), auto (cuda when
    torch sees one, else cpu), or torch:cpu (the device path's code on this CPU, for tests)."""
    if device == "cpu":
        return CpuMixer()
    if device.startswith("torch:"):
        return DeviceMixer(device.split(":", 1)[1], bool(compiled))   # the tests' device path
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ChimeraError(f"--device {device}: expected auto, cpu or cuda[:N]")
    if device == "auto" and not _nvidia_driver():
        return CpuMixer()                      # decided without importing torch (2 s of start-up)
    import torch

    if device == "auto":
        return DeviceMixer("cuda", compiled is not False) if torch.cuda.is_available() else CpuMixer()
    if not torch.cuda.is_available():
        raise ChimeraError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__})")
    return DeviceMixer(device, compiled is not False)
