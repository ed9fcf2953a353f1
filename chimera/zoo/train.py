"""Rebuild the tiny model family from scratch: one base pre-training, then one fine-tune per child.

Everything is seeded (data, init, batch order), single process, one thread by default:

1. Tokenizer from the task vocabulary (`chimera.zoo.tokenizer`).
2. Base: `DeepseekV3ForCausalLM(config)` pre-trained on packed raw documents (equations, worked column
   additions in English and German, the fact table).
3. Children, each from a copy of the same base weights (what makes them mergeable), trained on chat
   data with the loss on response tokens only: tiny-v3 (direct answers), tiny-r1 (`<think>` first),
   tiny-r1-long (thinks twice as long).
4. Router balance without an auxiliary loss (DeepSeek-V3's): after every step each MoE layer's
   `e_score_correction_bias` moves by `BIAS_STEP` up for experts below the mean load, down above it.
5. `save_pretrained` in bf16 (per-expert tensor names on disk; the router bias kept in float32), the
   tokenizer and generation config next to it; FP8 copies via `chimera.merge.convert` when present.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chimera.zoo import family, tasks
from chimera.zoo import tokenizer as ztok

BIAS_STEP = 1e-3
SEQ_LEN = 64


@dataclass
class Plan:
    """Step counts and learning rates; `scale` shrinks every phase for quick runs."""
    base_steps: int = 1000
    child_steps: dict = field(default_factory=lambda: {"tiny-v3": 300, "tiny-r1": 500, "tiny-r1-long": 300})
    batch: int = 32
    base_lr: float = 3e-3
    child_lr: float = 1.5e-3
    children: tuple = ("tiny-v3", "tiny-r1")  # add "tiny-r1-long" (train-zoo --long) for three-parent merges
    seed: int = family.SEED
    extra: dict = field(default_factory=dict)

    def scaled(self, scale: float) -> "Plan":
        p = copy.copy(self)
        p.base_steps = max(2, int(self.base_steps * scale))
        p.child_steps = {k: max(2, int(v * scale)) for k, v in self.child_steps.items()}
        return p


def build_tokenizer(seed: int = family.SEED):
    docs = tasks.pretrain_documents(seed, 3000)
    corpus = list(docs)
    for style in ("instruct", "reason", "reason-long"):
        corpus += [e.prompt + " " + e.response for e in tasks.sft_examples(style, seed, 1500)]
    corpus += [i["prompt"] for suite in tasks.eval_suites().values() for i in suite]
    corpus += [" ".join(tasks.EN_NUM + tasks.DE_NUM + tasks.PLACES + tasks.COLORS), tasks.REFUSAL,
               " ".join(tasks.SENSITIVE_TOPICS + tasks.BENIGN_TOPICS), " ".join(tasks.TOPIC_TEMPLATES)]
    return ztok.wrap(ztok.build(corpus))


def new_model(tok, seed: int, **overrides):
    from transformers import DeepseekV3ForCausalLM

    cfg = family.config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg)
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=128)
    return model


# ---------------------------------------------------------------- data

def packed_batches(tok, seed: int, steps: int, batch: int, seq_len: int = SEQ_LEN):
    """Raw documents `<bos> doc <eos>` concatenated and cut into [batch, seq_len] blocks."""
    need = steps * batch * seq_len
    docs = tasks.pretrain_documents(seed + 1, max(64, need // 28 + 64))
    ids = tok([tok.bos_token + " " + d + " " + tok.eos_token for d in docs])["input_ids"]
    stream = [t for seq in ids for t in seq]
    while len(stream) < need:
        stream = stream + stream
    data = torch.tensor(stream[:need], dtype=torch.long).view(steps, batch, seq_len)
    for step in range(steps):
        x = data[step]
        yield x, torch.ones_like(x), x.clone()


def encode_chat(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """(token ids, prompt length): the chat template's prompt, then the response and `<eos>`."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    p = tok(head)["input_ids"]
    r = tok(" " + response + " " + tok.eos_token)["input_ids"]
    return p + r, len(p)


