"""An OpenAI-compatible HTTP API for MiniGPT-4 (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (text and `image_url` parts, `stream: true` as server-sent
events), `GET /v1/models`, `GET /health`. Every error is OpenAI's error JSON with a fitting status.

A request goes: connection caps and the head deadline, Host and Origin checks (`transport`) -> API key
-> JSON body read within its size, time and buffered-bytes bounds -> strict schema validation -> limits
on n, max_tokens, image count, prompt tokens -> image decoding (header-checked) -> the batching
scheduler's bounded queue (429 + Retry-After when full) -> the answer. Parsing and image decoding
run on the thread pool so the event loop keeps serving; the model runs on the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from minigpt4.chat.generation import GenerationSettings
from minigpt4.serve.config import ServeConfig
from minigpt4.serve.engine import ModelEngine, to_conversation
from minigpt4.serve.errors import APIError, error_body
from minigpt4.serve.images import RemoteImages, load_image_url
from minigpt4.serve.scheduler import BatchScheduler, Job, QueueFull, SchedulerClosed
from minigpt4.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ImagePart,
    ModelCard,
    ModelList,
    TooManyMessages,
    Usage,
    describe_validation_error,
)
from minigpt4.serve.transport import (
    BodyReader,
    ConnectionGate,
    RequestGate,
    binds_loopback,
    ensure_file_limit,
    server_config,
)

log = logging.getLogger(__name__)

# How often a waiting non-streamed request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25
# Requests whose images are decoded at the same time: each may hold max_images decoded images in
# memory, so this bounds the server's peak memory under a flood of large images.
_CONCURRENT_PREPARES = 4


@dataclass
class Prepared:
    """A validated request, ready for the scheduler."""

    prompt: str
    images: list[torch.Tensor]
    settings: GenerationSettings
    prompt_tokens: int
    n: int
    stream: bool
    include_usage: bool
    seeded: bool


class ChatService:
    """The request handling behind the routes, holding the engine, the limits and the scheduler."""

    def __init__(self, engine: ModelEngine, config: ServeConfig):
        config.check()
        self.engine = engine
        self.config = config
        self.created = int(time.time())
        self.preparing = asyncio.Semaphore(_CONCURRENT_PREPARES)
        self.remote = RemoteImages(config)
        self.bodies = BodyReader(config)
        self.scheduler = BatchScheduler(
            engine.stream_batch,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.batch_wait_ms / 1000.0,
            max_queue=config.max_queue,
        )

    # ---------------------------------------------------------------- checks

    def check_key(self, request: Request) -> None:
        """Constant-time comparison of the bearer token with the configured key (if any)."""
        if not self.config.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def parse(self, body: bytes) -> ChatCompletionRequest:
        if not body.strip():
            raise APIError(400, "the request body is empty; send a JSON chat completion request", code="invalid_json")
        try:
            limits = {"max_messages": self.config.max_messages}  # counted before the messages are validated
            request = ChatCompletionRequest.model_validate_json(body, context=limits)
        except TooManyMessages as err:
            raise APIError(400, str(err), param="messages", code="too_many_messages") from None
        except ValidationError as err:
            message = describe_validation_error(err)
            code = "invalid_json" if message.startswith("the body is not valid JSON") else "invalid_request"
            raise APIError(400, message, code=code) from None
        if request.model != self.config.model_name:
            raise APIError(
                404, f"model {request.model!r} is not served here; this server serves {self.config.model_name!r}",
                param="model", code="model_not_found",
            )
        field = request.unsupported()
        if field is not None:
            raise APIError(400, f"{field} is not supported by this server; leave it unset", param=field,
                           code="unsupported_parameter")
        self.check_limits(request)
        return request

    def check_limits(self, request: ChatCompletionRequest) -> None:
        """The limits that need no tokenizer (O(1) each), checked right after parsing."""
        cfg = self.config
        if request.n > cfg.max_n:
            raise APIError(400, f"n={request.n} exceeds the limit max_n={cfg.max_n}", param="n", code="n_too_large")
        if request.stream and request.n > 1:
            raise APIError(400, "n > 1 cannot be streamed; use stream=false or n=1", param="n")
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(request, name)
            if value is not None and value > cfg.max_tokens:
                raise APIError(400, f"{name}={value} exceeds the limit max_tokens={cfg.max_tokens}",
                               param=name, code="max_tokens_too_large")

    def prepare(self, request: ChatCompletionRequest, fetched: dict[str, bytes | APIError]) -> Prepared:
        """Apply every limit, render the prompt and decode the images (runs on the thread pool); `fetched`
        holds the request's remote images, fetched before on the event loop."""
        cfg = self.config
        max_new = request.max_completion_tokens or request.max_tokens or cfg.default_max_tokens
        stop = request.stop_list()
        # Flatten messages; count images before decoding any of them.
        turns: list[tuple[str, str, int]] = []
        urls: list[tuple[str, str]] = []  # (url, param path)
        for m, message in enumerate(request.messages):
            if isinstance(message.content, str):
                turns.append((message.role, message.content, 0))
                continue
            texts, images = [], 0
            for p, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    if message.role != "user":
                        raise APIError(400, f"messages.{m}: only user messages may carry images",
                                       param=f"messages.{m}.content.{p}")
                    urls.append((part.image_url.url, f"messages.{m}.content.{p}.image_url.url"))
                    images += 1
                else:
                    texts.append(part.text)
            turns.append((message.role, "\n".join(texts), images))
        if len(urls) > cfg.max_images:
            raise APIError(400, f"the request has {len(urls)} images; the limit is max_images={cfg.max_images}",
                           param="messages", code="too_many_images")
        try:
            conversation = to_conversation(turns, self.engine.system)
            prompt = self.engine.render(conversation)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        at_least = self.engine.min_tokens(prompt)
        prompt_tokens = at_least if at_least > cfg.max_prompt_tokens else self.engine.count_tokens(prompt)
        if prompt_tokens > cfg.max_prompt_tokens:
            raise APIError(
                400, f"the prompt takes {'at least ' if prompt_tokens == at_least else ''}{prompt_tokens} tokens "
                f"(images included); the limit is max_prompt_tokens={cfg.max_prompt_tokens}",
                param="messages", code="context_length_exceeded",
            )
        if prompt_tokens + max_new > cfg.max_context:
            raise APIError(
                400, f"the prompt ({prompt_tokens} tokens) plus max_tokens={max_new} exceeds the limit "
                f"max_context={cfg.max_context}; lower max_tokens or shorten the messages",
                param="max_tokens", code="context_length_exceeded",
            )

        pixels = []
        for index, (url, param) in enumerate(urls):
            image = load_image_url(url, f"image {index} ({param})", param, cfg, fetched)
            pixels.append(self.engine.pixels(image))

        # What the request leaves out is the model's recorded decoding (engine.generation); temperature 0 = greedy.
        generation: dict[str, Any] = {"max_new_tokens": max_new, "stop": stop, "seed": request.seed,
                                      "max_context": cfg.max_context, "max_time": cfg.max_generation_seconds}
        if request.temperature is not None:
            generation["do_sample"] = request.temperature != 0.0
            if request.temperature != 0.0:
                generation["temperature"] = request.temperature
        if request.top_p is not None:
            generation["top_p"] = request.top_p
        try:
            settings = self.engine.generation.replace(**generation)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        sampled = settings.do_sample
        return Prepared(
            prompt=prompt, images=pixels, settings=settings, prompt_tokens=prompt_tokens,
            n=request.n, stream=request.stream,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            seeded=sampled and request.seed is not None,
        )

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(
                429, f"the server is busy: its queue holds max_queue={self.scheduler.max_queue} requests; "
                f"retry after {err.retry_after} s", code="queue_full", headers={"Retry-After": str(err.retry_after)},
            ) from None
        except SchedulerClosed:
            raise APIError(503, "the server is shutting down", code="unavailable", headers={"Retry-After": "5"}) from None

    # ---------------------------------------------------------------- answers

    async def complete(self, request: Request, prepared: Prepared) -> Response:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def on_done(result: Any, error: BaseException | None) -> None:
            _call_in_loop(loop, _settle, future, result, error)

        job = Job(prepared.prompt, prepared.images, prepared.settings, on_done, n=prepared.n, alone=prepared.seeded)
        self.submit(job)
        while not future.done():
            await asyncio.wait({future}, timeout=_DISCONNECT_POLL_S)
            if not future.done() and await request.is_disconnected():
                self.scheduler.cancel(job)  # frees the queue slot; nobody is left to answer
                return Response(status_code=499)
        error = future.exception()
        if error is not None:
            raise _as_api_error(error)
        completions = future.result()
        completion_tokens = sum(c.completion_tokens for c in completions)
        body = ChatCompletion(
            id=_completion_id(),
            created=int(time.time()),
            model=self.config.model_name,
            choices=[
                Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                for i, c in enumerate(completions)
            ],
            usage=Usage(prompt_tokens=prepared.prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prepared.prompt_tokens + completion_tokens),
        )
        return JSONResponse(body.model_dump())

    async def stream(self, prepared: Prepared) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_delta(text: str) -> None:
            _call_in_loop(loop, events.put_nowait, ("delta", text))

        def on_done(result: Any, error: BaseException | None) -> None:
            _call_in_loop(loop, events.put_nowait, ("done", (result, error)))

        job = Job(prepared.prompt, prepared.images, prepared.settings, on_done, on_delta=on_delta,
                  alone=prepared.seeded)
        self.submit(job)  # a full queue is still a plain 429, before any event is sent
        ident, created, model = _completion_id(), int(time.time()), self.config.model_name

        def chunk(delta: Delta, finish: str | None = None) -> str:
            body = ChatCompletionChunk(id=ident, created=created, model=model,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)])
            return _sse(body.model_dump(exclude_none=False))

        async def events_out() -> AsyncIterator[str]:
            yield chunk(Delta(role="assistant", content=""))
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield chunk(Delta(content=value))
                    continue
                completion, error = value
                if error is not None or completion is None:
                    yield _sse(_as_api_error(error or RuntimeError("the stream ended early")).body())
                    return
                # The streamed pieces join to completion.text; the counts come from the generator.
                yield chunk(Delta(), completion.finish_reason)
                if prepared.include_usage:
                    usage = Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                                  total_tokens=completion.prompt_tokens + completion.completion_tokens)
                    tail = ChatCompletionChunk(id=ident, created=created, model=model, choices=[], usage=usage)
                    yield _sse(tail.model_dump())
                yield "data: [DONE]\n\n"
                return
        return _JobStream(
            events_out(), on_close=lambda: self.scheduler.cancel(job), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


class _JobStream(StreamingResponse):
    """A streaming response that calls `on_close` however it ends, even if the client left before
    the first event (then the event generator never starts, so its own cleanup would not run)."""

    def __init__(self, content: AsyncIterator[str], on_close: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Normal end: a no-op. Client gone: the job leaves the queue, or its stream stops at the next token.
            self._on_close()


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run `fn(*args)` on the event loop from the worker thread; a closed loop means nobody listens."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, SchedulerClosed):
        return APIError(503, "the server is shutting down", code="unavailable", headers={"Retry-After": "5"})
    log.error("generation failed: %r", error)
    return APIError(500, "generation failed inside the server; the error is in the server log", code="internal_error")


def create_app(engine: ModelEngine, config: ServeConfig) -> FastAPI:
    """The FastAPI application: routes, error handlers, and the scheduler's start and stop."""
    service = ChatService(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        yield
        service.scheduler.close()

    app = FastAPI(title="minigpt4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.connection_gate = ConnectionGate(config)  # used by the uvicorn protocol that `server_config` makes
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestGate, check_host=binds_loopback(config.host), origins=config.cors_origins)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, str(err)), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error; the error is in the server log",
                                       code="internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = service.scheduler.healthy
        body = {"status": "ok" if healthy else "unavailable", "model": config.model_name,
                **service.scheduler.stats(), "connections": app.state.connection_gate.stats()}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        service.check_key(request)
        cards = ModelList(data=[ModelCard(id=config.model_name, created=service.created)])
        return JSONResponse(cards.model_dump())

    @app.get("/v1/models/{model_id}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        service.check_key(request)
        if model_id != config.model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {config.model_name!r}",
                           code="model_not_found")
        return JSONResponse(ModelCard(id=config.model_name, created=service.created).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        service.check_key(request)
        async with service.bodies.read(request) as body:  # its bytes stay counted until the images are decoded
            parsed = await run_in_threadpool(service.parse, body)
            fetched = await service.remote.fetch_request(parsed)  # a slow image host holds no preparation slot
            async with service.preparing:
                prepared = await run_in_threadpool(service.prepare, parsed, fetched)
        if prepared.stream:
            return await service.stream(prepared)
        return await service.complete(request, prepared)

    return app


def serve(engine: ModelEngine, config: ServeConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    config.check()
    ensure_file_limit(config)
    if not binds_loopback(config.host) and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                    config.host)
    # On Ctrl-C, open streams get 10 s to finish before they are cut.
    uvicorn.Server(server_config(create_app(engine, config), config, timeout_graceful_shutdown=10,
                                 log_level="info")).run()
