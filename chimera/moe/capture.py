"""Routing capture: which routed experts every token chose, per MoE layer, aggregated per prompt.

Forward hooks on the routers store `top_k_index` / `top_k_weights` ([B*T, k]) of each forward pass; the
batch is right-padded with an attention mask, and the per-prompt statistics are built with one `bincount`
per layer over `prompt_id * E + expert` (no per-token Python loop). Padding tokens are excluded; tokens are
split into prompt tokens and response tokens when responses are given (teacher-forced, one forward pass).

    routes = route_texts(model, tokenizer, prompts, responses=None)
    routes.freq("prompt")    # [P, n_moe_layers, E]: share of the prompt's tokens that chose each expert

With `norms=True` the recorder also hooks each MoE block's experts module and records, for every token and
chosen slot j, the L2 norm of that expert's own output ||E_j(x)||_2 (the experts module is called once more per
slot with weight 1, so the model's own expert implementation computes it). Aggregated per expert as
sum over routed tokens of g_j(x) * ||E_j(x)||_2 (g = the routing weight the expert was combined with), it gives
REAP's saliency (arXiv 2510.13999): S_e = mean over the tokens routed to e of g_e(x) * ||E_e(x)||_2.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chimera.errors import ChimeraError
from chimera.moe.routers import moe_layers

KINDS = ("prompt", "response")


class RoutingRecorder(contextlib.AbstractContextManager):
    """Context manager: while active, every router forward appends `(top_k_index, top_k_weights)` per MoE layer.

    Hooks are registered last, so they see the output of any live switch that is already active.
    """

    def __init__(self, model: nn.Module, norms: bool = False):
        self.model = model
        self.layers = moe_layers(model)
        self.layer_ids = list(self.layers)
        self.num_experts = next(iter(self.layers.values())).adapter.num_experts
        self.records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {L: [] for L in self.layer_ids}
        self.norms = norms
        self.norm_records: dict[int, list[torch.Tensor]] = {L: [] for L in self.layer_ids}
        self._handles = []

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            self.records[layer].append((output[2].detach(), output[1].detach().float()))
        return hook

    def _norm_hook(self, layer: int):
        def hook(module, inputs, output):
            hidden, index = inputs[0], inputs[1]                       # [N, H], [N, k]
            ones = torch.ones_like(index[:, :1], dtype=hidden.dtype)   # [N, 1]
            per_slot = [module.forward(hidden, index[:, j:j + 1], ones).float().norm(dim=-1)
                        for j in range(index.shape[1])]                 # k x [N]
            self.norm_records[layer].append(torch.stack(per_slot, dim=1).detach())  # [N, k]
        return hook

    def experts_module(self, layer: int) -> nn.Module:
        """The experts module beside the router of MoE layer `layer` (called with (hidden, index, weights))."""
        parent = self.model.get_submodule(self.layers[layer].name.rsplit(".", 1)[0])
        experts = getattr(parent, "experts", None)
        if not isinstance(experts, nn.Module):
            raise ChimeraError(f"layer {layer}: no experts module beside the router {self.layers[layer].name}")
        return experts

    def __enter__(self):
        for L, info in self.layers.items():
            self._handles.append(info.adapter.module.register_forward_hook(self._hook(L)))
            if self.norms:
                self._handles.append(self.experts_module(L).register_forward_hook(self._norm_hook(L)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Concatenate and clear what was recorded: {layer: (index [N, k], weights [N, k])}."""
        out = {}
        for L, recs in self.records.items():
            if recs:
                out[L] = (torch.cat([r[0] for r in recs]), torch.cat([r[1] for r in recs]))
            self.records[L] = []
        return out

    def take_norms(self) -> dict[int, torch.Tensor]:
        """Concatenate and clear the expert output norms: {layer: [N, k]} aligned with `take()`'s rows."""
        out = {L: torch.cat(recs) for L, recs in self.norm_records.items() if recs}
        self.norm_records = {L: [] for L in self.layer_ids}
        return out


