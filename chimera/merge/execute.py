"""Run a merge plan: one independent job per output shard, on a local thread pool or Ray, then finalize.

    run_merge(plan, out)   open + lock the output (output.py), run every unfinished ShardJob,
                           mark each one done, finalize (index, config, card, report)
    run_job(job, out_dir)  write one shard: each tensor through tensor.run_tensor, into a temp file
                           renamed when whole; returns the shard's per-tensor records

A job needs only its `ShardJob` (file paths, byte ranges, lambdas) and the output directory, so the
executor (`executor.py`: `workers` threads here, or one Ray task per shard with a memory request,
retried when its worker dies) runs `run_job` unchanged wherever the filesystem is shared; only this
process marks shards done and finalizes, so the bytes are the same on either executor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chimera.checkpoint.writer import ShardFile
from chimera.merge.distance import CHUNK_ELEMS
from chimera.merge.executor import Executor, map_unordered
from chimera.merge.output import Output, count_ops, finished
from chimera.merge.plan import Plan, ShardJob
from chimera.merge.tensor import finish_distances, run_tensor


def run_job(job: ShardJob, out_dir: Path, on_bytes: Callable[[int], None] | None = None,
            compiled: bool = False, *, run_id: str | None = None, chunk_elems: int = CHUNK_ELEMS,
            distances: bool = True, device: str = "cpu") -> dict[str, dict]:
    """Write one output shard completely (temp file, then atomic rename). Returns per-tensor records.

    Any failure (a full disk included) removes the temp file and raises a one-line ChimeraError
    naming the file; shards finished before stay."""
    from concurrent.futures import ThreadPoolExecutor

    from chimera.merge.device import mixer

    m = mixer(device, compiled)
    f = ShardFile(Path(out_dir) / job.filename, job.slots(), run_id)
    records: dict[str, dict] = {}
    # copies' distance sums run on this thread, in tensor order, while the kernel copies (on another core)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chimera-distance") if distances else None
    pending: list = []
    try:
        for it in job.items:
            records[it.name] = run_tensor(it, f, compiled=compiled, chunk_elems=chunk_elems, distances=distances,
                                          mixer=m, worker=worker, pending=pending)
            if on_bytes:
                on_bytes(it.nbytes)
        finish_distances(pending)
        f.commit()
    except BaseException:
        f.abort()
        raise
    finally:
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)
    return records


@dataclass
class MergeResult:
    out: Path
    shards: int
    written: int  # shards written in this run (the rest were finished before a --resume)
    records: dict[str, dict]

    @property
    def ops(self) -> dict[str, int]:
        return count_ops(self.records)


COMPILE_MIN_ELEMS = 20_000_000_000  # below ~20 Gparam of FP8 mixing, eager beats paying for compiles


def use_compile(plan: Plan, mode: str = "auto", device: str = "cpu") -> bool:
    """Whether torch's fused FP8 block kernel runs under torch.compile: 'on', 'off' or 'auto' (on a
    CUDA device always; on the CPU, where the C kernels run and torch's kernel is only the fallback
    without a compiler, by size)."""
    if mode in ("on", "off"):
        return mode == "on"
    from chimera.merge.device import cuda_requested

    if cuda_requested(device):
        return True
    work = sum(it.shape[0] * it.shape[1] for it in plan.items if it.op == "mix" and it.fp8_out)
    return work >= COMPILE_MIN_ELEMS


def job_memory(job: ShardJob, chunk_elems: int = CHUNK_ELEMS) -> int:
    """Bytes a shard job holds at most (its Ray memory request): two chunk slots of every parent's
    stored rows, the float32 rows of the generic path, the output chunk, and the process itself."""
    parents = max((len(it.sources) for it in job.items), default=1)
    return (256 << 20) + (3 * parents + 3) * 4 * chunk_elems


def _job_task(args: dict) -> tuple[str, dict[str, dict]]:
    """One shard job from plain arguments (what a Ray task or a pool thread runs)."""
    job = args.pop("job")
    return job.filename, run_job(job, **args)


def run_merge(plan: Plan, out: str | os.PathLike, resume: bool = False, force: bool = False,
              workers: int = 2, on_bytes: Callable[[int], None] | None = None,
              compile: str = "auto", chunk_elems: int = CHUNK_ELEMS, distances: bool = True,
              executor: str = "local", address: str | None = None, device: str = "auto") -> MergeResult:
    """Execute every shard job (skipping finished ones on --resume), then finalize the directory.

    One merge writes an output at a time (a second one is refused, naming the first one's pid). The
    compile choice is recorded in the progress file and reused by --resume, so a resumed merge gives
    the same bytes as an uninterrupted one. `--resume` on a complete output of the same plan does
    nothing. `distances=False` skips measuring each tensor's distance to the base (a copy then
    reads only the selected parent); a threshold still measures what it decides on.
    `executor="ray"` runs each shard job as a Ray task on the cluster at `address` (OUT must be on a
    filesystem every node shares); `device` is where mixes run (auto | cpu | cuda[:N]).
    """
    ex = Executor(executor, workers, address)
    if resume and (records := finished(plan, out)) is not None:
        return MergeResult(Path(out).resolve(), len(plan.jobs), 0, records)
    o = Output.open(plan, out, resume, force)
    try:
        o.compiled = o.compiled if o.compiled is not None else use_compile(plan, compile, device)
        o.save()
        todo = [j for j in plan.jobs if j.filename not in o.done]
        if on_bytes:
            on_bytes(sum(j.nbytes for j in plan.jobs if j.filename in o.done))
        local = ex.kind == "local"
        args = [{"job": j, "out_dir": o.path, "compiled": o.compiled, "run_id": o.run_id, "chunk_elems": chunk_elems,
                 "distances": distances, "device": device, **({"on_bytes": on_bytes} if local else {})}
                for j in todo]
        gpus = 1 if device.startswith("cuda") else 0   # "auto" on Ray: a task uses a GPU only if given one

        def resources(i: int) -> dict:
            return {"num_cpus": 1, "num_gpus": gpus, "memory": job_memory(todo[i], chunk_elems)}

        for i, (name, records) in map_unordered(_job_task, args, ex, resources=resources):
            o.mark(name, records)
            if on_bytes and not local:
                on_bytes(todo[i].nbytes)
        records = o.records()
        o.finalize(records)
    finally:
        o.release()
    return MergeResult(o.path, len(plan.jobs), len(todo), records)
