"""The evaluation harness: load a model, generate for a suite's prompts, score, aggregate with CIs.

Works on any causal LM transformers loads (the prompt goes through the tokenizer's chat template when
it has one, else as plain text), on in-memory models (edited weights, routing hooks attached), and on
an OpenAI-compatible server (`Endpoint`). Greedy by default; `temperature > 0` samples with `seed`.

    model, tok = load("tiny-r1")                       # a zoo name or a directory
    report = evaluate(model, tok, "all", n=100)        # {suite: {"metrics": ..., "splits": ...}}
    texts = generate(model, tok, ["What is 2 + 2 ?"], max_new_tokens=64)
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from chimera.errors import ChimeraError
from chimera.eval import scorers, stats, suites
from chimera.eval.endpoint import Endpoint
from chimera.resolve import resolve_model

DEFAULT_MAX_NEW_TOKENS = 256


def load(model_path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a directory or bundled name (`chimera.resolve`), offline. FP8 (DeepSeek block)
    checkpoints are dequantized exactly by chimera first, since transformers can't run them on CPU."""
    path = resolve_model(model_path)  # a wrong name fails before torch and transformers load
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from chimera.checkpoint.files import Checkpoint

    hf_logging.disable_progress_bar()
    Checkpoint(path).tensors  # every shard header read and checked: a broken file is a one-line error naming it
    cfg = json.loads((path / "config.json").read_text())
    tmp = None
    try:
        if cfg.get("quantization_config", {}).get("quant_method") == "fp8":
            from chimera.merge.convert import convert

            tmp = Path(tempfile.mkdtemp(prefix="chimera-eval-"))
            convert(path, tmp / "bf16", dtype="bfloat16")
            path_w = tmp / "bf16"
        else:
            path_w = path
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path_w), dtype=getattr(torch, dtype))
        except (OSError, ValueError, SafetensorError) as e:
            raise ChimeraError(f"{path}: cannot load ({str(e).splitlines()[0][:160]})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    return model, tok


def format_prompt(tok, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt


def generate_counted(model, tok, prompts: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     batch_size: int = 32, temperature: float = 0.0, seed: int = 0,
                     chat: bool = True, on_batch: Callable[[int], None] | None = None
                     ) -> tuple[list[str], list[int | None]]:
    """(texts, generated token counts): batched, left-padded, stopped at end of sequence. `on_batch(k)`
    is called after each batch of k prompts (progress)."""
    if isinstance(model, Endpoint):
        out = model.generate(prompts, max_new_tokens, temperature, seed if temperature > 0 else None)
        if on_batch:
            on_batch(len(prompts))
        return out
    import torch

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = [format_prompt(tok, p) if chat else p for p in prompts]
    templated = chat and bool(getattr(tok, "chat_template", None))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out_text: list[str] = [""] * len(texts)
    out_n: list[int | None] = [0] * len(texts)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if temperature > 0:
        torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=not templated)
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=list(eos_ids) or None)
        kw.update(dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False))
        with torch.no_grad():
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        new = gen[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            n = next((k for k, t in enumerate(ids) if t in eos_ids), None)
            ids = ids[:n] if n is not None else ids
            while ids and ids[-1] == tok.pad_token_id:
                ids.pop()
            out_n[i] = len(ids)
            out_text[i] = tok.decode(ids, skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(idx))
    return out_text, out_n


def generate(model, tok, prompts: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 32,
             temperature: float = 0.0, seed: int = 0, chat: bool = True,
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Batched generation; returns one decoded response per prompt."""
    return generate_counted(model, tok, prompts, max_new_tokens, batch_size, temperature, seed, chat, on_batch)[0]


def score(items: list[dict], texts: list[str], counts: list[int | None], seed: int = 0) -> dict:
    """Metrics with 95% CIs over one group of items."""
    acc = [r for r in (scorers.accuracy(t, it) for t, it in zip(texts, items)) if r is not None]
    lang = [r for r in (scorers.language_match(t, it) for t, it in zip(texts, items)) if r is not None]
    tokens = [scorers.output_tokens(t, it, n) for t, it, n in zip(texts, items, counts)]
    m = {
        "accuracy": stats.rate(acc),
        "think_rate": stats.rate([scorers.think(t) for t in texts]),
        "refusal_rate": stats.rate([scorers.refusal(t) for t in texts]),
        "reasoning_language": stats.rate(lang),
        "output_tokens_mean": stats.summary(tokens, stats.mean, seed),
        "output_tokens_p90": stats.summary(tokens, lambda xs: stats.quantile(xs, 0.9), seed),
    }
    return {k: v for k, v in m.items() if v["n"]}


def planned(suite: str | list[str], n: int | None) -> dict[str, list[dict]]:
    """{suite name: the items `evaluate` will score} (loads and samples every suite: call it first to
    fail fast on a bad suite or --n)."""
    return {name: suites.sample(suites.load(name), n) for name in suites.resolve(suite)}


def evaluate(model, tokenizer, suite: str | list[str] = "all", n: int | None = None, *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 32, temperature: float = 0.0,
             seed: int = 0, chat: bool = True, keep_responses: bool = False,
             progress: Callable[[str, int, int], None] | None = None) -> dict:
    """{suite: {"n", "of", "metrics", "splits": {split: metrics}, "sample", "examples" | "responses"}} for a
    loaded model (or an `Endpoint`, with tokenizer None).

    With `n`, each split is sampled in proportion to its size with a floor (`suites.sample`); `sample`
    says how many of each split were scored. The whole-suite `metrics` leave out what means nothing across
    splits: the refusal rate of a suite mixing sensitive and benign prompts (read it per split).
    `progress(suite, done, total)` is called after each generation batch.
    """
    report = {}
    for name, items in planned(suite, n).items():
        full = suites.load(name)
        done = 0

        def tick(k: int, name=name, total=len(items)) -> None:
            nonlocal done
            done += k
            if progress:
                progress(name, done, total)

        texts, counts = generate_counted(model, tokenizer, [it["prompt"] for it in items], max_new_tokens,
                                         batch_size, temperature, seed, chat, on_batch=tick)
        metrics = score(items, texts, counts, seed)
        if len({bool(it.get("sensitive")) for it in items}) > 1:
            metrics.pop("refusal_rate", None)  # sensitive and benign prompts: only per split
        entry = {"n": len(items), "of": len(full), "metrics": metrics, "splits": {}, "sample": {}}
        for split in sorted({it["split"] for it in items if "split" in it}):
            sel = [i for i, it in enumerate(items) if it.get("split") == split]
            entry["splits"][split] = score([items[i] for i in sel], [texts[i] for i in sel],
                                           [counts[i] for i in sel], seed)
            entry["sample"][split] = {"n": len(sel), "of": sum(1 for it in full if it.get("split") == split)}
        rows = [{"prompt": it["prompt"], "response": t, "tokens": c} for it, t, c in zip(items, texts, counts)]
        entry["responses" if keep_responses else "examples"] = rows if keep_responses else rows[:3]
        report[Path(name).stem if name.endswith(".jsonl") else name] = entry
    return report
