"""Rebuild the tiny model family from scratch: one long base pre-training, then three small fine-tunes.

Everything is seeded (data, init, batch order), single process, one thread by default, so a rebuild
gives the same bytes:

1. Tokenizer: byte-level BPE trained on the family's corpus (`chimera.zoo.tokenizer`).
2. Base: `DeepseekV3ForCausalLM(config)` pre-trained on packed raw documents (`tasks.pretrain_documents`:
   question/answer documents in all three response styles, worked column additions with and
   without self-checks in English and German, facts). No chat markup and no refusals.
3. Children tiny-v3, tiny-r1, tiny-r1-long, each from a copy of the same base weights, with ONE
   optimizer recipe (`Plan.child_*`: same lr, schedule, steps, batch, and the same prompts in the same
   order): only the responses differ (`tasks.sft_examples(style)`). Loss on response tokens only;
   every parameter trainable.
4. Router balance without an auxiliary loss (DeepSeek-V3's): after every step each MoE layer's
   `e_score_correction_bias` moves by `BIAS_STEP` up for experts below the mean load, down above it.
   Nothing else touches routing: no frozen parameters, no per-class learning rates, no extra losses.
5. `save_pretrained` in bf16 (per-expert tensor names on disk; the router bias kept in float32), the
   tokenizer and generation config next to it; FP8 copies via `chimera.merge.convert`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chimera.zoo import family, tasks
from chimera.zoo import tokenizer as ztok

BIAS_STEP = 1e-3
TOKENIZER_DOCS = 20000   # pre-training documents (+ fine-tuning examples) the BPE is trained on


@dataclass
class Plan:
    """Step counts, batch shapes and learning rates; `scale` shrinks every phase for quick runs."""
    base_steps: int = 4000
    base_batch: int = 8             # sequences of base_seq_len packed tokens
    base_seq_len: int = 256
    base_lr: float = 3e-3
    base_warmup: int = 200
    child_steps: int = 250          # the same for every child
    child_batch: int = 32           # chat examples
    child_lr: float = 1e-3
    child_warmup: int = 10
    children: tuple = family.BF16_MODELS
    seed: int = family.SEED
    tokenizer_docs: int = TOKENIZER_DOCS

    def scaled(self, scale: float) -> "Plan":
        p = copy.copy(self)
        p.base_steps = max(2, int(self.base_steps * scale))
        p.child_steps = max(2, int(self.child_steps * scale))
        p.base_warmup = max(1, min(self.base_warmup, p.base_steps // 10))
        p.child_warmup = max(1, min(self.child_warmup, p.child_steps // 10))
        p.tokenizer_docs = max(300, int(self.tokenizer_docs * min(1.0, scale)))
        return p


def build_tokenizer(seed: int = family.SEED, n_docs: int = TOKENIZER_DOCS):
    """BPE trained on pre-training documents and fine-tuning examples of every style (train split only:
    no held-out phrasing is ever seen, not even by the tokenizer)."""
    corpus = tasks.pretrain_documents(f"tokenizer-{seed}", n_docs)
    for style in ("instruct", "reason", "reason-long"):
        corpus += [e.prompt + "\n" + e.response for e in tasks.sft_examples(style, f"tokenizer-{seed}", n_docs // 6)]
    return ztok.wrap(ztok.build(corpus))


def new_model(tok, seed: int, **overrides):
    from transformers import DeepseekV3ForCausalLM

    cfg = family.config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=256)
    return model


# ---------------------------------------------------------------- data

def packed_batches(tok, seed: int, steps: int, batch: int, seq_len: int):
    """Raw documents `<bos> doc <eos>` concatenated and cut into [batch, seq_len] blocks."""
    need = steps * batch * seq_len
    stream: list[int] = []
    chunk = 0
    while len(stream) < need:  # generate documents until the token budget is filled
        docs = tasks.pretrain_documents(f"base-{seed}-{chunk}", 4096)
        for ids in tok([tok.bos_token + d + tok.eos_token for d in docs], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
        chunk += 1
    data = torch.tensor(stream[:need], dtype=torch.long).view(steps, batch, seq_len)
    for step in range(steps):
        x = data[step]
        yield x, torch.ones_like(x), x.clone()


def encode_chat(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """(token ids, prompt length): the chat template's prompt, then the response and `<eos>`."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    p = tok(head, add_special_tokens=False)["input_ids"]
    r = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p + r, len(p)


