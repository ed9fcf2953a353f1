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
import torch

from chimera.checkpoint import arch
from chimera.checkpoint.files import INDEX, Checkpoint, TensorInfo, read_tensor
from chimera.checkpoint.writer import ShardFile, Slot, write_index, write_json_atomic
from chimera.errors import ChimeraError

RECORD = "chimera-prune.json"
_EXPERT_IN_NAME = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass
class Layout:
    """The MoE structure of a checkpoint: {layer: E}, the MTP layers, groups, and what each logical tensor is."""

    experts: dict[int, int]                      # MoE layer (decoder or MTP) -> number of routed experts
    n_layers: int                                # decoder layers (MTP layers have index >= n_layers)
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    roles: dict[str, arch.Role] = field(default_factory=dict, repr=False)
    router_axis: dict[str, int] = field(default_factory=dict, repr=False)   # router tensor -> its expert axis

    @property
    def decoder_moe(self) -> list[int]:
        return sorted(L for L in self.experts if L < self.n_layers)

    @property
    def mtp(self) -> list[int]:
        return sorted(L for L in self.experts if L >= self.n_layers)


def read_layout(ck: Checkpoint) -> Layout:
    """Roles of every logical tensor, the MoE layers and their expert counts, from the architecture API
    (`chimera.checkpoint.arch`: role, num_experts, router_tensors): no architecture knowledge here."""
    cfg = ck.config
    A = arch.of(cfg)
    stored = ck.logical()
    roles: dict[str, arch.Role] = {}
    by_layer: dict[int, list[str]] = {}
    for name, st in stored.items():
        r = A.role(name)
        if r is None:
            if _EXPERT_IN_NAME.search(name):
                raise ChimeraError(f"{st.file}: tensor {name} looks like a routed expert but the "
                                   f"{ck.model_type} architecture has no rule for it")
            continue
        roles[name] = r
        if r.cls in ("router", "routed_experts") and r.layer is not None:
            by_layer.setdefault(r.layer, []).append(name)
    if not by_layer:
        raise ChimeraError(f"{ck.path}: no routed experts found ({ck.model_type}): nothing to prune")
    experts, router_axis = {}, {}
    for L, names in sorted(by_layer.items()):
        E = experts[L] = int(A.num_experts(L))
        for rt in A.router_tensors(names, L):
            st = stored[rt.name]
            if rt.axis is None:
                raise ChimeraError(f"{st.file}: router tensor {rt.name} holds expert ids (a token table): pruning "
                                   f"layer {L} would need them renumbered, which is not supported")
            if st.shape[rt.axis] != E:
                raise ChimeraError(f"{st.file}: router tensor {rt.name} {list(st.shape)} has no axis of {E} experts")
            router_axis[rt.name] = rt.axis
    if not arch.expert_count_keys(cfg):
        raise ChimeraError(f"{ck.path / 'config.json'}: no expert-count key ({', '.join(arch.EXPERT_COUNT_KEYS)})")
    return Layout(experts, int(cfg.get("num_hidden_layers", 0)), int(cfg.get("num_experts_per_tok", 1)),
                  int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1), roles, router_axis)


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


def plan_prune(ck: Checkpoint, keep: dict[int, list[int]], drop_mtp: bool = False,
               layout: Layout | None = None) -> PrunePlan:
    layout = layout or read_layout(ck)
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
@dataclass
class _Part:
    """One stored tensor of the output: where its bytes come from, and which indices of which axis it keeps."""

    out: str
    src: TensorInfo
    axis: int | None = None       # None: a verbatim copy
    keep: list[int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.src.shape)
        if self.axis is not None:
            s[self.axis] = len(self.keep)
        return tuple(s)


def _renamed(name: str, new: int) -> str:
    m = _EXPERT_IN_NAME.search(name)
    return name[: m.start(1)] + str(new) + name[m.end(1):]


def _parts(ck: Checkpoint, layout: Layout, p: PrunePlan) -> list[_Part]:
    """Every stored tensor of the output (every part of a logical tensor: FP8 scales index experts alike)."""
    new_index = {L: {e: i for i, e in enumerate(v)} for L, v in p.keep.items()}
    out: list[_Part] = []
    for name, st in ck.logical().items():
        r = layout.roles.get(name)
        if p.drop_mtp and r is not None and (r.cls == "mtp" or (r.layer or 0) >= layout.n_layers):
            continue                                                   # the MTP layer goes as a whole
        if r is None or r.layer not in p.keep:
            out += [_Part(t.name, t) for t in st.parts]
        elif r.cls == "routed_experts" and not r.fused:
            if r.expert in new_index[r.layer]:
                out += [_Part(_renamed(t.name, new_index[r.layer][r.expert]), t) for t in st.parts]
        elif r.cls == "routed_experts" or name in layout.router_axis:   # fused [E, ...] experts, router rows
            axis = layout.router_axis.get(name, 0)
            for t in st.parts:
                if t.shape[axis] != layout.experts[r.layer]:
                    raise ChimeraError(f"{t.file}: tensor {t.name} {list(t.shape)}: axis {axis} does not index the "
                                       f"{layout.experts[r.layer]} experts of layer {r.layer}")
                out.append(_Part(t.name, t, axis, p.keep[r.layer]))
        else:
            out += [_Part(t.name, t) for t in st.parts]
    return out


def _write(shard: ShardFile, part: _Part) -> None:
    """Copy a part's bytes: whole, as contiguous ranges (expert axis 0), or gathered along another axis."""
    src = part.src
    if part.axis is None:
        shard.copy_from(part.out, src.file, src.start, src.nbytes)
    elif part.axis == 0:
        row = src.nbytes // src.shape[0]
        for i, e in enumerate(part.keep):
            shard.copy_from(part.out, src.file, src.start + e * row, row, at=i * row)
    else:
        t = read_tensor(src).index_select(part.axis, torch.as_tensor(part.keep, dtype=torch.long))
        shard.write(part.out, t.contiguous().view(torch.uint8).reshape(-1).numpy())


def prune_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, keep: dict[int, list[int]],
                     drop_mtp: bool = False, record: dict | None = None) -> dict:
    """Write a copy of `src` with only the experts in `keep` (see the module docstring); returns a summary."""
    src, dst = Path(src), Path(dst)
    ck = Checkpoint(src)
    layout = read_layout(ck)
    p = plan_prune(ck, keep, drop_mtp, layout)
    if dst.exists():
        raise ChimeraError(f"{dst}: output already exists")
    if dst.resolve() == ck.path or ck.path in dst.resolve().parents:
        raise ChimeraError(f"{dst}: output must not be the input directory or inside it")
    per_file: dict[str, list[_Part]] = {}
    for part in _parts(ck, layout, p):
        per_file.setdefault(part.src.file.name, []).append(part)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        shards: dict[str, list[Slot]] = {}
        for fname, parts in per_file.items():
            slots = [Slot(x.out, x.src.dtype, x.shape) for x in parts]
            out = ShardFile(tmp / fname, slots)
            try:
                for x in parts:
                    _write(out, x)
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
