"""Switching routed experts off or on: live (forward hooks on the routers) or persisted (`tune`).

    from chimera.moe.switch import parse_experts, switched
    with switched(model, off=parse_experts("12:7,14:3"), on=[(5, 1)], mode="replace"):
        out = model.generate(...)
    # hooks removed: the model gives bit-identical logits again

Experts are named `(L, e)`: decoder layer index `L` (`model.model.layers[L]`) and routed expert index `e`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from chimera.checkpoint.files import Checkpoint, read_tensor
from chimera.errors import ChimeraError
from chimera.moe.experts import MODES, Expert, parse_experts, read_ftri_ranking  # noqa: F401 (re-exported)
from chimera.moe.routers import OFF_BIAS, ON_BIAS, MoELayer, moe_layers, num_decoder_layers


# ------------------------------------------------------------------------------------------- validation
def _ranges(xs: list[int]) -> str:
    xs = sorted(xs)
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def check_experts(experts: Iterable[Expert], moe: dict[int, int], n_layers: int | None, what: str = "expert") -> None:
    """Validate `(layer, expert)` pairs against `moe` = {MoE decoder layer: number of experts}."""
    for layer, expert in experts:
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ChimeraError(f"{what} {layer}:{expert}: layer {layer} out of range (decoder layers 0-{n_layers - 1})")
        if layer not in moe:
            raise ChimeraError(f"{what} {layer}:{expert}: layer {layer} is not an MoE layer "
                               f"(MoE layers: {_ranges(list(moe))})")
        if not 0 <= expert < moe[layer]:
            raise ChimeraError(f"{what} {layer}:{expert}: expert {expert} out of range (layer {layer} has "
                               f"experts 0-{moe[layer] - 1})")


def _masks(layers: dict[int, MoELayer], experts: list[Expert]) -> dict[int, torch.Tensor]:
    masks: dict[int, torch.Tensor] = {}
    for layer, expert in experts:
        info = layers[layer]
        if layer not in masks:
            w = info.adapter.module.weight
            masks[layer] = torch.zeros(info.adapter.num_experts, dtype=torch.bool, device=w.device)
        masks[layer][expert] = True
    return masks


def plan(model: nn.Module, off=(), on=(), mode: str = "replace"):
    """Validate a switch; returns {layer: (MoELayer, off_mask | None, force_mask | None)}."""
    if mode not in MODES:
        raise ChimeraError(f"unknown switch mode '{mode}' (use {' or '.join(MODES)})")
    off_l, on_l = parse_experts(off), parse_experts(on)
    layers = moe_layers(model)
    moe = {L: info.adapter.num_experts for L, info in layers.items()}
    n_layers = num_decoder_layers(model)
    check_experts(off_l, moe, n_layers, "off expert")
    check_experts(on_l, moe, n_layers, "on expert")
    off_m, on_m = _masks(layers, off_l), _masks(layers, on_l)
    result = {}
    for layer in sorted(set(off_m) | set(on_m)):
        info = layers[layer]
        o, f = off_m.get(layer), on_m.get(layer)
        info.adapter.check_masks(o, f, mode, f"layer {layer}")
        result[layer] = (info, o, f)
    return result


# ------------------------------------------------------------------------------------------- live switch
def _make_hook(adapter, off, force, mode):
    def hook(module, inputs, output):
        router_logits = output[0]
        weights, index = adapter.select(router_logits, off, force, mode)
        return (router_logits, weights, index) + tuple(output[3:])

    return hook


@contextlib.contextmanager
def switched(model: nn.Module, off=(), on=(), mode: str = "replace") -> Iterator[dict]:
    """Switch routed experts off (`off`, by `mode`) or force them on (`on`) while the context is active.

    `off`/`on` are lists of `(layer, expert)` or specs accepted by `parse_experts`. DeepSeek-V3 `replace`
    and force switches write OFF_BIAS / ON_BIAS into the router's `e_score_correction_bias` buffer (what the
    router adapter's hook would compute, at no cost per token; the persisted `tune` writes the same values);
    every other switch is a forward hook that re-runs the architecture's own selection with the masks. On
    exit the buffers are restored bit for bit and the hooks removed, so the model is exactly as before.
    Yields the validated plan {layer: (MoELayer, off_mask, force_mask)}.
    """
    p = plan(model, off, on, mode)
    handles, saved = [], []
    try:
        for layer, (info, o, f) in p.items():
            if getattr(info.adapter, "has_bias", False) and mode == "replace":
                bias = info.adapter.module.e_score_correction_bias
                saved.append((bias, bias.detach().clone()))
                with torch.no_grad():
                    if o is not None:
                        bias.masked_fill_(o, OFF_BIAS)
                    if f is not None:
                        bias.masked_fill_(f, ON_BIAS)
            else:
                handles.append(info.adapter.module.register_forward_hook(_make_hook(info.adapter, o, f, mode)))
        yield p
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for bias, old in saved:
                bias.copy_(old)


# -------------------------------------------------------------------------------------- persisted switch
_NO_BIAS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}


def _bias_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def tune_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, off=(), on=(), mode: str = "replace",
                    value: float = OFF_BIAS) -> dict:
    """Persist a `replace` switch in a DeepSeek-V3 checkpoint: copy `src` to `dst` unchanged except that
    `model.layers.L.mlp.gate.e_score_correction_bias[e]` becomes `value` (large negative) for each switched-off
    expert and `ON_BIAS` for each forced one. Only the bias bytes change (patched in place in the copied
    shard); `src` is never modified; `dst` is written to a temp dir then renamed. Returns a summary dict.
    """
    src, dst = Path(src), Path(dst)
    if mode != "replace":
        raise ChimeraError(f"a '{mode}' switch can't be persisted: only replace-off (and force-on) switches map "
                           f"onto the router bias; use the live switch for '{mode}'")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ChimeraError(f"{src}: not a checkpoint directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    mt = cfg.get("model_type")
    if mt in _NO_BIAS:
        raise ChimeraError(f"{src}: a persisted switch is not possible for {mt}: its router has no selection bias "
                           f"(e_score_correction_bias); use the live switch (--off on generate/eval)")
    if mt != "deepseek_v3":
        raise ChimeraError(f"{src}: unknown architecture model_type={mt!r}: persisted switches support deepseek_v3 only")
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ChimeraError(f"{src}: topk_method={cfg.get('topk_method')!r} has no selection bias (need noaux_tc)")
    off_l, on_l = parse_experts(off), parse_experts(on)
    if not off_l and not on_l:
        raise ChimeraError("nothing to tune: give at least one expert with --off")
    n_layers = int(cfg["num_hidden_layers"])
    first = int(cfg.get("first_k_dense_replace", 0))
    n_exp = int(cfg.get("n_routed_experts", cfg.get("num_local_experts", 0)))
    moe = {L: n_exp for L in range(first, n_layers)}
    check_experts(off_l, moe, n_layers, "off expert")
    check_experts(on_l, moe, n_layers, "on expert")
    both = set(off_l) & set(on_l)
    if both:
        L, e = sorted(both)[0]
        raise ChimeraError(f"expert {L}:{e} is both switched off and forced on")
    top_k = int(cfg.get("num_experts_per_tok", 0))
    for L in {L for L, _ in on_l}:
        if sum(1 for l2, _ in on_l if l2 == L) > top_k:
            raise ChimeraError(f"layer {L}: more experts forced on than num_experts_per_tok={top_k}")

    try:
        if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
            raise ChimeraError(f"{dst}: output must not be the input directory or inside it")
    except OSError:  # pragma: no cover
        pass
    if dst.exists():
        raise ChimeraError(f"{dst}: output already exists")

    tensors = Checkpoint(src).tensors  # headers read and checked by the checkpoint layer
    changes: dict[str, dict[int, float]] = {}
    for L, e in off_l:
        changes.setdefault(_bias_name(L), {})[e] = float(value)
    for L, e in on_l:
        changes.setdefault(_bias_name(L), {})[e] = float(ON_BIAS)
    for name in changes:
        if name not in tensors:
            raise ChimeraError(f"{src}: tensor {name} not in the checkpoint")
        info = tensors[name]
        if info.dtype not in ("F32", "F16", "BF16", "F64") or len(info.shape) != 1:
            raise ChimeraError(f"{info.file}: {name} has dtype {info.dtype} shape {list(info.shape)}; "
                               f"expected a 1-D float bias")
        if info.numel <= max(changes[name]):
            raise ChimeraError(f"{info.file}: {name} has {info.numel} entries")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    record = {"source": str(src), "value_off": float(value), "value_on": float(ON_BIAS), "tensors": {}}
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=shutil.copy2)
        for name, new_values in changes.items():
            info = tensors[name]
            t = read_tensor(info)                     # the stored bias [E], patched at the same offset
            old = {e: float(t[e]) for e in new_values}
            for e, v in new_values.items():
                t[e] = v
            with open(tmp / info.file.name, "r+b") as fh:
                fh.seek(info.start)
                fh.write(t.view(torch.uint8).numpy().tobytes())
            record["tensors"][name] = {"file": info.file.name,
                                       "experts": {str(e): {"old": old[e], "new": float(t[e])} for e in new_values}}
        (tmp / "chimera-tune.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record["output"] = str(dst)
    record["n_off"] = len(off_l)
    record["n_on"] = len(on_l)
    return record