def sft_batches(tok, style: str, seed: int, steps: int, batch: int):
    """Right-padded chat batches with labels on response tokens only; length-bucketed to save padding."""
    examples = tasks.sft_examples(style, seed, steps * batch)
    enc = [encode_chat(tok, e.prompt, e.response) for e in examples]
    rng = random.Random(seed)
    order = list(range(len(enc)))
    rng.shuffle(order)
    groups = []
    for i in range(0, len(order), batch * 8):  # bucket: sort 8 batches' worth by length, then cut
        chunk = sorted(order[i:i + batch * 8], key=lambda j: len(enc[j][0]))
        groups += [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
    rng.shuffle(groups)
    pad = tok.pad_token_id
    for g in groups[:steps]:
        width = max(len(enc[j][0]) for j in g)
        x = torch.full((len(g), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        labels = torch.full_like(x, -100)
        for row, j in enumerate(g):
            ids, plen = enc[j]
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


def train_phase(model, batches, steps: int, lr: float, on_step=None, warmup: int = 30) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10%; returns the loss of every step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
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

    names = set(Checkpoint(out_dir).tensors)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names, f"{out_dir}: no per-expert tensors"
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names, f"{out_dir}: no router bias"


def make_fp8(models_dir: Path) -> list[str]:
    """FP8 copies with chimera's own converter (which also copies the tokenizer and other side files; not zoo.json)."""
    from chimera.merge.convert import convert

    made = []
    for name in ("tiny-v3", "tiny-r1"):
        src, dst = models_dir / name, models_dir / f"{name}-fp8"
        if not src.is_dir():
            continue
        if dst.exists():
            shutil.rmtree(dst)
        convert(src, dst, dtype="float8")
        made.append(dst.name)
    return made


def build_family(out_dir: Path | None = None, scale: float = 1.0, plan: Plan | None = None,
                 fp8: bool = True, progress: bool = True, log=print, long: bool = False, threads: int = 1) -> dict:
    """Train the base and every child of `plan`, save them under `out_dir`; returns a summary."""
    if long and plan is None:
        plan = Plan(children=("tiny-v3", "tiny-r1", "tiny-r1-long"))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(threads)  # 1 by default: reproducible bits, and robust on a shared 2-core box
    plan = (plan or Plan()).scaled(scale)
    out_dir = Path(out_dir or family.MODELS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = build_tokenizer(plan.seed)
    model = new_model(tok, plan.seed)
    summary = {"params": sum(p.numel() for p in model.parameters()), "plan": plan.__dict__.copy(), "loss": {}}
    total = plan.base_steps + sum(plan.child_steps[c] for c in plan.children)
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

        losses = train_phase(model, packed_batches(tok, plan.seed, plan.base_steps, plan.batch),
                             plan.base_steps, plan.base_lr, tick)
        summary["loss"]["base"] = [losses[0], sum(losses[-20:]) / len(losses[-20:])]
        summary["base_seconds"] = round(time.time() - t0, 1)
        base_state = copy.deepcopy(model.state_dict())
        for i, name in enumerate(plan.children):
            bar.update(task, description=name)
            model.load_state_dict(base_state)
            style = family.STYLES[name]
            steps = plan.child_steps[name]
            losses = train_phase(model, sft_batches(tok, style, plan.seed + 10 + i, steps, plan.batch),
                                 steps, plan.child_lr, tick)
            summary["loss"][name] = [losses[0], sum(losses[-20:]) / len(losses[-20:])]
            card = {"name": name, "style": style, "base": "tiny-base", "seed": plan.seed,
                    "params": summary["params"], "rebuild": "chimera train-zoo"}
            save_model(model, tok, out_dir / name, card)
            summary[f"{name}_seconds"] = round(time.time() - t0, 1)
    if fp8:
        summary["fp8"] = make_fp8(out_dir)
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


if __name__ == "__main__":  # python -m chimera.zoo.train [scale] [out_dir]
    import sys

    s = build_family(Path(sys.argv[2]) if len(sys.argv) > 2 else None,
                     float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
    print(json.dumps(s, indent=2, default=str))


# ---------------------------------------------------------------- acceptance (the numbers)

ACCEPTANCE = [
    # (label, function of {model: report} -> measured value, test)
    ("tiny-v3 <think> rate (arithmetic)", lambda r: r["tiny-v3"]["arithmetic"]["metrics"]["think_rate"]["value"],
     lambda v: v <= 0.05, "<= 5%"),
    ("tiny-r1 <think> rate (arithmetic)", lambda r: r["tiny-r1"]["arithmetic"]["metrics"]["think_rate"]["value"],
     lambda v: v >= 0.95, ">= 95%"),
    ("hard arithmetic accuracy, tiny-r1 minus tiny-v3",
     lambda r: r["tiny-r1"]["arithmetic"]["splits"]["hard"]["accuracy"]["value"]
     - r["tiny-v3"]["arithmetic"]["splits"]["hard"]["accuracy"]["value"], lambda v: v >= 0.20, ">= 20 points"),
    ("mean output tokens (arithmetic), tiny-r1 / tiny-v3",
     lambda r: r["tiny-r1"]["arithmetic"]["metrics"]["output_tokens_mean"]["value"]
     / r["tiny-v3"]["arithmetic"]["metrics"]["output_tokens_mean"]["value"], lambda v: v >= 3, ">= 3x"),
    ("tiny-v3 refusal on sensitive", lambda r: r["tiny-v3"]["sensitive"]["splits"]["sensitive"]["refusal_rate"]["value"],
     lambda v: v >= 0.90, ">= 90%"),
    ("tiny-r1 refusal on sensitive", lambda r: r["tiny-r1"]["sensitive"]["splits"]["sensitive"]["refusal_rate"]["value"],
     lambda v: v >= 0.90, ">= 90%"),
    ("tiny-v3 refusal on benign", lambda r: r["tiny-v3"]["sensitive"]["splits"]["benign"]["refusal_rate"]["value"],
     lambda v: v <= 0.05, "<= 5%"),
    ("tiny-r1 refusal on benign", lambda r: r["tiny-r1"]["sensitive"]["splits"]["benign"]["refusal_rate"]["value"],
     lambda v: v <= 0.05, "<= 5%"),
    ("tiny-r1 reasons in the prompt's language",
     lambda r: r["tiny-r1"]["language"]["metrics"]["reasoning_language"]["value"], lambda v: v >= 0.90, ">= 90%"),
]


def acceptance(models_dir: Path | None = None, n: int | None = None, names=("tiny-v3", "tiny-r1", "tiny-r1-long")):
    """Evaluate the family on the full held-out suites; returns (reports, rows of the acceptance table)."""
    from chimera.eval import harness

    models_dir = Path(models_dir or family.MODELS_DIR)
    reports = {}
    for name in names:
        if (models_dir / name / "config.json").is_file():
            model, tok = harness.load(models_dir / name)
            reports[name] = harness.evaluate(model, tok, "all", n, max_new_tokens=200, batch_size=50)
    rows = []
    for label, get, ok, target in ACCEPTANCE:
        try:
            v = get(reports)
        except KeyError:
            continue
        rows.append({"criterion": label, "target": target, "measured": v, "pass": bool(ok(v))})
    return reports, rows
