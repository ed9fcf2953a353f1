"""The generation engine behind `chimera serve`: one worker thread owns the model.

Requests wait in one queue. The worker takes the oldest request and every other waiting request with the
*same* expert switch (up to `max_batch`; it waits up to `batch_window` seconds for a burst to arrive), applies that switch through `chimera.moe.switch.switched` (router
bias or forward hooks: shared model state), runs one batched greedy/sampled decode with a KV cache, and
restores the model before it looks at the queue again. Requests with different switches therefore never share
a forward pass, even when they arrive at the same moment; requests with the same switch are batched.

Per row, the decode loop is the usual one: left-padded prefill (position ids from the attention mask), then
one token per step; a row stops at an end-of-sequence id, a stop string or its own `max_tokens`.
"""
from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from chimera.errors import ChimeraError
from chimera.moe.capture import RoutingRecorder
from chimera.moe.routers import moe_layers, num_decoder_layers
from chimera.moe.switch import plan, switched

Expert = tuple[int, int]


@dataclass(frozen=True)
class Switch:
    """An expert switch as a hashable key: requests with equal keys may share a batch."""

    off: tuple[Expert, ...] = ()
    on: tuple[Expert, ...] = ()
    mode: str = "replace"

    @property
    def empty(self) -> bool:
        return not self.off and not self.on


