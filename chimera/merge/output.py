"""A merge's output directory: one writer at a time, progress for --resume, free space, finalize.

    OUT/.chimera/lock            flock()ed by the merge writing OUT (holds its pid); the kernel drops it
                                 when that process exits, even on kill -9
    OUT/.chimera/progress.json   plan id, compile choice, finished shards (fsynced after every shard)
    OUT/.chimera/<shard>.json    the per-tensor records of one finished shard
    OUT/.NAME.<run>.partial      a shard being written (renamed to NAME when whole)

`finalize` writes the side files, card, recipe and index, then `config.json` and `chimera_merge.json`
last, and removes `.chimera/`: an output with `config.json` is complete. A distributed executor opens
the output here, runs `execute.run_job(job, out_dir)` per shard anywhere that sees the filesystem,
`mark`s each finished shard, then calls `finalize`.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

from chimera.checkpoint.files import INDEX
from chimera.checkpoint.writer import write_failed, write_index, write_json_atomic
from chimera.errors import ChimeraError
from chimera.merge import card
from chimera.merge.plan import Plan

STATE_DIR = ".chimera"
REPORT = "chimera_merge.json"
MARGIN = 1 << 20  # bytes for config, index, card and records on top of the shards


def count_ops(records: dict[str, dict]) -> dict[str, int]:
    """How many tensors each operation (copy, cast, mix, base) produced."""
    return dict(Counter(r["op"] for r in records.values()))


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it: its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def finished(plan: Plan, out: Path) -> dict[str, dict] | None:
    """The records of a complete output of this plan (report + every shard present), else None."""
    try:
        report = json.loads((Path(out) / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if report.get("plan_id") != plan.plan_id or not all((Path(out) / j.filename).is_file() for j in plan.jobs):
        return None
    return report["tensors"]


def _lock(state: Path, out: Path) -> int:
    """flock `state/lock` exclusively (non-blocking) and write our pid into it; refuse naming the holder."""
    try:
        state.mkdir(exist_ok=True)
        fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_failed(state / "lock", e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ChimeraError(f"output {out} is being written by another chimera merge (pid {holder}); "
                           f"wait for it to finish or stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Output:
    """An output directory opened for one merge run (holds the lock until `release`)."""

    def __init__(self, plan: Plan, path: Path, lock_fd: int):
        self.plan = plan
        self.path = path
        self.state = path / STATE_DIR
        self.progress = self.state / "progress.json"
        self.lock_fd = lock_fd
        self.run_id = f"{os.getpid()}-{os.urandom(3).hex()}"
        self.done: dict[str, int] = {}
        self.compiled: bool | None = None
        self._mu = threading.Lock()

    @classmethod
    def open(cls, plan: Plan, out: str | os.PathLike, resume: bool = False, force: bool = False) -> Output:
        """Check and lock `out` for `plan`: new, resumable (`resume`), or cleared of a merge's files
        (`force`, never while another merge holds it); refuse up front if the shards cannot fit."""
        path = Path(out).resolve()
        for name, p in plan.recipe.parents.items():
            p = p.resolve()
            if path == p or p in path.parents or path in p.parents:
                raise ChimeraError(f"output {out} overlaps parent {name} ({p}): choose another directory")
        if path.exists() and not path.is_dir():
            raise ChimeraError(f"output {out} exists and is not a directory")
        made_out = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_failed(path, e) from None
        made_state = not (path / STATE_DIR).exists()
        self = cls(plan, path, _lock(path / STATE_DIR, path))  # refuses while another merge holds it
        try:
            self._prepare(out, resume, force)
        except BaseException:  # leave the directory as we found it
            if made_state:
                shutil.rmtree(self.state, ignore_errors=True)
            self.release()
            if made_out:
                try:
                    path.rmdir()
                except OSError:
                    pass
            raise
        return self

    def _prepare(self, out, resume: bool, force: bool) -> None:
        state = self._load()
        entries = [p for p in self.path.iterdir() if p.name != STATE_DIR]
        if resume and state is not None:
            if state.get("plan_id") != self.plan.plan_id:
                raise ChimeraError(f"output {out} holds a merge of a different plan (recipe or parents changed); "
                                   f"use --force")
            self.compiled = state.get("compiled")
            self.done = {k: v for k, v in state.get("done", {}).items()
                         if (self.path / k).is_file() and (self.path / k).stat().st_size == v}
            for p in self.path.glob(".*.partial"):  # we hold the lock: these are a dead run's
                p.unlink(missing_ok=True)
        elif resume:
            raise ChimeraError(f"output {out} has no chimera progress record to resume; use --force to overwrite")
        elif entries or state is not None:
            if not force:
                raise ChimeraError(f"output {out} is not empty (use --force to overwrite, --resume to continue)")
            for p in entries:  # --force: remove what a merge writes, nothing else
                if p.name.endswith((".safetensors", ".partial")) or p.name in (INDEX, REPORT, "config.json"):
                    p.unlink()
            for p in self.state.iterdir():
                if p.name != "lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        need = sum(j.file_bytes for j in self.plan.jobs if j.filename not in self.done) + MARGIN
        free = free_bytes(self.path)
        if need > free:
            raise ChimeraError(f"output {out}: the merge writes {gb(need)} but its filesystem has {gb(free)} free; "
                               f"free some space or choose another directory")

    def _load(self) -> dict | None:
        try:
            return json.loads(self.progress.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def save(self) -> None:
        """Write the progress file (fsynced): plan id, compile choice, finished shards."""
        with self._mu:
            write_json_atomic(self.progress, {"plan_id": self.plan.plan_id, "compiled": self.compiled,
                                              "done": self.done})

    def mark(self, shard: str, records: dict[str, dict]) -> None:
        """Record a finished shard: its records, then the progress file."""
        write_json_atomic(self.state / f"{shard}.json", records)
        with self._mu:
            self.done[shard] = (self.path / shard).stat().st_size
        self.save()

    def records(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for j in self.plan.jobs:
            out.update(json.loads((self.state / f"{j.filename}.json").read_text()))
        return out

    def finalize(self, records: dict[str, dict]) -> None:
        """Side files from the base, model card, recipe, index; config.json and the report last."""
        plan, out = self.plan, self.path
        ops = count_ops(records)
        try:
            for p in plan.side_files:
                shutil.copyfile(p, out / p.name)  # follows symlinks: the output holds plain files
            multi = len(plan.recipe.parents) > 1
            card.write(plan, out, ops, distances=not multi or all("distance" in r for r in records.values()))
        except OSError as e:
            raise write_failed(Path(e.filename or out), e) from None
        if len(plan.jobs) > 1:
            write_index(out, {j.filename: j.slots() for j in plan.jobs})
        write_json_atomic(out / "config.json", plan.config)
        total = plan.summary()["output_bytes"]
        copied = sum(it.nbytes for it in plan.items if records[it.name]["op"] in ("copy", "base")
                     and "kernel" not in records[it.name])
        write_json_atomic(out / REPORT, card.record(plan, records, ops, {
            "output_bytes": total, "copied_bytes": copied, "computed_bytes": total - copied}))
        shutil.rmtree(self.state, ignore_errors=True)

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