def aggregate(index: torch.Tensor, weights: torch.Tensor, group: torch.Tensor, n_groups: int,
              num_experts: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group selection counts and summed weights: ([G, E], [G, E]) from index/weights [N, k] and group [N]
    (group id per token, -1 = excluded). One bincount, no Python loop over tokens. `exact` keeps the sums in
    float64."""
    k = index.shape[1]
    g = group.reshape(-1, 1).expand(-1, k)
    valid = g >= 0
    flat = (g * num_experts + index)[valid]
    w = weights[valid].double()
    counts = torch.bincount(flat, minlength=n_groups * num_experts).view(n_groups, num_experts)
    wsum = torch.bincount(flat, weights=w, minlength=n_groups * num_experts).view(n_groups, num_experts)
    return counts.float(), (wsum if exact else wsum.float())


@dataclass
class Routes:
    """Routing statistics for P prompts over the MoE layers `layers` (decoder indices) and E experts."""

    layers: list[int]
    num_experts: int
    counts: dict[str, np.ndarray] = field(default_factory=dict)   # kind -> [P, nL, E] selection counts
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [P, nL, E] summed routing weight
    tokens: dict[str, np.ndarray] = field(default_factory=dict)   # kind -> [P] token counts
    texts: list[str] = field(default_factory=list)
    reap: dict[str, np.ndarray] = field(default_factory=dict)     # kind -> [P, nL, E] sum of g * ||E(x)|| (norms=True)

    @property
    def n_prompts(self) -> int:
        return int(next(iter(self.tokens.values())).shape[0]) if self.tokens else 0

    def stat(self, kind: str = "prompt", stat: str = "count") -> np.ndarray:
        """Per-prompt map [P, nL, E] normalised by the prompt's token count: `count` = share of tokens that
        chose the expert (each layer sums to top_k), `weight` = mean routing weight per token."""
        if kind not in self.counts:
            raise ChimeraError(f"no {kind}-token routing statistics (have: {', '.join(self.counts) or 'none'})")
        if stat not in ("count", "weight"):
            raise ChimeraError(f"unknown statistic '{stat}' (use count or weight)")
        raw = self.counts[kind] if stat == "count" else self.weights[kind]
        n = np.maximum(self.tokens[kind], 1).astype(np.float64)
        return (raw / n[:, None, None]).astype(np.float32)

    def saliency(self, by: str = "reap", kinds: Sequence[str] | None = None) -> np.ndarray:
        """Per-expert score over the whole prompt set [nL, E]: `frequency` = share of tokens that chose the
        expert; `reap` = mean over the tokens routed to it of g * ||E(x)||_2 (0 for an expert never chosen)."""
        kinds = list(kinds or self.counts)
        counts = sum(self.counts[k].astype(np.float64).sum(0) for k in kinds)
        if by == "frequency":
            return counts / max(1, sum(int(self.tokens[k].sum()) for k in kinds))
        if by != "reap":
            raise ChimeraError(f"unknown saliency {by!r} (reap or frequency)")
        if not all(k in self.reap for k in kinds):
            raise ChimeraError("no expert output norms recorded: capture with norms=True (REAP)")
        total = sum(self.reap[k].astype(np.float64).sum(0) for k in kinds)
        return np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)

    def save(self, path: str | Path) -> None:
        arrays = {"layers": np.asarray(self.layers, dtype=np.int64),
                  "num_experts": np.asarray(self.num_experts, dtype=np.int64),
                  "texts": np.asarray(self.texts, dtype=np.str_)}
        for kind in self.counts:
            arrays[f"{kind}_counts"] = self.counts[kind]
            arrays[f"{kind}_weights"] = self.weights[kind]
            arrays[f"{kind}_tokens"] = self.tokens[kind]
            if kind in self.reap:
                arrays[f"{kind}_reap"] = self.reap[kind]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Routes":
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ChimeraError(f"{path}: not a routes .npz ({e.__class__.__name__})") from None
        r = cls(layers=[int(x) for x in z["layers"]], num_experts=int(z["num_experts"]),
                texts=[str(t) for t in z["texts"]] if "texts" in z else [])
        for kind in KINDS:
            if f"{kind}_counts" in z:
                r.counts[kind] = z[f"{kind}_counts"]
                r.weights[kind] = z[f"{kind}_weights"]
                r.tokens[kind] = z[f"{kind}_tokens"]
                if f"{kind}_reap" in z:
                    r.reap[kind] = z[f"{kind}_reap"]
        return r

    def subset(self, idx: Sequence[int]) -> "Routes":
        idx = np.asarray(list(idx), dtype=np.int64)
        r = Routes(self.layers, self.num_experts, texts=[self.texts[i] for i in idx] if self.texts else [])
        for kind in self.counts:
            r.counts[kind] = self.counts[kind][idx]
            r.weights[kind] = self.weights[kind][idx]
            r.tokens[kind] = self.tokens[kind][idx]
            if kind in self.reap:
                r.reap[kind] = self.reap[kind][idx]
        return r


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def record_routes(model: nn.Module, sequences: Sequence[Sequence[int]], n_prompt_tokens: Sequence[int] | None = None,
                  batch_size: int = 8, pad_id: int = 0, on_batch: Callable[[int], None] | None = None,
                  norms: bool = False) -> Routes:
    """Route token-id sequences through `model` (right-padded batches, one forward pass each) and aggregate
    per sequence. `n_prompt_tokens[i]` splits sequence i into prompt tokens and response tokens; without it,
    every token is a prompt token. `on_batch(k)` is called after each batch of k sequences (progress).
    `norms=True` also sums g * ||E(x)||_2 per expert (`Routes.reap`)."""
    if len(sequences) == 0:
        raise ChimeraError("no prompts to route")
    rec = RoutingRecorder(model, norms=norms)
    nL, E = len(rec.layer_ids), rec.num_experts
    P = len(sequences)
    kinds = ["prompt"] + (["response"] if n_prompt_tokens is not None else [])
    counts = {k: torch.zeros(P, nL, E) for k in kinds}
    wsums = {k: torch.zeros(P, nL, E) for k in kinds}
    reap = {k: torch.zeros(P, nL, E, dtype=torch.float64) for k in kinds} if norms else {}
    ntok = {k: torch.zeros(P, dtype=torch.int64) for k in kinds}
    device = _device(model)
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ChimeraError(f"prompt {lengths.index(0)} has no tokens")
    order = sorted(range(P), key=lambda i: -lengths[i])  # similar lengths together: less padding
    with rec:
        for start in range(0, P, batch_size):
            ids_b = order[start:start + batch_size]
            T = max(lengths[i] for i in ids_b)
            input_ids = torch.full((len(ids_b), T), pad_id, dtype=torch.long)
            kind = torch.full((len(ids_b), T), -1, dtype=torch.long)  # -1 pad, 0 prompt, 1 response
            for b, i in enumerate(ids_b):
                seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
                input_ids[b, :len(seq)] = seq
                cut = len(seq) if n_prompt_tokens is None else min(int(n_prompt_tokens[i]), len(seq))
                kind[b, :cut] = 0
                kind[b, cut:len(seq)] = 1
            mask = (kind >= 0).long()
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            got = rec.take()
            got_norms = rec.take_norms() if norms else {}
            rows = torch.as_tensor(ids_b, dtype=torch.long)
            for kname, kval in (("prompt", 0), ("response", 1)):
                if kname not in counts:
                    continue
                group = torch.where(kind == kval, torch.arange(len(ids_b)).unsqueeze(1), torch.full_like(kind, -1))
                ntok[kname][rows] = (kind == kval).sum(dim=1)
                for j, L in enumerate(rec.layer_ids):
                    index, weights = got[L]
                    c, w = aggregate(index.cpu(), weights.cpu(), group.reshape(-1), len(ids_b), E)
                    counts[kname][rows, j] = c
                    wsums[kname][rows, j] = w
                    if norms:
                        gn = weights.cpu().double() * got_norms[L].cpu().double()   # [N, k]: g * ||E(x)||
                        reap[kname][rows, j] = aggregate(index.cpu(), gn, group.reshape(-1), len(ids_b), E,
                                                         exact=True)[1]
            if on_batch:
                on_batch(len(ids_b))
    r = Routes(layers=rec.layer_ids, num_experts=E)
    for k in kinds:
        r.counts[k] = counts[k].numpy()
        r.weights[k] = wsums[k].numpy()
        r.tokens[k] = ntok[k].numpy()
        if norms:
            r.reap[k] = reap[k].numpy()
    return r


def default_format(tokenizer) -> Callable[[str], str]:
    """How a prompt is shown to the model: the harness's formatting when the eval harness offers one, else
    the tokenizer's chat template (generation prompt added) when it has one, else the raw text."""
    try:
        from chimera.eval import harness  # type: ignore

        fmt = getattr(harness, "format_prompt", None)
        if callable(fmt):
            return lambda p: fmt(tokenizer, p) if _takes_two(fmt) else fmt(p)
    except ImportError:
        pass
    if getattr(tokenizer, "chat_template", None):
        return lambda p: tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True)
    return lambda p: p


def _takes_two(fn) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def route_texts(model: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str] | None = None,
                batch_size: int = 8, format: Callable[[str], str] | None = None,
                on_batch: Callable[[int], None] | None = None, norms: bool = False) -> Routes:
    """Tokenize (formatted) prompts, optionally followed by their responses, and record routing statistics."""
    if len(prompts) == 0:
        raise ChimeraError("no prompts to route")
    fmt = format or default_format(tokenizer)
    texts = [fmt(p) for p in prompts]
    bos = getattr(tokenizer, "bos_token", None)
    seqs, cuts = [], []
    for i, t in enumerate(texts):
        # the tokenizer's own special tokens, unless the formatted text already starts with BOS
        ids = _encode(tokenizer, t, special=not (bos and t.startswith(bos)))
        cuts.append(len(ids))
        if responses is not None:
            ids = ids + _encode(tokenizer, responses[i], special=False)
        seqs.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    r = record_routes(model, seqs, cuts if responses is not None else None, batch_size=batch_size, pad_id=pad,
                      on_batch=on_batch, norms=norms)
    r.texts = list(prompts)
    return r
