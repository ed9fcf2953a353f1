"""One output tensor's path: decide its operation, stream it in row chunks into its slot, record it.

    threshold?  d = max_i d(P_i, B) over the whole tensor first; d < delta -> the base's version
    copy        the selected parent's stored bytes, chunk by chunk (kernel copy; its companions too: FP8
                scale, MXFP4 scales, INT4 scale and shape)
    cast, mix   per chunk, the next chunk's parents read ahead (`reader.Mapped`: views of the mapped
                parent files, the next chunk advised in; `reader.Prefetcher` into pinned buffers for a GPU):
                FP8 in and out, float32 scales, one block size    the fused block kernel
                bf16 / f16 / f32 in, one of them out               the fused float kernel, in the stored dtype
                anything else (MXFP4, INT4, bf16/E8M0 scales,      read rows as float32 (`decode`),
                FP8 <-> float, ...)                                acc = sum_i lambda_i x_i, `mix.encode`
                (which kernel depends on the tensor's formats, never on the chunking, so the chunk size
                never changes the bytes); the fused kernels run where `mixer` says (`--device`)
    segments    a fused experts tensor split by an expert selector: each run of experts [lo, hi) is
                copied (those rows of every stored part) or computed on its own

The record's distance (to the base, every non-base parent, the plan's metric) is measured from the
same chunks as the data pass reads. Memory: a few row chunks, never a tensor. A copy imports no torch.
"""
from __future__ import annotations

from chimera.checkpoint.files import TensorInfo
from chimera.checkpoint.writer import ShardFile
from chimera.errors import ChimeraError
from chimera.merge.distance import CHUNK_ELEMS, ToBase, distance_to_base, row_chunks
from chimera.merge.plan import Item


def run_tensor(it: Item, out: ShardFile, *, compiled: bool = False, chunk_elems: int = CHUNK_ELEMS,
               distances: bool = True, mixer=None, worker=None, pending: list | None = None) -> dict:
    """See `_run_tensor`; a parent file truncated while a kernel read it is a one-line error naming it."""
    from chimera.merge.native import FileChanged

    try:
        return _run_tensor(it, out, compiled=compiled, chunk_elems=chunk_elems, distances=distances, mixer=mixer,
                           worker=worker, pending=pending)
    except FileChanged:
        raise file_changed(it) from None


def file_changed(it: Item) -> ChimeraError:
    """The error for a parent file that shrank under a merge (a kernel met a page past its new end)."""
    import os

    files = sorted({p.file for s in it.sources for p in s.stored.parts})
    short = []
    for f in files:
        try:
            need = max(p.end for s in it.sources for p in s.stored.parts if p.file == f)
            if os.stat(f).st_size < need:
                short.append(f)
        except OSError:
            short.append(f)
    return ChimeraError(f"{', '.join(map(str, short or files))}: shrank while tensor {it.name} was read from it "
                        f"(truncated by another process?); parents must not change while they are merged")


def _run_tensor(it: Item, out: ShardFile, *, compiled: bool, chunk_elems: int, distances: bool, mixer, worker,
                pending: list | None) -> dict:
    """Write output tensor `it` into its slot of `out`; returns its record (class, op, lambdas, distance).

    With a `worker` (one thread), a copy's distance sums run there while this thread copies; with a `pending`
    list as well, the record's distance is left to the caller: (record, ToBase) is appended and
    `finish_distances(pending)` fills it in (so the sums of one tensor overlap the copies of the next)."""
    rec: dict = {"class": it.cls, "op": it.op, "lambdas": dict(it.lambdas)}
    op, lams = it.op, it.lambdas
    dist = None
    if it.threshold is not None:
        # the decision needs the whole tensor first; the data pass then reads it again
        dist = distance_to_base(it, chunk_elems=chunk_elems)
        if not dist >= it.threshold.delta:
            op, lams = it.base_op, ((it.base, 1.0),)
            rec["op"], rec["lambdas"] = "base", {it.base: 1.0}
    chunks = row_chunks(it.shape, it.align, chunk_elems)
    if it.segments and rec["op"] != "base":
        if distances and dist is None and it.others:
            dist = distance_to_base(it, chunk_elems=chunk_elems)
        rec["segments"] = []
        for sg in it.segments:
            rows = [(max(a, sg.lo), min(b, sg.hi)) for a, b in chunks if min(b, sg.hi) > max(a, sg.lo)]
            if sg.op == "copy":
                _copy(it, out, it.source(sg.lambdas[0][0]).stored, rows, whole=False, measure=None)
            else:
                _compute(it, out, sg.lambdas, rows, None, compiled, mixer)
            rec["segments"].append({"experts": [sg.lo, sg.hi - 1], "op": sg.op, "lambdas": dict(sg.lambdas)})
        measure = None
    else:
        measure = None
        if distances and dist is None and it.others:
            measure = ToBase(it, worker if op == "copy" else None)
        if op == "copy":
            _copy(it, out, it.source(lams[0][0]).stored, chunks, whole=True, measure=measure)
            if measure and pending is not None and measure.worker is not None:
                measure.close()
                pending.append((rec, measure))
                return rec
        else:
            rec["kernel"] = _compute(it, out, lams, chunks, measure, compiled, mixer)
    if measure:
        dist = measure.value()
        measure.close()
    if dist is not None:
        rec["distance"] = dist
    return rec


def finish_distances(pending: list) -> None:
    """Wait for the distances `run_tensor` left pending and put them in their records."""
    from chimera.merge.native import FileChanged

    for rec, measure in pending:
        try:
            rec["distance"] = measure.value()
        except FileChanged:
            raise file_changed(measure.item) from None
    pending.clear()


