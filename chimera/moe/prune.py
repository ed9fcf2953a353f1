"""Expert pruning: remove routed experts from a checkpoint (`chimera prune`).

For every MoE layer L a list of kept experts `keep[L]` (old indices, ascending) is decided; kept expert `keep[L][i]`
becomes expert `i`. The output checkpoint then holds, shard by shard (same shard names):

- every tensor that is not a routed expert or router, byte for byte;
- per-expert tensors of kept experts, renamed `experts.{old}.` -> `experts.{new}.`, byte for byte (FP8 codes and
  their `weight_scale_inv` alike); fused expert tensors `[E, ...]` (and their scales) cut to the kept rows;
- router tensors with one entry per expert (`gate.weight` [E, H], `e_score_correction_bias` [E]) cut to the kept
  rows, in their stored dtype;
- `config.json` with the expert count (`n_routed_experts` / `num_local_experts` / `num_experts`) set to E', and
  for group-limited routing (DeepSeek `n_group`/`topk_group`) groups kept when every group keeps the same number
  of experts (at least 2, and enough for top-k); otherwise group limiting is switched off (n_group = topk_group
  = 1) and the summary says so.

Which experts to keep comes from a saliency map [n_moe_layers, E] (REAP, frequency, an fTRI ranking, random):
`select_keep` keeps the highest-scoring experts per layer (per group under group-limited routing), or `--drop`
names them. Tensor roles (which tensors are expert e of layer L, the router) come from `chimera.checkpoint.arch`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chimera.checkpoint import arch
from chimera.checkpoint.files import INDEX, SCALE_SUFFIX, Checkpoint, TensorInfo
from chimera.checkpoint.writer import ShardFile, Slot, write_index, write_json_atomic
from chimera.errors import ChimeraError

RECORD = "chimera-prune.json"
_EXPERT_IN_NAME = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass
class Layout:
    """The MoE structure of a checkpoint read from its tensors: {layer: E}, the MTP layers, groups."""

    experts: dict[int, int]                      # MoE layer (decoder or MTP) -> number of routed experts
    n_layers: int                                # decoder layers (MTP layers have index >= n_layers)
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    roles: dict[str, arch.Role] = field(default_factory=dict, repr=False)

    @property
    def decoder_moe(self) -> list[int]:
        return sorted(L for L in self.experts if L < self.n_layers)

    @property
    def mtp(self) -> list[int]:
        return sorted(L for L in self.experts if L >= self.n_layers)


def read_layout(ck: Checkpoint) -> Layout:
    cfg = ck.config
    A = arch.of(cfg)
    roles: dict[str, arch.Role] = {}
    experts: dict[int, int] = {}
    for name, stored in ck.logical().items():
        info = stored.weight
        r = A.role(name)
        if r is None:
            if _EXPERT_IN_NAME.search(name):
                raise ChimeraError(f"{info.file}: tensor {name} looks like a routed expert but the "
                                   f"{ck.model_type} architecture has no rule for it")
            continue
        roles[name] = r
        if r.cls == "router" and len(info.shape) == 2 and r.layer is not None:
            experts[r.layer] = int(info.shape[0])
    if not experts:
        raise ChimeraError(f"{ck.path}: no MoE router found ({ck.model_type}): nothing to prune")
    keys = arch.expert_count_keys(cfg)
    if not keys:
        raise ChimeraError(f"{ck.path / 'config.json'}: no expert-count key ({', '.join(arch.EXPERT_COUNT_KEYS)})")
    return Layout(experts, int(cfg.get("num_hidden_layers", 0)), int(cfg.get("num_experts_per_tok", 1)),
                  int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1), roles)


# ------------------------------------------------------------------------------------------- selection
def select_keep(scores: dict[int, np.ndarray], n_keep: int, n_group: int = 1) -> dict[int, list[int]]:
    """Per layer, the `n_keep` highest-scoring experts (ties: lower index first). With `n_group > 1` the best
    `n_keep / n_group` of each group of consecutive experts, so group-limited routing keeps equal groups."""
    out = {}
    for L, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        E = s.size
        if not 1 <= n_keep <= E:
            raise ChimeraError(f"layer {L}: can't keep {n_keep} of {E} experts")
        groups = n_group if n_group > 1 and E % n_group == 0 else 1
        if n_keep % groups:
            raise ChimeraError(f"--keep-per-layer {n_keep} is not a multiple of n_group={groups}: group-limited "
                               f"routing needs the same number of experts in every group")
        per, take = E // groups, n_keep // groups
        kept = []
        for g in range(groups):
            block = s[g * per:(g + 1) * per]
            order = np.lexsort((np.arange(per), -block))   # by score desc, then index
            kept += [g * per + int(i) for i in order[:take]]
        out[L] = sorted(kept)
    return out


def keep_from_drop(drop: list[tuple[int, int]], layout: Layout) -> dict[int, list[int]]:
    """The kept experts per MoE layer once the `(layer, expert)` pairs in `drop` are removed."""
    gone: dict[int, set[int]] = {}
    for L, e in drop:
        if L not in layout.experts:
            raise ChimeraError(f"expert {L}:{e}: layer {L} is not an MoE layer (MoE layers: "
                               f"{', '.join(map(str, sorted(layout.experts)))})")
        if not 0 <= e < layout.experts[L]:
            raise ChimeraError(f"expert {L}:{e}: out of range (layer {L} has experts 0-{layout.experts[L] - 1})")
        gone.setdefault(L, set()).add(e)
    return {L: [e for e in range(E) if e not in gone.get(L, set())] for L, E in layout.experts.items()}


def random_scores(layout: Layout, seed: int) -> dict[int, np.ndarray]:
    """A random saliency map (the control every pruning experiment needs)."""
    rng = np.random.default_rng(seed)
    return {L: rng.random(layout.experts[L]) for L in layout.decoder_moe}


# ------------------------------------------------------------------------------------------- planning
@dataclass
class PrunePlan:
    keep: dict[int, list[int]]
    n_experts: int                      # E' (every MoE layer)
    config: dict                        # the output config.json
    drop_mtp: bool = False
    notes: list[str] = field(default_factory=list)


def plan_prune(ck: Checkpoint, keep: dict[int, list[int]], drop_mtp: bool = False) -> PrunePlan:
    layout = read_layout(ck)
    keep = {L: sorted(set(int(e) for e in v)) for L, v in keep.items()}
    full = {L: list(range(E)) for L, E in layout.experts.items()}
    for L in keep:
        if L not in layout.experts:
            raise ChimeraError(f"layer {L} is not an MoE layer of {ck.path}")
        if keep[L] and not 0 <= keep[L][0] <= keep[L][-1] < layout.experts[L]:
            raise ChimeraError(f"layer {L}: expert index out of range 0-{layout.experts[L] - 1}")
    mtp = layout.mtp
    if mtp and not drop_mtp and any(L not in keep for L in mtp) and any(len(v) < layout.experts[L]
                                                                        for L, v in keep.items()):
        raise ChimeraError(f"MTP layer(s) {', '.join(map(str, mtp))}: no routing statistics (transformers never runs "
                           f"them) and a config holds one expert count; pass --drop-mtp to remove the MTP layer, or "
                           f"name its experts in --drop")
    merged = {L: keep.get(L, full[L]) for L in layout.experts if not (drop_mtp and L in mtp)}
    sizes = {L: len(v) for L, v in merged.items()}
    if len(set(sizes.values())) != 1:
        raise ChimeraError("every MoE layer must keep the same number of experts (config.json holds one count): "
                           + ", ".join(f"layer {L} keeps {n}" for L, n in sizes.items()))
    E2 = next(iter(sizes.values()))
    E = next(iter(layout.experts.values()))
    if E2 < layout.top_k:
        raise ChimeraError(f"keeping {E2} experts per layer leaves fewer than num_experts_per_tok={layout.top_k}")
    cfg = dict(ck.config)
    notes = []
    for k in arch.expert_count_keys(cfg):
        cfg[k] = E2
    if layout.n_group > 1:
        per = E // layout.n_group
        equal = all(
            all(sum(1 for e in v if e // per == g) == E2 // layout.n_group for g in range(layout.n_group))
            for v in merged.values()) and E2 % layout.n_group == 0
        per2 = E2 // layout.n_group if equal else 0
        if equal and per2 >= 2 and layout.topk_group * per2 >= layout.top_k:
            notes.append(f"group-limited routing kept: n_group={layout.n_group}, {per2} experts per group")
        else:
            why = ("groups keep unequal numbers of experts" if not equal else
                   f"{per2} experts per group is too few for top-2 group scores / top_k={layout.top_k}")
            cfg["n_group"], cfg["topk_group"] = 1, 1
            notes.append(f"group-limited routing switched off (n_group {layout.n_group} -> 1, topk_group "
                         f"{layout.topk_group} -> 1): {why}")
    if drop_mtp and mtp:
        cfg["num_nextn_predict_layers"] = 0
        notes.append(f"MTP layer(s) {', '.join(map(str, mtp))} removed")
    return PrunePlan(merged, E2, cfg, drop_mtp, notes)


# ------------------------------------------------------------------------------------------- writing
def _out_name(name: str, role: arch.Role, new: dict[int, int]) -> str:
    m = _EXPERT_IN_NAME.search(name)
    return name[: m.start(1)] + str(new[role.expert]) + name[m.end(1):]


def prune_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, keep: dict[int, list[int]],
                     drop_mtp: bool = False, record: dict | None = None) -> dict:
    """Write a copy of `src` with only the experts in `keep` (see the module docstring); returns a summary."""
    src, dst = Path(src), Path(dst)
    ck = Checkpoint(src)
    p = plan_prune(ck, keep, drop_mtp)
    layout = read_layout(ck)
    if dst.exists():
        raise ChimeraError(f"{dst}: output already exists")
    if dst.resolve() == ck.path or ck.path in dst.resolve().parents:
        raise ChimeraError(f"{dst}: output must not be the input directory or inside it")
    new_index = {L: {e: i for i, e in enumerate(v)} for L, v in p.keep.items()}
    tensors = ck.tensors

    # every output tensor: (out name, source info, kept rows or None for a verbatim copy)
    per_file: dict[str, list[tuple[str, TensorInfo, list[int] | None]]] = {}
    for name, info in tensors.items():
        base = name[: -len(SCALE_SUFFIX)] + ".weight" if name.endswith(SCALE_SUFFIX) else name
        r = layout.roles.get(base)
        item: tuple[str, TensorInfo, list[int] | None] | None = (name, info, None)
        if drop_mtp and r is not None and (r.cls == "mtp" or (r.layer or 0) >= layout.n_layers):
            item = None                                            # the MTP layer goes as a whole
        elif r is not None and r.layer is not None and r.layer in layout.experts:
            L = r.layer
            if r.cls == "routed_experts" and not r.fused:
                item = (_out_name(name, r, new_index[L]), info, None) if r.expert in new_index[L] else None
            elif (r.cls == "routed_experts" and r.fused) or (r.cls == "router" and info.shape
                                                               and info.shape[0] == layout.experts[L]):
                if name.endswith(SCALE_SUFFIX) and r.cls == "router":
                    raise ChimeraError(f"{info.file}: quantized router {base}: pruning its block scales is not "
                                       f"supported")
                item = (name, info, p.keep[L])
        if item is not None:
            per_file.setdefault(info.file.name, []).append(item)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        shards: dict[str, list[Slot]] = {}
        for fname, items in per_file.items():
            slots = []
            for out_name, info, rows in items:
                shape = tuple(info.shape) if rows is None else (len(rows),) + tuple(info.shape[1:])
                slots.append(Slot(out_name, info.dtype, shape))
            out = ShardFile(tmp / fname, slots)
            try:
                for (out_name, info, rows), slot in zip(items, slots):
                    if rows is None:
                        out.copy_from(out_name, info.file, info.start, info.nbytes)
                    else:                                              # kept rows: contiguous byte ranges
                        row = info.nbytes // info.shape[0]
                        for i, e in enumerate(rows):
                            out.copy_from(out_name, info.file, info.start + e * row, row, at=i * row)
                out.commit()
            except BaseException:
                out.abort()
                raise
            shards[fname] = slots
        if (ck.path / INDEX).is_file():
            write_index(tmp, shards)
        for f in ck.side_files(skip={"config.json", RECORD}):  # tokenizer, generation config, chat template, ...
            shutil.copy2(f, tmp / f.name)
        write_json_atomic(tmp / "config.json", p.config)
        summary = {"source": str(src), "n_experts_before": next(iter(layout.experts.values())),
                   "n_experts_after": p.n_experts, "notes": p.notes,
                   "kept": {str(L): v for L, v in p.keep.items()},
                   "dropped": {str(L): [e for e in range(layout.experts[L]) if e not in set(p.keep.get(L, []))]
                               for L in layout.experts},
                   **(record or {})}
        write_json_atomic(tmp / RECORD, summary)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["output"] = str(dst)
    return summary


def scores_from_ftri(path: str | os.PathLike, layout: Layout) -> dict[int, np.ndarray]:
    """Keep-scores from an fTRI result: minus the differential, so the experts most tied to the target behaviour
    are pruned first."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        layers, diff = data["layers"], np.asarray(data["diff"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        raise ChimeraError(f"{p}: not an fTRI result (needs 'layers' and 'diff')") from None
    if diff.shape != (len(layers), max(layout.experts.values())):
        raise ChimeraError(f"{p}: diff map {diff.shape} doesn't fit this model's {len(layout.decoder_moe)} MoE "
                           f"layers x {max(layout.experts.values())} experts")
    return {int(L): -diff[j] for j, L in enumerate(layers)}


def capture_routes(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8):
    """A capture run for pruning: the model's greedy responses to `prompts` (calibration text shaped like its
    use), teacher-forced with the prompts, routing and expert output norms recorded on every token."""
    from chimera.moe.capture import route_texts
    from chimera.moe.ftri import generate_responses

    responses = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size) if max_new_tokens else None
    return route_texts(model, tokenizer, prompts, responses, batch_size=batch_size, norms=True)


def scores_from_routes(routes, by: str) -> dict[int, np.ndarray]:
    """Saliency per MoE layer (`by`: reap | frequency) over all tokens of a capture run."""
    s = routes.saliency(by)
    return {L: s[j] for j, L in enumerate(routes.layers)}
