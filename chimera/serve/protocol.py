"""OpenAI-compatible request parsing and response shapes for `chimera serve`.

Only what changes the generation is read (`messages`/`prompt`, `max_tokens`/`max_completion_tokens`,
`temperature`, `seed`, `stop`, `stream`, `stream_options.include_usage`, `n`) plus chimera's two extensions:

    "experts": {"off": ["2:14", "3:23"], "on": [], "mode": "replace"}   # a per-request MoTE switch
    "return_routed_experts": true                                      # vLLM's `routed_experts` per choice
    "ignore_eos": true                                                 # vLLM's: always max_tokens tokens

Other OpenAI fields are accepted and ignored. Every problem is an `ApiError`, answered in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from chimera.serve.engine import Switch

_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MODES = ("replace", "drop")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    switch: Switch = field(default_factory=Switch)
    return_routes: bool = False
    ignore_eos: bool = False


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}", key)
    return v


def _experts(value, param: str) -> tuple[tuple[int, int], ...]:
    """["2:14", ...] or [[2, 14], ...]: only literal LAYER:EXPERT pairs (no @file references on a server)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise bad(f"'{param}' must be a list of \"LAYER:EXPERT\" strings", param)
    out = []
    for item in value:
        if isinstance(item, str) and (m := _PAIR.match(item)):
            out.append((int(m.group(1)), int(m.group(2))))
        elif (isinstance(item, list) and len(item) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in item) and min(item) >= 0):
            out.append((item[0], item[1]))
        else:
            raise bad(f"bad expert {item!r} in '{param}': expected \"LAYER:EXPERT\" such as \"2:14\"", param)
    return tuple(dict.fromkeys(out))


def parse_switch(body: dict) -> Switch:
    spec = body.get("experts")
    if spec is None:
        return Switch()
    if not isinstance(spec, dict):
        raise bad("'experts' must be an object {\"off\": [...], \"on\": [...], \"mode\": \"replace\"}", "experts")
    unknown = set(spec) - {"off", "on", "mode"}
    if unknown:
        raise bad(f"unknown key(s) in 'experts': {', '.join(sorted(unknown))}", "experts")
    mode = spec.get("mode", "replace")
    if mode not in MODES:
        raise bad(f"'experts.mode' must be one of {', '.join(MODES)}, got {mode!r}", "experts.mode")
    return Switch(off=tuple(sorted(_experts(spec.get("off"), "experts.off"))),
                  on=tuple(sorted(_experts(spec.get("on"), "experts.on"))), mode=mode)


def parse_params(body: dict, default_max_tokens: int, limit_max_tokens: int) -> GenParams:
    n = _int(body, "n", 1, 1_000_000)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    mt = _int(body, "max_completion_tokens", 1, limit_max_tokens)
    if mt is None:
        mt = _int(body, "max_tokens", 1, limit_max_tokens)
    temp = body.get("temperature", 0.0)
    if temp is None:
        temp = 0.0
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0 <= temp <= 2:
        raise bad(f"'temperature' must be a number in [0, 2], got {temp!r}", "temperature")
    seed = _int(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise bad("'stop' must be a string or a list of at most 16 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    rr, ie = body.get("return_routed_experts", False), body.get("ignore_eos", False)
    if not isinstance(rr, bool) or not isinstance(ie, bool):
        raise bad("'return_routed_experts' and 'ignore_eos' must be booleans", "return_routed_experts")
    return GenParams(max_tokens=mt or default_max_tokens, temperature=float(temp),
                     seed=seed, stop=tuple(s for s in stop if s), stream=stream,
                     include_usage=bool(so.get("include_usage")), switch=parse_switch(body), return_routes=rr,
                     ignore_eos=ie)


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def parse_prompts(body: dict) -> list[str | list[int]]:
    """`prompt` of /v1/completions: a string, a list of strings, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [list(p)]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return list(p)
    if isinstance(p, list) and p and all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in p):
        return [list(x) for x in p]
    raise bad("'prompt' must be a string, a list of strings or a list of token ids", "prompt")


# ------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