@dataclass
class Job:
    """One generation request. `emit(kind, payload)` is called from the worker thread:
    ("delta", str) for new text, then ("done", Result) or ("error", Exception)."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    switch: Switch = Switch()
    want_routes: bool = False
    ignore_eos: bool = False      # vLLM's `ignore_eos`: generate exactly max_tokens (benchmarks)
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False       # set by the server when the client went away: the row stops early


@dataclass
class Result:
    text: str
    token_ids: list[int]          # generated ids, the end-of-sequence id included when it ended the text
    finish_reason: str            # "stop" (eos or stop string) | "length"
    prompt_tokens: int
    routes: np.ndarray | None     # [prompt + generated - 1, num_decoder_layers, top_k] int16, -1 on dense layers


class QueueFull(Exception):
    pass


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, batch_window: float = 0.02):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_queue, self.batch_window = max_batch, max_queue, batch_window
        self._valid: set[Switch] = set()
        self._running = 0
        self._peak = (1, 0.0)   # most requests queued or running at once lately, and when
        self.device = next(model.parameters()).device
        gen = getattr(model, "generation_config", None)
        eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.layers = moe_layers(model)
        self.n_layers = num_decoder_layers(model) or (max(self.layers) + 1)
        self.top_k = next(iter(self.layers.values())).adapter.top_k
        self._cache_kw = _cache_kwarg(model)
        self._jobs: list[Job] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="chimera-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ intake
    def check_switch(self, switch: Switch) -> None:
        """Raise ChimeraError (one line) for an unknown layer/expert or an impossible switch."""
        if not switch.empty and switch not in self._valid:
            plan(self.model, switch.off, switch.on, switch.mode)
            if len(self._valid) < 4096:   # a switch is valid for good: remember it (a plan costs milliseconds)
                self._valid.add(switch)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests already queued (limit {self.max_queue})")
            self._jobs.append(job)
            busy, now = len(self._jobs) + self._running, time.monotonic()
            if busy >= self._peak[0] or now - self._peak[1] > 2.0:
                self._peak = (busy, now)
            self._cv.notify()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------ worker
    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._jobs and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            # concurrent clients' requests arrive a few milliseconds apart: when more requests were in flight at
            # once lately than are queued now, wait up to `batch_window` for them to share one batch (a lone client
            # never waits)
            recent = time.monotonic() - self._peak[1] < 2.0
            want = min(self.max_batch, self._peak[0] if recent else 1)
            deadline = time.monotonic() + self.batch_window
            while len(self._jobs) < want and not self._stop and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            key = self._jobs[0].switch
            batch = [j for j in self._jobs if j.switch == key][: self.max_batch]
            self._running = len(batch)
            taken = {id(j) for j in batch}
            self._jobs = [j for j in self._jobs if id(j) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                sw = batch[0].switch
                if sw.empty:
                    results = self.generate(batch)
                else:
                    with switched(self.model, off=sw.off, on=sw.on, mode=sw.mode):
                        results = self.generate(batch)
                for job, res in zip(batch, results):
                    job.emit("done", res)
            except Exception as e:  # a failed batch fails its requests, never the server
                for job in batch:
                    job.emit("error", e)
            finally:
                self._running = 0

    # ------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, jobs: list[Job]) -> list[Result]:
        """One batched decode of `jobs` under whatever switch is active."""
        B = len(jobs)
        lens = [len(j.prompt_ids) for j in jobs]
        if min(lens) == 0:
            raise ChimeraError("empty prompt")
        T = max(lens)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, j in enumerate(jobs):
            ids[b, T - lens[b]:] = torch.as_tensor(j.prompt_ids)
            mask[b, T - lens[b]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(j.seed if j.seed is not None else 0) for j in jobs]
        out_ids: list[list[int]] = [[] for _ in jobs]
        texts = [""] * B
        sent = [0] * B
        finish: list[str | None] = [None] * B
        recorder = RoutingRecorder(self.model) if any(j.want_routes for j in jobs) else None
        steps: list[dict] = []
        max_new = max(j.max_tokens for j in jobs)
        cache = None
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        with recorder if recorder is not None else _Null():
            for step in range(max_new):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                 **{self._cache_kw: cache})
                cache = out[self._cache_kw]
                if recorder is not None:
                    steps.append(recorder.take())
                nxt = self._choose(out.logits[:, -1, :].float(), jobs, gens)   # [B]
                for b, j in enumerate(jobs):
                    if finish[b] is not None:
                        continue
                    if j.cancelled:
                        finish[b] = "cancelled"
                        continue
                    t = int(nxt[b])
                    out_ids[b].append(t)
                    if t in self.eos_ids and not j.ignore_eos:
                        finish[b] = "stop"
                    else:
                        texts[b] = self.tok.decode(out_ids[b], skip_special_tokens=True)
                        cut = _find_stop(texts[b], j.stop)
                        if cut is not None:
                            texts[b], finish[b] = texts[b][:cut], "stop"
                        elif len(out_ids[b]) >= j.max_tokens:
                            finish[b] = "length"
                    hold = 0 if finish[b] is not None else max((len(s) for s in j.stop), default=1) - 1
                    upto = max(sent[b], len(texts[b]) - hold)
                    if upto > sent[b]:
                        j.emit("delta", texts[b][sent[b]:upto])
                        sent[b] = upto
                if all(f is not None for f in finish):
                    break
                ids = nxt.view(B, 1).to(self.device)
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
                pos = pos[:, -1:] + 1
        routes = self._routes(steps, lens, [len(o) for o in out_ids], T) if recorder is not None else [None] * B
        return [Result(texts[b], out_ids[b], finish[b] or "length", lens[b], routes[b] if jobs[b].want_routes else None)
                for b in range(B)]

    @staticmethod
    def _choose(logits: torch.Tensor, jobs: list[Job], gens: list[torch.Generator]) -> torch.Tensor:
        nxt = logits.argmax(dim=-1)                                     # [B]
        for b, j in enumerate(jobs):
            if j.temperature > 0:
                probs = torch.softmax(logits[b] / j.temperature, dim=-1)
                nxt[b] = torch.multinomial(probs.cpu(), 1, generator=gens[b])[0]
        return nxt

    def _routes(self, steps: list[dict], lens: list[int], n_gen: list[int], T: int) -> list[np.ndarray]:
        """Per row: the experts of every forwarded token, [prompt + generated - 1, n_layers, top_k]
        (vLLM's layout: the last generated token is never forwarded), -1 on decoder layers without a router."""
        B = len(lens)
        out = []
        for b in range(B):
            n = lens[b] + n_gen[b] - 1
            arr = np.full((n, self.n_layers, self.top_k), -1, dtype=np.int16)
            for L in self.layers:
                pre = steps[0][L][0].view(B, T, -1)[b, T - lens[b]:]      # [len_b, k]
                dec = [s[L][0].view(B, -1)[b] for s in steps[1:n_gen[b]]]  # one [k] per decode step
                rows = torch.cat([pre] + [d.unsqueeze(0) for d in dec]) if dec else pre
                arr[:, L, :] = rows[:n].cpu().numpy()
            out.append(arr)
        return out


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
