"""The OpenAI-compatible HTTP app (Starlette): /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics. Every request is checked (protocol.py) and tokenized here; its prompts go to the engine as sequences,
whose events come back to the event loop through `call_soon_threadsafe`. Streaming answers are server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`. A client that goes away has its sequences
cancelled; the engine's lifetime is the app's (lifespan), so a server that drains its requests then stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cpmctl.generate.decode import encode_prompt
from cpmctl.serve import chat_template, protocol
from cpmctl.serve.engine import Engine, Event, QueueFull, Sequence, ShuttingDown
from cpmctl.serve.metrics import CONTENT_TYPE, Metrics
from cpmctl.serve.protocol import RequestError

MAX_BODY_BYTES = 4 * 2**20
RETRY_AFTER_S = 1  # what a 503 (queue full) tells the client to wait
POLL_S = 0.25  # how often a waiting handler checks that its client is still there


@dataclass
class ServeSettings:
    model_name: str  # the id clients pass as `model` (GET /v1/models)
    api_key: str | None = None  # when set, /v1/* and /metrics need `Authorization: Bearer KEY`
    log: Callable[[dict], None] | None = None  # one record per request


def create_app(engine: Engine, settings: ServeSettings) -> Starlette:
    metrics = Metrics(lambda: engine.waiting, lambda: engine.running)
    tokenizer, limits = engine.tokenizer, engine.limits
    state = {"draining": False}

    def authorized(request: Request) -> bool:
        if settings.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.api_key.encode())

    def unauthorized(endpoint: str, started: float) -> JSONResponse:
        e = RequestError("a valid API key is required (Authorization: Bearer KEY)", status=401, code="invalid_api_key")
        return error(e, endpoint, started, {"WWW-Authenticate": "Bearer"})

    def error(e: RequestError, endpoint: str, started: float, headers: dict | None = None) -> JSONResponse:
        metrics.request(endpoint, e.status)
        _log(settings, endpoint, e.status, started, error=e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def read_body(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None

    async def tokenize(texts: list[str], field: str) -> list[list[int]]:
        ids = await run_in_threadpool(lambda: [encode_prompt(tokenizer, t) for t in texts])
        for i, t in enumerate(ids):
            if len(t) > limits.max_prompt_tokens:
                which = f"'{field}' {i}" if len(ids) > 1 else f"'{field}'"
                raise RequestError(f"{which} is {len(t)} tokens, over this server's limit of "
                                   f"{limits.max_prompt_tokens} (--max-prompt-tokens)", field)
        return ids

    async def handle(request: Request, endpoint: str, chat: bool) -> Response:
        started = time.monotonic()
        if not authorized(request):
            return unauthorized(endpoint, started)
        try:
            body = protocol.check_fields(await read_body(request),
                                         protocol.CHAT_FIELDS if chat else protocol.COMPLETION_FIELDS)
            protocol.check_model(body, settings.model_name)
            if chat:
                turns = protocol.messages(body)
                cap_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
                dec = protocol.decoding(body, max_tokens_cap=limits.max_new_tokens,
                                        default_max_tokens=limits.max_new_tokens, max_batch=limits.max_batch,
                                        max_tokens_field=cap_field)
                ids = await tokenize([chat_template.render(turns)], "messages")
                stop = chat_template.STOP + dec.stop
            else:
                dec = protocol.decoding(body, max_tokens_cap=limits.max_new_tokens,
                                        default_max_tokens=protocol.COMPLETION_MAX_TOKENS, max_batch=limits.max_batch)
                texts = protocol.prompts(body)
                if len(texts) > limits.max_queue:
                    raise RequestError(f"'prompt' holds {len(texts)} prompts, over this server's --max-queue "
                                       f"{limits.max_queue}", "prompt")
                ids = await tokenize(texts, "prompt")
                stop = dec.stop
        except RequestError as e:
            return error(e, endpoint, started)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink(index: int):
            def put(event: Event) -> None:
                if event.kind == "text" and not dec.stream:
                    return  # a whole answer needs only the end; one wake-up of the loop per request, not per token
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the loop is gone: nobody is listening
                    pass
            return put

        seqs = [Sequence(p, dec.cfg, stop, sink(i)) for i, p in enumerate(ids)]
        try:
            engine.submit(seqs)
        except (QueueFull, ShuttingDown) as e:
            return error(RequestError(f"the server is busy: {e}; retry later", status=503, type_="server_error",
                                      code="server_busy"), endpoint, started, {"Retry-After": str(RETRY_AFTER_S)})
        reply = _Reply(chat, settings.model_name, seqs, dec)
        if dec.stream:
            return StreamingResponse(
                _stream(request, reply, events, lambda status: finish(reply, endpoint, status, started)),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        left = len(seqs)
        while left:
            try:
                _, event = await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    finish(reply, endpoint, 499, started)
                    return Response(status_code=499)
                continue
            left -= event.kind in ("done", "error")
            if event.kind == "error":
                reply.errors.append(event.message)
        status = 500 if reply.errors else 200
        finish(reply, endpoint, status, started)
        if reply.errors:
            return JSONResponse(RequestError(f"decoding failed: {reply.errors[0]}", status=500,
                                             type_="server_error").body(), status_code=500)
        return JSONResponse(reply.body())

    def finish(reply: "_Reply", endpoint: str, status: int, started: float) -> None:
        """Once per request: cancel what still runs (a client that left), count and log it."""
        now = time.monotonic()
        metrics.request(endpoint, status)
        for s in reply.seqs:
            if not s.done:
                s.cancel()  # the engine drops it at its next step
            first = s.first_token_at - s.submitted_at if s.first_token_at is not None else None
            metrics.sequence(s.finish_reason if s.done else "cancelled", len(s.prompt_ids), len(s.tokens),
                             (s.finished_at or now) - s.submitted_at, first)
        _log(settings, endpoint, status, started, id=reply.id, prompt_tokens=reply.prompt_tokens,
             completion_tokens=reply.completion_tokens,
             finish_reason=",".join(s.finish_reason or "cancelled" for s in reply.seqs),
             first_token_s=reply.first_token_s)

    async def completions(request: Request) -> Response:
        return await handle(request, "/v1/completions", chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, "/v1/chat/completions", chat=True)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return unauthorized("/v1/models", time.monotonic())
        metrics.request("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "cpmctl"}]})

    async def health(request: Request) -> Response:
        body = {"status": "draining" if state["draining"] else "ok", "model": settings.model_name,
                "running": engine.running, "waiting": engine.waiting}
        return JSONResponse(body, status_code=503 if state["draining"] else 200)

    async def metrics_route(request: Request) -> Response:
        if not authorized(request):
            return unauthorized("/metrics", time.monotonic())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(RequestError(exc.detail, status=exc.status_code).body(), status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        state["draining"] = True
        await run_in_threadpool(engine.close)  # the server has answered every request by now

    app = Starlette(
        routes=[Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_route, methods=["GET"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.serving = state
    return app


class _Reply:
    """The OpenAI objects of one request: the whole body, or its stream chunks."""

    def __init__(self, chat: bool, model: str, seqs: list[Sequence], dec: protocol.Decoding):
        self.chat, self.model, self.seqs, self.dec = chat, model, seqs, dec
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.errors: list[str] = []

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s.prompt_ids) for s in self.seqs)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def first_token_s(self) -> float | None:
        times = [s.first_token_at - s.submitted_at for s in self.seqs if s.first_token_at is not None]
        return round(min(times), 6) if times else None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _choice(self, i: int, s: Sequence) -> dict:
        if self.chat:
            choice = {"index": i, "message": {"role": "assistant", "content": s.text},
                      "logprobs": None, "finish_reason": s.finish_reason}
        else:
            choice = {"index": i, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason}
        if self.dec.return_token_ids:
            choice["token_ids"] = list(s.tokens)
        return choice

    def body(self) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [self._choice(i, s) for i, s in enumerate(self.seqs)], "usage": self.usage()}

    def chunk(self, i: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None and self.dec.return_token_ids:
            choice["token_ids"] = list(self.seqs[i].tokens)
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if self.dec.include_usage:
            out["usage"] = None
        return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(request: Request, reply: _Reply, events: asyncio.Queue, finish: Callable[[int], None]
                  ) -> AsyncIterator[str]:
    """The SSE body; whatever ends it (the last chunk, a client that left, a shutdown) ends in `finish`."""
    status, left = 499, len(reply.seqs)
    try:
        if reply.chat:
            for i in range(len(reply.seqs)):
                yield _sse(reply.chunk(i, None, role=True))
        while left:
            try:
                i, event = await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.kind == "text":
                yield _sse(reply.chunk(i, event.text))
            elif event.kind == "done":
                left -= 1
                yield _sse(reply.chunk(i, None, event.finish_reason))
            else:
                left -= 1
                reply.errors.append(event.message)
                yield _sse(RequestError(f"decoding failed: {event.message}", status=500, type_="server_error").body())
        if reply.dec.include_usage:
            yield _sse({"id": reply.id, "object": "chat.completion.chunk" if reply.chat else "text_completion",
                        "created": reply.created, "model": reply.model, "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
        status = 500 if reply.errors else 200
    finally:
        finish(status)


def _log(settings: ServeSettings, endpoint: str, status: int, started: float, **fields) -> None:
    if settings.log is not None:
        record = {"time": round(time.time(), 3), "endpoint": endpoint, "status": status,
                  "latency_s": round(time.monotonic() - started, 6)}
        record.update({k: v for k, v in fields.items() if v is not None})
        settings.log(record)
