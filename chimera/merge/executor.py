"""Where independent tasks run: a local pool (the default) or a Ray cluster (`pip install chimera[ray]`).

Merge shard jobs and sweep points are plain functions of picklable arguments that read and write
only files (paths on a filesystem every node shares), so the same function runs in a thread, a
process or a Ray task:

    for i, result in map_unordered(fn, args, Executor("ray", address="auto"), resources=...):
        ...                                   # (index into args, fn(args[i])) as each finishes

On Ray each task asks for its resources (`num_cpus`, `memory` in bytes, `num_gpus`); a task whose
worker process dies (killed, out of memory, node lost) is run again from the start, up to
`RAY_RETRIES` times, which is safe because a task writes its file under a temporary name and renames
it only when complete. An exception raised by the function itself is not retried: it is re-raised
here unchanged (a `ChimeraError` stays a one-line error).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from chimera.errors import ChimeraError

KINDS = ("local", "ray")
RAY_RETRIES = 3


@dataclass(frozen=True)
class Executor:
    """`local`: `workers` threads (or processes) on this machine; `ray`: one task per item on the
    cluster at `address` ("auto": the running cluster; None: `RAY_ADDRESS`, else a new local one)."""

    kind: str = "local"
    workers: int = 2
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ChimeraError(f"--executor {self.kind}: expected one of {', '.join(KINDS)}")
        if self.workers < 1:
            raise ChimeraError(f"--workers must be >= 1, got {self.workers}")
        if self.address and self.kind != "ray":
            raise ChimeraError("--address needs --executor ray")


def map_unordered(fn: Callable[[Any], Any], args: list, executor: Executor, *, processes: bool = False,
                  resources: Callable[[int], dict] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (i, fn(args[i])) in completion order; on the first error cancel what has not started."""
    if executor.kind == "ray":
        yield from _ray_map(fn, args, resources or (lambda i: {}), executor.address)
    elif executor.workers == 1 or len(args) <= 1:
        for i, a in enumerate(args):
            yield i, fn(a)
    else:
        yield from _pool_map(fn, args, executor.workers, processes)


def _pool_map(fn, args, workers: int, processes: bool) -> Iterator[tuple[int, Any]]:
    if processes:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=mp.get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(max_workers=min(workers, len(args)))
    with pool:
        futures: dict[Future, int] = {pool.submit(fn, a): i for i, a in enumerate(args)}
        try:
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield futures.pop(fut), fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def ray_module():
    """`import ray`, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ChimeraError("--executor ray needs Ray: pip install 'chimera[ray]'") from None
    return ray


@contextmanager
def ray_cluster(address: str | None):
    """A connection to a Ray cluster: the one this process already joined, else `ray.init(address)`
    (shut down again on exit when this call made it)."""
    ray = ray_module()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 logging_level="WARNING", configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
        raise ChimeraError(f"Ray cluster {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_map(fn, args, resources: Callable[[int], dict], address: str | None) -> Iterator[tuple[int, Any]]:
    with ray_cluster(address) as ray:
        remote = ray.remote(fn)
        pending = {remote.options(max_retries=RAY_RETRIES, retry_exceptions=False, **resources(i)).remote(a): i
                   for i, a in enumerate(args)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    yield i, _ray_get(ray, ref, getattr(fn, "__name__", "task"), i)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def _ray_get(ray, ref, name: str, i: int):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError) as e:
        raise ChimeraError(f"Ray task {name}[{i}] failed {RAY_RETRIES + 1} times "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
