"""fTRI (functional Token Resonance Imaging): which routed experts carry a behaviour.

Per prompt, each (MoE layer, expert) gets the share of the prompt's tokens that chose it (`count`) or its
mean routing weight per token (`weight`); prompts are grouped into a target class and a contrast class
(two prompt sets, or one set whose generated responses a scorer labels); the differential map is
mean(target) - mean(contrast); experts are ranked over the whole model, not per layer.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chimera.errors import ChimeraError
from chimera.moe.capture import Routes

PROMPT_KEYS = ("prompt", "text", "question", "input", "instruction", "query")


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a JSONL file: one JSON object per line with a `prompt` (or text/question/input) field, or a
    JSON string per line. Blank lines are skipped; an empty file is an error."""
    from chimera.eval.suites import read_jsonl

    p = Path(path)
    out = []
    for n, obj in read_jsonl(p, "prompt file"):
        if isinstance(obj, str):
            out.append(obj)
            continue
        if isinstance(obj, dict):
            for k in PROMPT_KEYS:
                if isinstance(obj.get(k), str):
                    out.append(obj[k])
                    break
            else:
                raise ChimeraError(f"{p}:{n}: no prompt field (one of {', '.join(PROMPT_KEYS)})")
            continue
        raise ChimeraError(f"{p}:{n}: expected a JSON object or string")
    if not out:
        raise ChimeraError(f"{p}: no prompts (empty prompt file)")
    return out