def _copy(it: Item, out: ShardFile, src, chunks, whole: bool, measure: ToBase | None) -> None:
    """The stored bytes of `src` into `it`'s slots: the main tensor by row chunks (measuring as it goes, on the
    measure's worker thread if it has one), its companions whole (`whole`) or, for a run of experts, the same
    rows of every part."""
    parts = dict(src.roles())
    names = [(role, name) for role, name, _, _ in it.parts()]
    for rows in chunks:
        if measure:
            measure.add_later(rows)
        for role, name in names:
            if role == "weight" or not whole:
                _copy_rows(out, name, parts[role], rows)
    if whole:
        for role, name in names:
            if role != "weight":
                t = parts[role]
                out.copy_from(name, t.file, t.start, t.nbytes)


def _copy_rows(out: ShardFile, name: str, info: TensorInfo, rows: tuple[int, int] | None) -> None:
    start, nbytes, _ = info.row_range(rows)
    out.copy_from(name, info.file, start, nbytes, at=start - info.start)


def _compute(it: Item, out: ShardFile, lams, chunks, measure: ToBase | None, compiled: bool, mixer) -> str:
    """cast / mix, chunk by chunk; returns the kernel used ('fused-fp8', 'fused-float' or 'generic')."""
    from chimera.merge import kernels

    srcs = [it.source(p) for p, _ in lams]
    if kernels.fused_applies(it, srcs):
        return _fused(it, out, lams, chunks, measure, mixer, fp8=True)
    if kernels.fused_float_applies(it, srcs):
        return _fused(it, out, lams, chunks, measure, mixer, fp8=False)
    return _generic(it, out, lams, chunks, measure)


def _fused(it: Item, out: ShardFile, lams, chunks, measure: ToBase | None, mixer, fp8: bool) -> str:
    """The fused kernels on the stored bytes: each chunk's reads (the mixed parents' rows, their scale
    rows; every parent's rows when distances are measured) come from the reader one chunk ahead."""
    import numpy as np

    from chimera.merge import kernels
    from chimera.merge.device import CpuMixer
    from chimera.merge.reader import Mapped, Prefetcher

    mixer = mixer or CpuMixer()
    lam_list = [lam for _, lam in lams]
    mixed = [p for p, _ in lams]
    parents = sorted({p for p, _ in lams} | ({s.parent for s in it.sources} if measure else set()))
    names = [name for _, name, _, _ in it.parts()]          # the weight's (and the FP8 scale's) output names
    plan = []
    for rows in chunks:
        reads = [(it.source(p).weight, rows) for p in parents]
        if fp8:
            rs = (rows[0] // it.block, -(-rows[1] // it.block))
            reads += [(it.source(p).scale, rs) for p in parents]
        plan.append(reads)
    buf = None  # the output chunk's bytes, reused from chunk to chunk
    with (Prefetcher(plan, pinned=True) if mixer.pinned else Mapped(plan)) as chunks_read:
        for rows, parts in zip(chunks, chunks_read):
            r = (rows[1] - rows[0]) if rows else 1
            if fp8:
                codes = {p: parts[k].reshape(r, -1) for k, p in enumerate(parents)}
                scales = {p: parts[len(parents) + k].view(np.float32).reshape(-(-r // it.block), -1)
                          for k, p in enumerate(parents)}
                q, sc, bad = mixer.mix_fp8([codes[p] for p in mixed], [scales[p] for p in mixed], lam_list,
                                           it.ue8m0, it.block, buf)
                if measure:
                    measure.add(rows, {p: (codes[p], "FP8", scales[p], it.block) for p in parents})
                writes = [(names[0], q, rows[0] * q.shape[1]),
                          (names[1], sc, (rows[0] // it.block) * sc.shape[1] * 4)]
            else:
                shape = _rows_shape(it.shape, rows)
                vals = {p: (parts[k].view(kernels.NUMPY[it.source(p).stored.dtype]).reshape(shape),
                            it.source(p).stored.dtype) for k, p in enumerate(parents)}
                res, bad = mixer.mix_float([vals[p][0] for p in mixed], [vals[p][1] for p in mixed], lam_list,
                                           it.dtype, buf)
                if measure:
                    measure.add(rows, vals)
                writes = [(names[0], res, (rows[0] * res.nbytes // max(r, 1)) if rows else 0)]
            if bad:
                raise kernels.non_finite(it.name)
            out_chunk = writes[0][1]
            if buf is None or out_chunk.nbytes > buf.nbytes:
                buf = out_chunk.reshape(-1).view(np.uint8)
            for name, data, at in writes:
                out.write(name, data, at)
    return "fused-fp8" if fp8 else "fused-float"


def _rows_shape(shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[int, ...]:
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def _generic(it: Item, out: ShardFile, lams, chunks, measure: ToBase | None) -> str:
    """Any formats: rows as float32 (`decode.read_array`), the float32 sum, `mix.encode` in the output's
    format (FP8 with any scale dtype, MXFP4, INT4, a cast)."""
    import torch

    from chimera.checkpoint.decode import read_array
    from chimera.merge import mix

    lam_list = [lam for _, lam in lams]
    for rows in chunks:
        need = {p for p, _ in lams} | ({s.parent for s in it.sources} if measure else set())
        arrays = {p: read_array(it.source(p).stored, rows) for p in sorted(need)}
        if measure:
            measure.add(rows, arrays)                # before the sum scales the arrays in place
        acc = mix.weighted_sum([torch.from_numpy(arrays[p]) for p, _ in lams], lam_list)
        for name, data, at in mix.encode(acc, it, rows):
            out.write(name, data, at)
    return "generic"