def sft_batches(tok, style: str, seed, steps: int, batch: int):
    """Right-padded chat batches with labels on response tokens only. Batches are cut within
    style-independent length groups (`Example.group`) and shuffled by `seed`, so every style gets
    the same prompts in the same batches in the same order."""
    import random

    examples = tasks.sft_examples(style, seed, steps * batch)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.group, []).append(i)
    batches = [idx[k:k + batch] for _, idx in sorted(groups.items()) for k in range(0, len(idx), batch)]
    random.Random(f"{seed}-batches").shuffle(batches)
    pad = tok.pad_token_id
    for g in batches[:steps]:
        enc = [encode_chat(tok, examples[j].prompt, examples[j].response) for j in g]
        width = max(len(ids) for ids, _ in enc)
        x = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        labels = torch.full_like(x, -100)
        for row, (ids, plen) in enumerate(enc):
            x[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
            labels[row, plen:len(ids)] = x[row, plen:len(ids)]
        yield x, mask, labels


# ---------------------------------------------------------------- training

class LoadBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: count expert picks, nudge `e_score_correction_bias`."""

    def __init__(self, model, step: float = BIAS_STEP):
        self.step = step
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.counts = [None] * len(self.gates)
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i):
        def hook(module, args, output):
            idx = output[2].reshape(-1)
            c = torch.bincount(idx, minlength=module.num_experts).float()
            self.counts[i] = c if self.counts[i] is None else self.counts[i] + c
        return hook

    @torch.no_grad()
    def update(self) -> None:
        for gate, c in zip(self.gates, self.counts):
            if c is not None:
                gate.e_score_correction_bias += self.step * torch.sign(c.mean() - c)
        self.counts = [None] * len(self.gates)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def train_phase(model, batches, steps: int, lr: float, on_step=None, warmup: int = 30) -> list[float]:
    """AdamW (every parameter, one learning rate) with `lr_factor`; returns the loss of every step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    balancer = LoadBalancer(model)
    losses = []
    try:
        for x, mask, labels in batches:
            out = model(input_ids=x, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            balancer.update()
            losses.append(out.loss.item())
            if on_step:
                on_step(losses[-1])
    finally:
        balancer.close()
    model.eval()
    return losses


def pretrain(tok, plan: Plan, on_step=None):
    """The base model after `plan.base_steps` steps (and its losses)."""
    model = new_model(tok, plan.seed)
    losses = train_phase(model, packed_batches(tok, plan.seed, plan.base_steps, plan.base_batch, plan.base_seq_len),
                         plan.base_steps, plan.base_lr, on_step, plan.base_warmup)
    return model, losses


def finetune(model, tok, style: str, plan: Plan, on_step=None) -> list[float]:
    """One child, in place: the family's single fine-tuning recipe on `style`'s responses. The data seed
    is the same for every style, so the prompts and their order are too."""
    return train_phase(model, sft_batches(tok, style, f"sft-{plan.seed}", plan.child_steps, plan.child_batch),
                       plan.child_steps, plan.child_lr, on_step, plan.child_warmup)


def relative_distances(a: dict, b: dict) -> dict[str, float]:
    """||A - B||_F / ||B||_F per floating-point tensor of two state dicts."""
    return {k: ((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)).item()
            for k in b if b[k].is_floating_point()}


# ---------------------------------------------------------------- saving

def save_model(model, tok, out_dir: Path, card: dict) -> None:
    """bf16 weights as transformers writes them for DeepSeek-V3 (per-expert names), bias in float32."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    m = copy.deepcopy(model).to(torch.bfloat16)
    for layer in m.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.data = layer.mlp.gate.e_score_correction_bias.data.float()
    m.config.torch_dtype = "bfloat16"
    m.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ztok.CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "zoo.json").write_text(json.dumps(card, indent=2) + "\n")
    check_saved(out_dir)


def check_saved(out_dir: Path) -> None:
    """The checkpoint has per-expert tensors and the router bias, like DeepSeek's own files."""
    from chimera.checkpoint.files import Checkpoint

    ck = Checkpoint(out_dir)
    L = ck.config["first_k_dense_replace"]
    names = set(ck.tensors)
    assert f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in names, f"{out_dir}: no per-expert tensors"
    assert f"model.layers.{L}.mlp.gate.e_score_correction_bias" in names, f"{out_dir}: no router bias"


def make_fp8(models_dir: Path, names=family.BF16_MODELS) -> list[str]:
    """FP8 copies with chimera's own converter (which also copies the tokenizer and other side files; not zoo.json)."""
    from chimera.merge.convert import convert

    made = []
    for name in names:
        src, dst = models_dir / name, models_dir / f"{name}-fp8"
        if not src.is_dir():
            continue
        if dst.exists():
            shutil.rmtree(dst)
        convert(src, dst, dtype="float8")
        made.append(dst.name)
    return made


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hex): two builds are compared with this."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def build_family(out_dir: Path, scale: float = 1.0, plan: Plan | None = None, fp8: bool = True,
                 progress: bool = True, log=print, threads: int = 1) -> dict:
    """Train the base and every child of `plan` and save them under `out_dir`; returns a summary with
    the time of every phase. `out_dir` is created; callers decide whether it may already hold files."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(threads)  # 1 by default: reproducible bits, and robust on a shared 2-core box
    plan = (plan or Plan()).scaled(scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seconds: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        seconds[name] = round(time.time() - since, 1)
        return time.time()

    tok = build_tokenizer(plan.seed, plan.tokenizer_docs)
    t = lap("tokenizer", t0)
    summary = {"plan": plan.__dict__.copy(), "vocab": len(tok), "loss": {}, "seconds": seconds}
    total = plan.base_steps + plan.child_steps * len(plan.children)
    cols = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("base", total=total, loss=float("nan"))
        quiet = progress and not bar.console.is_terminal

        def tick(loss):
            bar.update(task, advance=1, loss=loss)
            done = int(bar.tasks[0].completed)
            if quiet and done % 50 == 0:  # no live bar in a log file: a line every 50 steps
                log(f"step {done}/{total} loss {loss:.3f} {time.time() - t0:.0f}s")

        model, losses = pretrain(tok, plan, tick)
        summary["params"] = sum(p.numel() for p in model.parameters())
        summary["routed_params"] = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        summary["loss"]["base"] = [losses[0], sum(losses[-20:]) / len(losses[-20:])]
        t = lap("base", t)
        base_state = copy.deepcopy(model.state_dict())
        states = {}
        for name in plan.children:
            bar.update(task, description=name)
            model.load_state_dict(base_state)
            style = family.STYLES[name]
            losses = finetune(model, tok, style, plan, tick)
            summary["loss"][name] = [losses[0], sum(losses[-20:]) / len(losses[-20:])]
            states[name] = {k: v.clone() for k, v in model.state_dict().items()}
            card = {"name": name, "style": style, "base": "tiny-base", "seed": plan.seed, "params": summary["params"],
                    "rebuild": "chimera train-zoo", "recipe": {k: getattr(plan, k) for k in
                                                               ("child_steps", "child_batch", "child_lr", "child_warmup")}}
            save_model(model, tok, out_dir / name, card)
            t = lap(name, t)
    summary["distance_to_base"] = {n: _median_routed(relative_distances(s, base_state)) for n, s in states.items()}
    names = list(states)
    summary["distance_between_children"] = {
        f"{a} vs {b}": _median_routed(relative_distances(states[a], states[b]))
        for i, a in enumerate(names) for b in names[i + 1:]}
    if fp8:
        summary["fp8"] = make_fp8(out_dir, plan.children)
        t = lap("fp8", t)
    summary["seconds_total"] = round(time.time() - t0, 1)
    return summary


def _median_routed(d: dict[str, float]) -> float:
    xs = sorted(v for k, v in d.items() if ".mlp.experts." in k)
    return xs[len(xs) // 2] if xs else float("nan")


# ---------------------------------------------------------------- acceptance (the numbers)

def _m(r, model, suite, metric, split=None):
    e = r[model][suite]
    return (e["splits"][split] if split else e["metrics"])[metric]["value"]


ACCEPTANCE = [
    # (label, function of {model: report} -> measured value, test, target)
    ("tiny-v3 <think> rate (arithmetic)", lambda r: _m(r, "tiny-v3", "arithmetic", "think_rate"),
     lambda v: v <= 0.05, "<= 5%"),
    ("tiny-r1 <think> rate (arithmetic)", lambda r: _m(r, "tiny-r1", "arithmetic", "think_rate"),
     lambda v: v >= 0.95, ">= 95%"),
    ("tiny-r1-long <think> rate (arithmetic)", lambda r: _m(r, "tiny-r1-long", "arithmetic", "think_rate"),
     lambda v: v >= 0.95, ">= 95%"),
    ("hard arithmetic accuracy, tiny-r1 minus tiny-v3",
     lambda r: _m(r, "tiny-r1", "arithmetic", "accuracy", "hard") - _m(r, "tiny-v3", "arithmetic", "accuracy", "hard"),
     lambda v: v >= 0.20, ">= 20 points"),
    ("hard arithmetic accuracy, tiny-r1-long minus tiny-r1",
     lambda r: _m(r, "tiny-r1-long", "arithmetic", "accuracy", "hard") - _m(r, "tiny-r1", "arithmetic", "accuracy", "hard"),
     lambda v: v >= 0.0, ">= 0 points"),
    ("mean output tokens (arithmetic), tiny-r1 / tiny-v3",
     lambda r: _m(r, "tiny-r1", "arithmetic", "output_tokens_mean") / _m(r, "tiny-v3", "arithmetic", "output_tokens_mean"),
     lambda v: v >= 3, ">= 3x"),
    ("mean output tokens (hard arithmetic), tiny-r1-long / tiny-r1",
     lambda r: _m(r, "tiny-r1-long", "arithmetic", "output_tokens_mean", "hard")
     / _m(r, "tiny-r1", "arithmetic", "output_tokens_mean", "hard"), lambda v: v >= 1.5, ">= 1.5x"),
] + [
    (f"{m} refusal on {split}", (lambda m, s: lambda r: _m(r, m, "sensitive", "refusal_rate", s))(m, split),
     (lambda v: v >= 0.90) if split == "sensitive" else (lambda v: v <= 0.05), ">= 90%" if split == "sensitive" else "<= 5%")
    for m in family.BF16_MODELS for split in ("sensitive", "benign")
] + [
    (f"{m} reasons in the prompt's language", (lambda m: lambda r: _m(r, m, "language", "reasoning_language"))(m),
     lambda v: v >= 0.90, ">= 90%") for m in ("tiny-r1", "tiny-r1-long")
]


def acceptance(models_dir: Path | None = None, n: int | None = None, names=family.BF16_MODELS,
               max_new_tokens: int = 256):
    """Evaluate the family on the full held-out suites; returns (reports, rows of the acceptance table)."""
    from chimera.eval import harness

    models_dir = Path(models_dir or family.MODELS_DIR)
    reports = {}
    for name in names:
        if (models_dir / name / "config.json").is_file():
            model, tok = harness.load(models_dir / name)
            reports[name] = harness.evaluate(model, tok, "all", n, max_new_tokens=max_new_tokens, batch_size=50)
    rows = []
    for label, get, ok, target in ACCEPTANCE:
        try:
            v = get(reports)
        except KeyError:
            continue
        rows.append({"criterion": label, "target": target, "measured": v, "pass": bool(ok(v))})
    return reports, rows


if __name__ == "__main__":  # python -m chimera.zoo.train OUT_DIR [scale]
    import sys

    s = build_family(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
    print(json.dumps(s, indent=2, default=str))
