"""Run a merge plan: one independent job per output shard, on a thread pool today.

A job (`run_job`) needs only its `ShardJob` (file paths, byte ranges, lambdas) and the output
directory, so a process pool or a distributed engine on a shared filesystem can run it unchanged.
Tensors are processed in row chunks (whole 128-row FP8 blocks), so memory holds a few chunks, never
a tensor or a shard:

    for each chunk of rows:  acc = sum_i lambda_i * dequant(P_i[rows])      # float32 [r, N]
                             q, s = quantize(acc)   or   acc.to(bf16/f32)   # written at its offset
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chimera.checkpoint import fp8
from chimera.checkpoint.files import DTYPES, INDEX, read_float, read_tensor, scale_name
from chimera.checkpoint.writer import STATE_DIR, Progress, ShardFile, write_index, write_json_atomic
from chimera.errors import ChimeraError
from chimera.merge import card, mix
from chimera.merge.distance import Norms
from chimera.merge.plan import Item, Plan, ShardJob

CHUNK_ELEMS = 1 << 23  # elements per row chunk (32 MB of float32)
REPORT = "chimera_merge.json"


def row_chunks(shape: tuple[int, ...], block: int) -> list[tuple[int, int] | None]:
    """Block-aligned row ranges covering a tensor; [None] for a 0-d/1-d or empty tensor."""
    if len(shape) < 2 or shape[0] == 0:
        return [None]
    row = 1
    for d in shape[1:]:
        row *= d
    step = max(block, (CHUNK_ELEMS // max(row, 1)) // block * block)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def distance_to_base(it: Item, parents: list[str], metric: str | None = None) -> float:
    """max_i d(P_i, base) over the non-base parents, on dequantized values, chunk by chunk."""
    metric = metric or (it.threshold.metric if it.threshold else "relative")
    norms = {p: Norms() for p in parents if p != it.base}
    b = it.source(it.base)
    for rows in row_chunks(it.shape, it.block):
        wb = read_float(b.weight, b.scale, b.block, rows)
        for p, n in norms.items():
            s = it.source(p)
            n.add(read_float(s.weight, s.scale, s.block, rows), wb)
    return max((n.distance(metric) for n in norms.values()), default=0.0)


def _copy(it: Item, out: ShardFile, parent: str) -> None:
    s = it.source(parent)
    out.copy_from(it.name, s.weight.file, s.weight.start, s.weight.nbytes)
    if it.fp8_out:
        out.copy_from(scale_name(it.name), s.scale.file, s.scale.start, s.scale.nbytes)


def run_item(it: Item, out: ShardFile, compiled: bool = False) -> dict:
    """Compute one output tensor into its slot; returns what was done (op, distance)."""
    rec: dict = {"class": it.cls, "op": it.op, "lambdas": dict(it.lambdas)}
    if it.op == "copy":
        _copy(it, out, it.lambdas[0][0])
        return rec
    lams = list(it.lambdas)
    if it.threshold is not None:
        # a second read of this tensor follows when it is mixed: the decision needs the whole tensor first
        d = distance_to_base(it, [p for p, _ in lams])
        rec["distance"] = d
        if d < it.threshold.delta:
            rec["op"], rec["lambdas"], lams = "base", {it.base: 1.0}, [(it.base, 1.0)]
            b = it.source(it.base)
            if b.weight.dtype == it.dtype and (not it.fp8_out or b.block == it.block):
                _copy(it, out, it.base)
                return rec
    srcs = [it.source(p) for p, _ in lams]
    fast = (it.fp8_out and len(it.shape) == 2 and it.shape[1] % it.block == 0
            and all(s.scale is not None and s.block == it.block for s in srcs))
    chunks = row_chunks(it.shape, it.block)
    if fast:
        fused = mix.compiled_mix_fp8_blocks() if compiled else mix.mix_fp8_blocks
        lam_t = torch.tensor([lam for _, lam in lams], dtype=torch.float32)
        full = chunks[0][1] - chunks[0][0]
    for rows in chunks:
        if fast and (rows[1] - rows[0]) % it.block == 0:
            # compiled kernels are specialized per shape: the tail chunk runs eager
            kernel = fused if rows[1] - rows[0] == full else mix.mix_fp8_blocks
            rs = (rows[0] // it.block, rows[1] // it.block)
            qs = [read_tensor(s.weight, rows) for s in srcs]                     # [r, N] e4m3
            ss = [read_tensor(s.scale, rs) for s in srcs]                      # [r/128, N/128]
            q, sc, amax = kernel(qs, ss, lam_t, it.ue8m0, it.block)
            if not bool(torch.isfinite(amax).all()):
                raise ChimeraError(f"tensor {it.name}: the mix produced NaN/Inf (non-finite values in a parent?)")
            out.write(it.name, q, rows[0] * q.shape[1])
            out.write(scale_name(it.name), sc, rs[0] * sc.shape[1] * 4)
            continue
        acc = None
        for p, lam in lams:
            s = it.source(p)
            x = read_float(s.weight, s.scale, s.block, rows)      # float32 [r, N]
            acc = (x if lam == 1.0 else x.mul_(lam)) if acc is None else acc.add_(x, alpha=lam)
        at_row = rows[0] if rows else 0
        if it.fp8_out:
            try:
                q, sc = fp8.quantize(acc, it.block, it.ue8m0)    # [r, N] e4m3, [r/128, Nb] f32
            except FloatingPointError:
                raise ChimeraError(f"tensor {it.name}: the mix produced NaN/Inf (non-finite values in a parent?)") from None
            out.write(it.name, q, at_row * q.shape[1])
            out.write(scale_name(it.name), sc, (at_row // it.block) * sc.shape[1] * 4)
        else:
            # one float32 sum is finite iff no element is NaN/Inf (20x cheaper than isfinite().all());
            # it could only overflow for weights near float32's limit, which bf16/f32 can't hold either
            if acc.is_floating_point() and not bool(torch.isfinite(acc.sum())):
                raise ChimeraError(f"tensor {it.name}: the mix produced NaN/Inf (non-finite values in a parent?)")
            t = acc.to(DTYPES[it.dtype][0])
            row_bytes = t[0].numel() * t.element_size() if t.dim() >= 2 else 0
            out.write(it.name, t, at_row * row_bytes)
    return rec


def run_job(job: ShardJob, out_dir: Path, on_bytes: Callable[[int], None] | None = None,
            compiled: bool = False) -> dict[str, dict]:
    """Write one output shard completely (temp file, then atomic rename). Returns per-tensor records."""
    f = ShardFile(out_dir / job.filename, job.slots())
    records: dict[str, dict] = {}
    try:
        for it in job.items:
            records[it.name] = run_item(it, f, compiled)
            if on_bytes:
                on_bytes(it.nbytes)
        f.commit()
    except BaseException:
        f.abort()
        f.tmp.unlink(missing_ok=True)
        raise
    return records


def count_ops(records: dict[str, dict]) -> dict[str, int]:
    """How many tensors each operation (copy, cast, mix, base) produced."""
    return dict(Counter(r["op"] for r in records.values()))


@dataclass
class MergeResult:
    out: Path
    shards: int
    written: int  # shards written in this run (the rest were finished before a --resume)
    records: dict[str, dict]

    @property
    def ops(self) -> dict[str, int]:
        return count_ops(self.records)


def _check_output(plan: Plan, out: Path, resume: bool, force: bool) -> Progress:
    out_r = out.resolve()
    for name, p in plan.recipe.parents.items():
        p = p.resolve()
        if out_r == p or p in out_r.parents or out_r in p.parents:
            raise ChimeraError(f"output {out} overlaps parent {name} ({p}): choose another directory")
    progress = Progress(out_r, plan.plan_id)
    if out_r.exists() and not out_r.is_dir():
        raise ChimeraError(f"output {out} exists and is not a directory")
    if out_r.is_dir() and any(out_r.iterdir()):
        state = progress.load()
        if resume and state is not None:
            if state.get("plan_id") != plan.plan_id:
                raise ChimeraError(f"output {out} holds a merge of a different plan (recipe or parents changed); use --force")
            progress.compiled = state.get("compiled")
            progress.done = {k: v for k, v in state.get("done", {}).items()
                             if (out_r / k).is_file() and (out_r / k).stat().st_size == v}
        elif resume:
            raise ChimeraError(f"output {out} has no chimera progress record to resume; use --force to overwrite")
        elif not force:
            raise ChimeraError(f"output {out} is not empty (use --force to overwrite, --resume to continue)")
        else:  # --force: remove what a merge writes, nothing else
            for p in out_r.iterdir():
                if p.name.endswith((".safetensors", ".partial")) or p.name in (INDEX, REPORT, "config.json"):
                    p.unlink()
            shutil.rmtree(out_r / STATE_DIR, ignore_errors=True)
    out_r.mkdir(parents=True, exist_ok=True)
    return progress


COMPILE_MIN_ELEMS = 20_000_000_000  # below ~20 Gparam of FP8 mixing, eager beats paying for compiles


def use_compile(plan: Plan, mode: str = "auto") -> bool:
    """Whether the fused FP8 block kernel runs under torch.compile: 'on', 'off' or 'auto' (by size)."""
    if mode in ("on", "off"):
        return mode == "on"
    work = sum(it.shape[0] * it.shape[1] for it in plan.items if it.op == "mix" and it.fp8_out)
    return work >= COMPILE_MIN_ELEMS


def run_merge(plan: Plan, out: str | os.PathLike, resume: bool = False, force: bool = False,
              workers: int = 2, on_bytes: Callable[[int], None] | None = None,
              compile: str = "auto") -> MergeResult:
    """Execute every shard job (skipping finished ones on --resume), then finalize the directory.

    The compile choice is recorded in the progress file and reused by --resume, so a resumed merge
    gives the same bytes as an uninterrupted one. The `.chimera/` state folder is removed once the
    output is complete (`chimera_merge.json` then holds every tensor's record); `--resume` on a
    complete output of the same plan does nothing.
    """
    out = Path(out)
    if resume and (records := _finished(plan, out)) is not None:
        return MergeResult(out.resolve(), len(plan.jobs), 0, records)
    progress = _check_output(plan, out, resume, force)
    compiled = progress.compiled if progress.compiled is not None else use_compile(plan, compile)
    progress.compiled = compiled

    out = out.resolve()
    state = out / STATE_DIR
    state.mkdir(exist_ok=True)
    lock = threading.Lock()
    todo = [j for j in plan.jobs if j.filename not in progress.done]
    if on_bytes:
        on_bytes(sum(j.nbytes for j in plan.jobs if j.filename in progress.done))

    def one(job: ShardJob) -> None:
        records = run_job(job, out, on_bytes, compiled)
        write_json_atomic(state / f"{job.filename}.json", records)
        with lock:
            progress.mark(job.filename, (out / job.filename).stat().st_size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, j) for j in todo]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    records: dict[str, dict] = {}
    for j in plan.jobs:
        records.update(json.loads((state / f"{j.filename}.json").read_text()))
    finalize(plan, out, records)
    return MergeResult(out, len(plan.jobs), len(todo), records)


def finalize(plan: Plan, out: Path, records: dict[str, dict]) -> None:
    """Side files from the base, model card, recipe, index; config.json and the report last."""
    base = plan.recipe.parents[plan.recipe.base]
    skip = {"config.json", INDEX, "README.md", REPORT, "chimera_recipe.yaml", "zoo.json"}  # zoo.json: a zoo model's identity
    for p in sorted(Path(base).iterdir()):
        if (p.is_file() and p.name not in skip and not p.name.startswith(".")
                and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))):
            shutil.copyfile(p, out / p.name)
    ops = count_ops(records)
    card.write(plan, out, ops)
    if len(plan.jobs) > 1:
        write_index(out, {j.filename: j.slots() for j in plan.jobs})
    write_json_atomic(out / "config.json", plan.config)
    write_json_atomic(out / REPORT, card.record(plan, records, ops))
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _finished(plan: Plan, out: Path) -> dict[str, dict] | None:
    """The records of a complete output of this plan (report + every shard present), else None."""
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if report.get("plan_id") != plan.plan_id or not all((out / j.filename).is_file() for j in plan.jobs):
        return None
    return report["tensors"]
