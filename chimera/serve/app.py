"""The ASGI app of `chimera serve` (Starlette): OpenAI-compatible routes over one `Engine`.

    GET  /health                 {"status": "ok", "queued": n}
    GET  /v1/models              the served model, with its MoE layout (layers, experts, top_k)
    POST /v1/chat/completions    chat template applied; `stream: true` answers with SSE chunks
    POST /v1/completions         raw prompt (string, strings or token ids)

`usage.completion_tokens` counts every generated token, the end-of-sequence token included, as vLLM and
`transformers serve` do; the text never contains it.
"""
from __future__ import annotations

import asyncio
import hmac
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from chimera.errors import ChimeraError
from chimera.moe.engine_routes import encode_npy
from chimera.serve.engine import Engine, Job, QueueFull, Result
from chimera.serve.protocol import (ApiError, GenParams, bad, new_id, now, parse_messages, parse_params,
                                    parse_prompts, usage)

MAX_BODY = 4 * 1024 * 1024


class Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None,
                 max_prompt_tokens: int | None = None, default_max_tokens: int = 256):
        self.engine, self.name, self.api_key = engine, model_name, api_key
        cfg = engine.model.config
        ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 1 << 30
        self.context = ctx
        self.max_prompt_tokens = min(max_prompt_tokens or ctx, ctx)
        self.default_max_tokens = default_max_tokens

    # --------------------------------------------------------------------------------------- plumbing
    def _auth(self, request: Request) -> None:
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body of {len(raw)} bytes exceeds {MAX_BODY}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise bad("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", self.name):
            raise ApiError(404, f"the model '{model}' does not exist (serving '{self.name}')", param="model",
                           code="model_not_found")
        return body

    def _params(self, body: dict) -> GenParams:
        p = parse_params(body, self.default_max_tokens, self.context)
        try:
            self.engine.check_switch(p.switch)
        except ChimeraError as e:
            raise bad(f"experts: {e}", "experts", code="invalid_expert") from None
        return p

    def _check_len(self, ids: list[int], p: GenParams) -> None:
        if len(ids) > self.max_prompt_tokens or len(ids) + p.max_tokens > self.context:
            raise bad(f"prompt of {len(ids)} tokens + max_tokens {p.max_tokens} exceeds this model's limit "
                      f"(prompt <= {self.max_prompt_tokens}, prompt + max_tokens <= {self.context})",
                      "messages", code="context_length_exceeded")
        if not ids:
            raise bad("empty prompt", "prompt")

    def _submit(self, ids: list[int], p: GenParams) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        job = Job(ids, p.max_tokens, lambda kind, payload: loop.call_soon_threadsafe(q.put_nowait, (kind, payload)),
                  temperature=p.temperature, seed=p.seed, stop=p.stop, switch=p.switch, want_routes=p.return_routes,
                  ignore_eos=p.ignore_eos)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_exceeded", code="queue_full") from None
        return job, q

    @staticmethod
    async def _result(q: asyncio.Queue) -> Result:
        while True:
            kind, payload = await q.get()
            if kind == "done":
                return payload
            if kind == "error":
                raise payload

    def _choice_extra(self, r: Result) -> dict:
        return {"routed_experts": encode_npy(r.routes)} if r.routes is not None else {}

    # --------------------------------------------------------------------------------------- routes
    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "queued": self.engine.queued})

    async def models(self, request: Request):
        self._auth(request)
        e = self.engine
        moe = {"layers": list(e.layers), "num_experts": next(iter(e.layers.values())).adapter.num_experts,
               "top_k": e.top_k, "num_hidden_layers": e.n_layers}
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": now(),
                                                         "owned_by": "chimera", "max_model_len": self.context,
                                                         "moe": moe}]})

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self.engine.tok
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # a template that rejects the conversation (roles, order)
                raise bad(f"messages: the chat template rejected them ({str(e).splitlines()[0][:120]})",
                          "messages") from None
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(m["content"] for m in messages)
        return list(tok(text, add_special_tokens=True)["input_ids"])

    async def chat(self, request: Request):
        body = await self._body(request)
        p = self._params(body)
        ids = self._encode_chat(parse_messages(body))
        self._check_len(ids, p)
        job, q = self._submit(ids, p)
        rid, created = new_id("chatcmpl"), now()
        if p.stream:
            return StreamingResponse(self._stream(rid, created, p, job, q, chat=True), media_type="text/event-stream")
        r = await self._result(q)
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                  "finish_reason": r.finish_reason, "logprobs": None, **self._choice_extra(r)}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                             "choices": [choice], "usage": usage(r.prompt_tokens, len(r.token_ids))})

    async def _stream(self, rid: str, created: int, p: GenParams, job: Job, q: asyncio.Queue, chat: bool):
        """SSE chunks in OpenAI's format: `chat.completion.chunk` deltas, or `text_completion` texts."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            return _sse({"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices,
                         **extra})

        def choice(text, finish=None, **extra):
            body = {"delta": ({"content": text} if text else {})} if chat else {"text": text, "logprobs": None}
            return {"index": 0, **body, "finish_reason": finish, **extra}

        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while True:
                kind, payload = await q.get()
                if kind == "delta":
                    yield chunk([choice(payload)])
                elif kind == "error":
                    yield _sse(_internal(payload).body())
                    break
                else:
                    r: Result = payload
                    yield chunk([choice("", r.finish_reason, **self._choice_extra(r))])
                    if p.include_usage:
                        yield chunk([], usage=usage(r.prompt_tokens, len(r.token_ids)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True

    async def completions(self, request: Request):
        body = await self._body(request)
        p = self._params(body)
        tok = self.engine.tok
        prompts = [x if isinstance(x, list) else list(tok(x, add_special_tokens=True)["input_ids"])
                   for x in parse_prompts(body)]
        if p.stream and len(prompts) > 1:
            raise bad("streaming supports one prompt per request", "prompt")
        vocab = int(getattr(self.engine.model.config, "vocab_size", 0) or 0)
        for ids in prompts:
            self._check_len(ids, p)
            if vocab and any(not 0 <= t < vocab for t in ids):
                raise bad(f"token ids must lie in [0, {vocab})", "prompt")
        rid, created = new_id("cmpl"), now()
        if p.stream:
            job, q = self._submit(prompts[0], p)
            return StreamingResponse(self._stream(rid, created, p, job, q, chat=False),
                                     media_type="text/event-stream")
        if len(prompts) + self.engine.queued > self.engine.max_queue:
            raise ApiError(429, "server busy: too many queued requests; retry later", "rate_limit_exceeded",
                           code="queue_full")
        subs = [self._submit(ids, p) for ids in prompts]
        results = await asyncio.gather(*(self._result(q) for _, q in subs))
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None,
                    **self._choice_extra(r)} for i, r in enumerate(results)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": self.name,
                             "choices": choices, "usage": usage(sum(r.prompt_tokens for r in results),
                                                                sum(len(r.token_ids) for r in results))})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _internal(e: Exception) -> ApiError:
    return ApiError(500, f"generation failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
                    "server_error")


def build_app(server: Server) -> Starlette:
    def guarded(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except Exception as e:  # never a traceback to the client, never a dead server
                err = _internal(e)
                return JSONResponse(err.body(), status_code=err.status)
        return endpoint

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no route {request.url.path}"
        return JSONResponse(ApiError(status, msg).body(), status_code=status)

    routes = [
        Route("/health", guarded(server.health), methods=["GET"]),
        Route("/v1/models", guarded(server.models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(server.chat), methods=["POST"]),
        Route("/v1/completions", guarded(server.completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