@dataclass
class FtriResult:
    layers: list[int]                 # decoder layer index of each row
    num_experts: int
    target_mean: np.ndarray           # [nL, E]
    contrast_mean: np.ndarray         # [nL, E]
    stat: str = "count"
    tokens: str = "prompt"
    n_target: int = 0
    n_contrast: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def diff(self) -> np.ndarray:
        return self.target_mean - self.contrast_mean

    def ranking(self) -> list[tuple[int, int, float]]:
        """All experts `(layer, expert, diff)`, largest differential first (ties: lower layer, lower expert)."""
        d = self.diff.astype(np.float64)
        flat = d.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))  # stable: by -diff, then flat position
        E = self.num_experts
        return [(self.layers[i // E], int(i % E), float(flat[i])) for i in order]

    def top(self, k: int) -> list[tuple[int, int]]:
        return [(L, e) for L, e, _ in self.ranking()[:k]]

    def to_dict(self, top: int = 10) -> dict:
        E = self.num_experts
        row = {L: j for j, L in enumerate(self.layers)}
        rank = self.ranking()

        def entry(i, L, e, d):
            j = row[L]
            return {"rank": i + 1, "layer": L, "expert": e, "diff": d,
                    "target": float(self.target_mean[j, e]), "contrast": float(self.contrast_mean[j, e])}

        return {
            "format": "chimera-ftri/1",
            "stat": self.stat, "tokens": self.tokens,
            "n_target": self.n_target, "n_contrast": self.n_contrast,
            "layers": self.layers, "num_experts": E,
            **self.meta,
            "top": [entry(i, *r) for i, r in enumerate(rank[:top])],
            "ranking": [[L, e, round(d, 8)] for L, e, d in rank],
            "diff": np.round(self.diff, 8).tolist(),
        }

    def write_json(self, path: str | os.PathLike, top: int = 10) -> None:
        _write_text(Path(path), json.dumps(self.to_dict(top), indent=1) + "\n")

    def write_csv(self, path: str | os.PathLike) -> None:
        row = {L: j for j, L in enumerate(self.layers)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["rank", "layer", "expert", "diff", "target_mean", "contrast_mean"])
            for i, (L, e, d) in enumerate(self.ranking()):
                w.writerow([i + 1, L, e, f"{d:.8g}", f"{self.target_mean[row[L], e]:.8g}",
                            f"{self.contrast_mean[row[L], e]:.8g}"])

    def plot(self, path: str | os.PathLike, top: int = 10, title: str | None = None) -> None:
        plot_heatmap(self, path, top=top, title=title)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def ftri_maps(target: np.ndarray, contrast: np.ndarray, layers: Sequence[int], stat: str = "count",
              tokens: str = "prompt", meta: dict | None = None) -> FtriResult:
    """fTRI from per-prompt maps target [Pt, nL, E] and contrast [Pc, nL, E]."""
    if target.shape[0] == 0:
        raise ChimeraError("fTRI: the target class has no prompts")
    if contrast.shape[0] == 0:
        raise ChimeraError("fTRI: the contrast class has no prompts")
    if target.shape[1:] != contrast.shape[1:]:
        raise ChimeraError(f"fTRI: target maps {target.shape[1:]} and contrast maps {contrast.shape[1:]} differ")
    return FtriResult(layers=list(layers), num_experts=int(target.shape[2]),
                      target_mean=target.astype(np.float64).mean(0), contrast_mean=contrast.astype(np.float64).mean(0),
                      stat=stat, tokens=tokens, n_target=int(target.shape[0]), n_contrast=int(contrast.shape[0]),
                      meta=dict(meta or {}))


def ftri_routes(target: Routes, contrast: Routes, stat: str = "count", tokens: str = "prompt",
                meta: dict | None = None) -> FtriResult:
    if target.layers != contrast.layers or target.num_experts != contrast.num_experts:
        raise ChimeraError("fTRI: target and contrast routes come from different models")
    return ftri_maps(target.stat(tokens, stat), contrast.stat(tokens, stat), target.layers, stat, tokens, meta)


def ftri_labelled(routes: Routes, labels: Sequence, target_label, stat: str = "count", tokens: str = "response",
                  meta: dict | None = None) -> FtriResult:
    """fTRI from one routed prompt set whose responses were labelled: target = label == target_label."""
    labels = list(labels)
    if len(labels) != routes.n_prompts:
        raise ChimeraError(f"fTRI: {len(labels)} labels for {routes.n_prompts} prompts")
    t = [i for i, lab in enumerate(labels) if lab == target_label]
    c = [i for i, lab in enumerate(labels) if lab != target_label]
    counts = {str(k): labels.count(k) for k in dict.fromkeys(labels)}
    if not t:
        raise ChimeraError(f"fTRI: no response labelled {target_label!r} (labels: {counts})")
    if not c:
        raise ChimeraError(f"fTRI: every response is labelled {target_label!r}: no contrast class")
    m = routes.stat(tokens, stat)
    meta = {**(meta or {}), "labels": counts, "target_label": str(target_label)}
    return ftri_maps(m[t], m[c], routes.layers, stat, tokens, meta)


def plot_heatmap(result: FtriResult, path: str | os.PathLike, top: int = 10, title: str | None = None) -> None:
    """Heatmap of the differential map (layers x experts) with the top experts circled and numbered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result.diff
    nL, E = d.shape
    lim = float(np.abs(d).max()) or 1.0
    fig_w = min(18.0, 3.0 + 0.18 * E)
    fig_h = min(12.0, 1.8 + 0.35 * nL)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(d, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    row = {L: j for j, L in enumerate(result.layers)}
    for i, (L, e) in enumerate(result.top(top)):
        ax.scatter([e], [row[L]], s=120, facecolors="none", edgecolors="black", linewidths=1.5)
        ax.annotate(str(i + 1), (e, row[L]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_yticks(range(nL))
    ax.set_yticklabels([str(L) for L in result.layers], fontsize=7)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("decoder layer")
    label = "token share" if result.stat == "count" else "mean routing weight"
    fig.colorbar(im, ax=ax, label=f"diff in {label} (target - contrast)")
    ax.set_title(title or f"fTRI ({result.tokens} tokens, {result.n_target} target vs {result.n_contrast} contrast); "
                 f"top {top} circled", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ generation and labelling
def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8,
                       on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy responses through the eval harness (the chat template when the tokenizer has one)."""
    from chimera.eval import harness

    return harness.generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                            on_batch=on_batch)


def resolve_scorer(name: str) -> Callable:
    """A response scorer by name from `chimera.eval.scorers` (a `SCORERS` dict, a `get`/`get_scorer`
    function, or a module attribute). A scorer maps (response) or (response, item) to a label."""
    try:
        from chimera.eval import scorers  # type: ignore
    except ImportError:
        raise ChimeraError("--label-by-response needs chimera.eval.scorers, which is not installed") from None
    for getter in ("get_scorer", "get"):
        fn = getattr(scorers, getter, None)
        if callable(fn):
            try:
                s = fn(name)
            except (KeyError, ValueError, LookupError):
                s = None
            if s is not None:
                return s
    table = getattr(scorers, "SCORERS", None)
    if isinstance(table, dict) and name in table:
        return table[name]
    s = getattr(scorers, name, None)
    if callable(s):
        return s
    known = sorted(table) if isinstance(table, dict) else []
    raise ChimeraError(f"unknown scorer '{name}'" + (f" (known: {', '.join(known)})" if known else ""))


def pick_target_label(labels: Sequence, wanted: str | None):
    """The target class among the labels a scorer gave: `wanted` (case-insensitive), or the scorer's positive
    label (True / refused / refusal / yes / 1)."""
    present = list(dict.fromkeys(labels))
    if wanted is None:
        for cand in (True, "refused", "refusal", "yes", 1):
            if cand in present:
                return cand
        raise ChimeraError(f"--target-label needed: the scorer gave labels {present}")
    for lab in present:
        if str(lab).lower() == wanted.lower():
            return lab
    raise ChimeraError(f"no response labelled {wanted!r} (labels: {present})")


def label_responses(scorer: Callable, prompts: Sequence[str], responses: Sequence[str]) -> list:
    """Label each response with a scorer of the eval harness's convention: `scorer(response)` or
    `scorer(response, item)` with item = {"prompt": prompt}. A dict result gives its `label`/`value`."""
    import inspect

    try:
        two = len([p for p in inspect.signature(scorer).parameters.values()
                   if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2
    except (TypeError, ValueError):  # pragma: no cover
        two = False
    labels = []
    for p, r in zip(prompts, responses):
        lab = scorer(r, {"prompt": p}) if two else scorer(r)
        if isinstance(lab, dict):  # a scorer that returns a record: take its label
            lab = lab.get("label", lab.get("value"))
        labels.append(lab)
    return labels
