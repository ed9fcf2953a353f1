"""One output tensor's path: decide its operation, stream it in row chunks into its slot, record it.

    threshold?  d = max_i d(P_i, B) over the whole tensor first; d < delta -> the base's version
    copy        the selected parent's stored bytes, chunk by chunk (kernel copy; FP8 scale too)
    cast, mix   per chunk: read rows as float32, acc = sum_i lambda_i * x_i, encode, write
                (FP8 in and out with whole 128-column blocks: the fused block kernel instead, whatever the
                chunking, so the chunk size never changes the bytes)

The record's distance (to the base, every non-base parent, the plan's metric) is measured from the
same chunks as the data pass reads. Memory: a few row chunks, never a tensor. A copy imports no torch.
"""
from __future__ import annotations

from chimera.checkpoint.files import TensorInfo
from chimera.checkpoint.formats import scale_name
from chimera.checkpoint.writer import ShardFile
from chimera.merge.distance import CHUNK_ELEMS, ToBase, distance_to_base, row_chunks
from chimera.merge.plan import Item


def run_tensor(it: Item, out: ShardFile, *, compiled: bool = False, chunk_elems: int = CHUNK_ELEMS,
               distances: bool = True) -> dict:
    """Write output tensor `it` into its slot of `out`; returns its record (class, op, lambdas, distance)."""
    rec: dict = {"class": it.cls, "op": it.op, "lambdas": dict(it.lambdas)}
    op, lams = it.op, it.lambdas
    dist = None
    if it.threshold is not None:
        # the decision needs the whole tensor first; the data pass then reads it again
        dist = distance_to_base(it, chunk_elems=chunk_elems)
        if not dist >= it.threshold.delta:
            op, lams = it.base_op, ((it.base, 1.0),)
            rec["op"], rec["lambdas"] = "base", {it.base: 1.0}
    measure = ToBase(it) if (distances and dist is None and it.others) else None
    chunks = row_chunks(it.shape, it.align, chunk_elems)
    if op == "copy":
        src = it.source(lams[0][0])
        for rows in chunks:
            if measure:
                measure.add(rows)
            _copy_rows(out, it.name, src.weight, rows)
        if it.fp8_out:
            s = src.scale
            out.copy_from(scale_name(it.name), s.file, s.start, s.nbytes)
    else:
        rec["kernel"] = _compute(it, out, lams, chunks, measure, compiled)
    if measure:
        dist = measure.value()
    if dist is not None:
        rec["distance"] = dist
    return rec


def _copy_rows(out: ShardFile, name: str, info: TensorInfo, rows: tuple[int, int] | None) -> None:
    start, nbytes, _ = info.row_range(rows)
    out.copy_from(name, info.file, start, nbytes, at=start - info.start)


def _compute(it: Item, out: ShardFile, lams, chunks, measure: ToBase | None, compiled: bool) -> str:
    """cast / mix, chunk by chunk; returns the kernel used ('fused-fp8' or 'generic')."""
    import torch

    from chimera.checkpoint.decode import read_array
    from chimera.checkpoint.files import read_tensor
    from chimera.merge import mix

    srcs = [it.source(p) for p, _ in lams]
    lam_list = [lam for _, lam in lams]
    fused = mix.fused_applies(it, srcs)
    if fused:
        kernel = mix.compiled_mix_fp8_blocks() if compiled else mix.mix_fp8_blocks
        lam_t = torch.tensor(lam_list, dtype=torch.float32)
        full = chunks[0][1] - chunks[0][0]
    for rows in chunks:
        if fused:
            if measure:
                measure.add(rows)
            # compiled kernels are specialized per shape: the tail chunk runs eager
            k = kernel if rows[1] - rows[0] == full else mix.mix_fp8_blocks
            rs = (rows[0] // it.block, -(-rows[1] // it.block))
            qs = [read_tensor(s.weight, rows) for s in srcs]                   # [r, N] e4m3
            ss = [read_tensor(s.scale, rs) for s in srcs]                      # [r/B, N/B] f32
            q, sc, amax = k(qs, ss, lam_t, it.ue8m0, it.block)
            if not bool(torch.isfinite(amax).all()):
                raise mix.non_finite(it.name)
            parts = [(it.name, mix.as_bytes(q), rows[0] * q.shape[1]),
                     (scale_name(it.name), mix.as_bytes(sc), rs[0] * sc.shape[1] * 4)]
        else:
            need = {p for p, _ in lams} | ({s.parent for s in it.sources} if measure else set())
            arrays = {p: read_array(it.source(p).stored, rows) for p in sorted(need)}
            if measure:
                measure.add(rows, arrays)                # before the sum scales the arrays in place
            acc = mix.weighted_sum([torch.from_numpy(arrays[p]) for p, _ in lams], lam_list)
            parts = mix.encode(acc, it, rows)
        for name, data, at in parts:
            out.write(name, data, at)
    return "fused-fp8" if fused else "generic"
