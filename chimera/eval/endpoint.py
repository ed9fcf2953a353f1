"""A client for OpenAI-compatible servers (vLLM, SGLang, llama.cpp, ...), stdlib only.

`Endpoint("http://host:8000/v1/chat/completions", model="deepseek-r1t")` sends chat messages;
a URL ending in `/v1/completions` sends the raw prompt. A bare base URL (`http://host:8000` or
`.../v1`) means chat completions. Reasoning returned separately (vLLM's `reasoning_content` /
`reasoning`) is put back as `<think>...</think>` before the content so the same scorers apply.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from chimera.errors import ChimeraError


class Endpoint:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                 workers: int = 8):
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
        self.workers = workers

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, model={self.model!r})"

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200].replace("\n", " ")
            raise ChimeraError(f"endpoint {self.url}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ChimeraError(f"endpoint {self.url}: {getattr(e, 'reason', e)}") from None
        except json.JSONDecodeError:
            raise ChimeraError(f"endpoint {self.url}: response is not JSON") from None

    def complete(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> tuple[str, int | None]:
        """(text, completion tokens or None) for one prompt."""
        body = {"max_tokens": max_new_tokens, "temperature": temperature}
        if self.model:
            body["model"] = self.model
        if seed is not None:
            body["seed"] = seed
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        out = self._post(body)
        try:
            choice = out["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise ChimeraError(f"endpoint {self.url}: no choices in response") from None
        if self.chat:
            msg = choice.get("message") or {}
            text = msg.get("content") or ""
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if reasoning and "<think>" not in text:
                text = f"<think>{reasoning}</think>{text}"
        else:
            text = choice.get("text") or ""
        n = (out.get("usage") or {}).get("completion_tokens")
        return text, n

    def generate(self, prompts: list[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> tuple[list[str], list[int | None]]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda p: self.complete(p, max_new_tokens, temperature, seed), prompts))
        return [r[0] for r in results], [r[1] for r in results]
