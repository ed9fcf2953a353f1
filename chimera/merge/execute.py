"""Run a merge plan: one independent job per output shard (a thread pool today), then finalize.

    run_merge(plan, out)   open + lock the output (output.py), run every unfinished ShardJob,
                           mark each one done, finalize (index, config, card, report)
    run_job(job, out_dir)  write one shard: each tensor through tensor.run_tensor, into a temp file
                           renamed when whole; returns the shard's per-tensor records

A job needs only its `ShardJob` (file paths, byte ranges, lambdas) and the output directory, so a
process pool or a distributed engine (e.g. a Ray task per shard) on a shared filesystem can run
`run_job` unchanged, `Output.mark` each result, then `Output.finalize`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chimera.checkpoint.writer import ShardFile
from chimera.merge.distance import CHUNK_ELEMS
from chimera.merge.output import Output, count_ops, finished
from chimera.merge.plan import Plan, ShardJob
from chimera.merge.tensor import run_tensor


def run_job(job: ShardJob, out_dir: Path, on_bytes: Callable[[int], None] | None = None,
            compiled: bool = False, *, run_id: str | None = None, chunk_elems: int = CHUNK_ELEMS,
            distances: bool = True) -> dict[str, dict]:
    """Write one output shard completely (temp file, then atomic rename). Returns per-tensor records.

    Any failure (a full disk included) removes the temp file and raises a one-line ChimeraError
    naming the file; shards finished before stay."""
    f = ShardFile(Path(out_dir) / job.filename, job.slots(), run_id)
    records: dict[str, dict] = {}
    try:
        for it in job.items:
            records[it.name] = run_tensor(it, f, compiled=compiled, chunk_elems=chunk_elems, distances=distances)
            if on_bytes:
                on_bytes(it.nbytes)
        f.commit()
    except BaseException:
        f.abort()
        raise
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


def use_compile(plan: Plan, mode: str = "auto") -> bool:
    """Whether the fused FP8 block kernel runs under torch.compile: 'on', 'off' or 'auto' (by size)."""
    if mode in ("on", "off"):
        return mode == "on"
    work = sum(it.shape[0] * it.shape[1] for it in plan.items if it.op == "mix" and it.fp8_out)
    return work >= COMPILE_MIN_ELEMS


def run_merge(plan: Plan, out: str | os.PathLike, resume: bool = False, force: bool = False,
              workers: int = 2, on_bytes: Callable[[int], None] | None = None,
              compile: str = "auto", chunk_elems: int = CHUNK_ELEMS, distances: bool = True) -> MergeResult:
    """Execute every shard job (skipping finished ones on --resume), then finalize the directory.

    One merge writes an output at a time (a second one is refused, naming the first one's pid). The
    compile choice is recorded in the progress file and reused by --resume, so a resumed merge gives
    the same bytes as an uninterrupted one. `--resume` on a complete output of the same plan does
    nothing. `distances=False` skips measuring each tensor's distance to the base (a copy then
    reads only the selected parent); a threshold still measures what it decides on.
    """
    if resume and (records := finished(plan, out)) is not None:
        return MergeResult(Path(out).resolve(), len(plan.jobs), 0, records)
    o = Output.open(plan, out, resume, force)
    try:
        o.compiled = o.compiled if o.compiled is not None else use_compile(plan, compile)
        o.save()
        todo = [j for j in plan.jobs if j.filename not in o.done]
        if on_bytes:
            on_bytes(sum(j.nbytes for j in plan.jobs if j.filename in o.done))

        def one(job: ShardJob) -> None:
            records = run_job(job, o.path, on_bytes, o.compiled, run_id=o.run_id, chunk_elems=chunk_elems,
                              distances=distances)
            o.mark(job.filename, records)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(one, j) for j in todo]
            try:
                for fut in as_completed(futures):
                    fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        records = o.records()
        o.finalize(records)
    finally:
        o.release()
    return MergeResult(o.path, len(plan.jobs), len(todo), records)
