"""Build (once per machine) and load `kernels.c`, chimera's fused CPU merge kernels, through ctypes.

The library is compiled with the system C compiler (`$CC`, else `cc`) on first use and cached in
`chimera.cache.cache_root()` (`$CHIMERA_CACHE`, default `~/.cache/chimera`) under a hash of the source, the compiler, its flags and
the CPU, so later runs only `dlopen` it (about a millisecond). Concurrent first uses are safe (each
builds under a temporary name; the rename is atomic). Without a compiler, or with `CHIMERA_NATIVE=0`,
`lib()` is None and the merge runs its torch path, which gives the same bytes, slower.

The kernels work on a range of rows (or row blocks); `split` runs a range on `threads` Python threads
(ctypes releases the GIL while C runs), which is how one chunk uses every core.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from chimera.cache import cache_root
from chimera.errors import ChimeraError

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]
FALLBACK_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]
F32, BF16, F16 = 0, 1, 2

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
build_error: str | None = None  # why there is no native library (for `chimera doctor`-style reporting)

P, I64, INT, FLT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "mix_float": [I64, I64, INT, P, P, P, P, INT],
    "mix2_bf16": [I64, I64, P, P, FLT, FLT, P],
    "decode_fp8": [I64, I64, I64, P, P, I64, INT, P],
    "mix_fp8": [I64, I64, I64, I64, INT, P, P, P, INT, INT, P, P],
    "encode_fp8": [I64, I64, I64, I64, P, INT, INT, P, P],
    "norms_float": [I64, I64, P, INT, P, INT, P],
    "norms_fp8": [I64, I64, I64, P, P, P, P, I64, INT, P],
    "guard_install": [],
}
FILE_GONE = -2  # a kernel touched a page of a mapped file that was truncated meanwhile (SIGBUS, caught)


class FileChanged(ChimeraError):
    """A parent file shrank while a kernel read it through its mapping (someone truncated it)."""


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_id() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> list[str]:
    return (os.environ.get("CC") or "cc").split()


def _build(out: Path) -> Path:
    cc = _compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    errors = []
    for flags in (FLAGS, FALLBACK_FLAGS):
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_id(),
                                        platform.machine()]).encode()).hexdigest()[:20]
        so = out / f"chimera_kernels-{key}.so"
        if so.is_file():
            return so
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".so.partial")
        os.close(fd)
        p = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if p.returncode == 0:
            os.replace(tmp, so)
            return so
        os.unlink(tmp)
        errors.append((p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"])
    raise OSError(f"{' '.join(cc)} failed: {errors[-1][0]}")


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it can't be had."""
    global _lib, _tried, build_error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("CHIMERA_NATIVE", "1") == "0":
            build_error = "disabled by CHIMERA_NATIVE=0"
        else:
            try:
                so = _build(cache_dir())
                handle = ctypes.CDLL(str(so))
                for name, argtypes in SIGNATURES.items():
                    fn = getattr(handle, name)
                    fn.argtypes, fn.restype = argtypes, ctypes.c_int
                handle.guard_install()  # a SIGBUS inside a kernel call returns FILE_GONE from that call
                _lib = handle
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                build_error = f"{type(e).__name__}: {e}"
        _tried = True  # only now: a second thread must not see "tried" before the library is there
    return _lib


@contextmanager
def disabled():
    """Within the block `lib()` is None: the torch path runs (tests compare the two)."""
    global _lib
    lib()
    saved = _lib
    with _lock:
        _lib = None
    try:
        yield
    finally:
        with _lock:
            _lib = saved


def threads() -> int:
    """Threads per kernel call: $CHIMERA_THREADS, else $OMP_NUM_THREADS (Ray sets it to a task's CPUs),
    else the CPUs this process may run on."""
    for var in ("CHIMERA_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def combine(codes) -> int:
    """The kernels' return codes of several pieces: OR of the flags; raises FileChanged if any piece met a
    truncated file."""
    flag = 0
    for c in codes:
        if c == FILE_GONE:
            raise FileChanged("a parent file shrank while it was read (truncated by another process?)")
        flag |= c
    return flag


def split(fn: Callable[[int, int], int], n: int, parts: int | None = None) -> int:
    """Run fn(start, stop) over [0, n) in up to `parts` pieces on a thread pool; OR of the results (see
    `combine`; fn may return a combined code of several calls)."""
    global _pool
    parts = max(1, min(parts or threads(), n))
    if parts == 1:
        return combine([fn(0, n)])
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="chimera-kernel")
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(fn, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return combine([f.result() for f in futures])


SUM_PIECE = 1 << 20  # elements (or rows, for row kernels) per partial sum: the rounding never depends on threads


def split_sums(fn: Callable[[int, int, ctypes.Array], int], n: int, width: int) -> list[float]:
    """Like `split`, for kernels that write `width` float64 sums of [start, stop): fixed pieces of
    SUM_PIECE elements each get their own sums, added in piece order (same result on any thread count)."""
    bounds = list(range(0, n, SUM_PIECE)) + [n]
    bufs = [(ctypes.c_double * width)() for _ in range(len(bounds) - 1)]
    split(lambda i, j: combine([fn(bounds[k], bounds[k + 1], bufs[k]) for k in range(i, j)]), len(bufs))
    return [sum(buf[k] for buf in bufs) for k in range(width)]


def ptr(a) -> int:
    """The data address of a C-contiguous numpy array."""
    return a.ctypes.data


def ptrs(arrays) -> ctypes.Array:
    """A C array of the arrays' data addresses."""
    return (ctypes.c_void_p * len(arrays))(*[ptr(a) for a in arrays])
