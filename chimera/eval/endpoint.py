"""A client for OpenAI-compatible servers (vLLM, SGLang, `transformers serve`, `chimera serve`, ...).

`Endpoint("http://host:8000/v1/chat/completions", model="deepseek-r1t")` sends chat messages;
a URL ending in `/v1/completions` sends the raw prompt. A bare base URL (`http://host:8000` or
`.../v1`) means chat completions. Reasoning returned separately (vLLM's `reasoning_content` /
`reasoning`) is put back as `<think>...</think>` before the content so the same scorers apply.

Token counts agree with the in-process harness, which counts generated tokens *without* the end-of-sequence
token: servers report `usage.completion_tokens` with it (vLLM, `transformers serve`, `chimera serve` all count
the stop token they sampled), so a response that ended with `finish_reason == "stop"` counts one token less.
(A stop *string* also ends with "stop"; chimera never sends one.)

Transient failures (HTTP 429 and 5xx, refused or reset connections, timeouts) are retried with exponential
backoff (`retries` times, honouring `Retry-After`); at most `workers` requests are in flight at once.
"""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from chimera.errors import ChimeraError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class Endpoint:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                 workers: int = 8, retries: int = 5, backoff: float = 0.5, extra: dict | None = None):
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ChimeraError(f"endpoint {url!r}: expected an http(s) URL")
        if url.endswith("/completions"):
            self.url = url
        elif url.endswith("/v1"):
            self.url = url + "/chat/completions"
        else:
            self.url = url + "/v1/chat/completions"
        self.chat = self.url.endswith("/chat/completions")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.workers = max(1, int(workers))
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.extra = dict(extra or {})   # more request fields, e.g. {"return_routed_experts": True}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                    limits=httpx.Limits(max_connections=self.workers))

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt) * (1 + 0.25 * random.random())
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), 60.0))
            except ValueError:
                pass
        time.sleep(delay)

    def post(self, body: dict) -> dict:
        """POST `body` (JSON) and return the JSON answer, retrying transient failures."""
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = self._client.post(self.url, json=body)
            except (httpx.TransportError, OSError) as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if attempt < self.retries:
                    self._wait(attempt, None)
                    continue
                raise ChimeraError(f"endpoint {self.url}: {last} (after {attempt + 1} attempts)") from None
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                last = f"HTTP {r.status_code}"
                self._wait(attempt, r.headers.get("retry-after"))
                continue
            if r.status_code >= 400:
                detail = r.text[:200].replace("\n", " ")
                raise ChimeraError(f"endpoint {self.url}: HTTP {r.status_code} {detail}")
            try:
                return r.json()
            except ValueError:
                raise ChimeraError(f"endpoint {self.url}: response is not JSON") from None
        raise ChimeraError(f"endpoint {self.url}: {last}")  # pragma: no cover - the loop returns or raises

    def request(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
                seed: int | None = None) -> dict:
        """The raw JSON answer for one prompt."""
        body = {"max_tokens": max_new_tokens, "temperature": temperature, **self.extra}
        if self.model:
            body["model"] = self.model
        if seed is not None:
            body["seed"] = seed
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return self.post(body)

    def complete(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> tuple[str, int | None]:
        """(text, generated tokens without the end-of-sequence token, or None) for one prompt."""
        return parse_answer(self.request(prompt, max_new_tokens, temperature, seed), self.chat, self.url)

    def generate(self, prompts: list[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> tuple[list[str], list[int | None]]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda p: self.complete(p, max_new_tokens, temperature, seed), prompts))
        return [r[0] for r in results], [r[1] for r in results]


def parse_answer(out: dict, chat: bool, url: str = "endpoint") -> tuple[str, int | None]:
    """(text, tokens) of an OpenAI-style answer; tokens exclude the end-of-sequence token (module docstring)."""
    try:
        choice = out["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ChimeraError(f"endpoint {url}: no choices in response") from None
    if chat:
        msg = choice.get("message") or {}
        text = msg.get("content") or ""
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if reasoning and "<think>" not in text:
            text = f"<think>{reasoning}</think>{text}"
    else:
        text = choice.get("text") or ""
    n = (out.get("usage") or {}).get("completion_tokens")
    if isinstance(n, int) and choice.get("finish_reason") == "stop" and n > 0:
        n -= 1
    return text.strip(), n
