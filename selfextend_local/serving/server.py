"""An OpenAI-compatible HTTP server with SelfExtend (FastAPI, uvicorn, SSE through sse-starlette).

Requests run on an engine thread (:mod:`.worker`) that decodes up to ``slots`` of them together
(:mod:`selfextend_local.engine.slots`), each with its own SelfExtend plan, sampling and grammar; waiting
requests sit in a bounded queue, and one more gets an immediate 429. A slot keeps its cache between
requests: a request whose tokens start with what a slot holds ingests only the rest. A client that
disconnects, streaming or not, stops its generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse

from ..engine.errors import InputTooLongError, Interrupted, Naming, SelfExtendError
from ..engine.grammar import ReplyError, Structure, response_format_structure
from ..engine.model import Model
from ..engine.sampling import Chunk, check_grammar
from ..engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from ..engine.slots import Request as EngineRequest
from .openai import Reply
from .worker import Worker

EXTRA_FIELD = "selfextend"  # the extra body field for per-request settings: {"group": 4, "window": 2048, ...}
_DEFAULTS = SamplingSettings()
DISCONNECT_POLL = 0.2  # seconds between checks that a non-streaming client is still there
PREP_THREADS = 2  # threads that turn request bodies into engine requests (tokens, grammars)


def http_naming(input_param: str) -> Naming:
    """Settings as a request names them: ``selfextend.group``, ``max_tokens``; the prompt as ``messages``
    or ``prompt``; the server's own options as its command line does."""
    names = {key: f"{EXTRA_FIELD}.{key}" for key in ("group", "window", "schedule", "division")}
    names.update(input=input_param, ctx="the server's --ctx", llama_log="serve --llama-log")
    names.update(grammar="response_format")  # a request gives a grammar only as a response format
    return Naming(names)


@dataclass(frozen=True)
class ServerLimits:
    queue_size: int = 8
    max_body_bytes: int = 8 << 20
    max_tokens: int = 4096
    slots: int = 1  # requests decoded together
    cells: int = 8192  # KV cells of each slot: the longest request, prompt and max_tokens


class APIError(Exception):
    """An error in the OpenAI shape: status, message, type, param, code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    @classmethod
    def of(cls, exc: SelfExtendError, naming: Naming, status: int = 400, code: str | None = None) -> APIError:
        """A user-caused error, worded and pointed at the request's own field names."""
        param = naming.name(exc.param) if exc.param else None
        return cls(status, exc.render(naming), param=param, code=code)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request bodies ---------------------------------------------------------------------------------


class SelfExtendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    group: int | None = Field(default=None, gt=0)
    window: int | None = Field(default=None, gt=0)
    schedule: str = "neighbor"


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: str
    content: str | list[TextPart] | None = None

    def text(self, index: int) -> str:
        """The content as one string: text parts joined; null only where OpenAI allows it (assistant)."""
        if self.content is None:
            if self.role != "assistant":
                raise APIError(400, f"messages[{index}].content is null", param=f"messages.{index}.content")
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"messages[{index}] has a content part of type {part.type!r}; only text parts are supported",
                    param=f"messages.{index}.content",
                )
        return "".join(part.text for part in self.content)


# OpenAI's fields this server does not honour, with the values that change nothing (accepted); any other
# value is refused by name, as `Llama` refuses the same arguments. Fields that only describe the caller are
# ignored, as OpenAI's own documentation says they may be.
NEUTRAL_FIELDS: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict | None = None
    selfextend: SelfExtendOptions | None = None

    input_param: ClassVar[str] = "prompt"  # how the request names its input, for errors

    def structure(self) -> Structure | None:
        return None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field this server does not honour (or does not know)."""
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED_FIELDS or (key in NEUTRAL_FIELDS and value in NEUTRAL_FIELDS[key]):
                continue
            if key in NEUTRAL_FIELDS:
                message = f"{key} is not supported by this server; leave it out"
            else:
                message = f"unrecognised request field {key!r}"
            raise APIError(400, message, param=key, code="unsupported_field")

    @property
    def reply_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    response_format: dict | None = None

    input_param: ClassVar[str] = "messages"

    def structure(self) -> Structure | None:
        return response_format_structure(self.response_format)


class CompletionRequest(CommonRequest):
    prompt: str


# -- the server's state and the guard in front of it ------------------------------------------------


@dataclass
class Server:
    """What the handlers share: the model, the engine's worker, the limits and the defaults."""

    model: Model
    worker: Worker
    limits: ServerLimits
    extend: ExtendSettings
    api_key: str | None = None
    allowed_hosts: set[str] | None = None
    model_id: str = field(init=False)
    prep: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.model_id = self.model.path.stem
        self.prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="selfextend-prep")


def _bearer_token(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _refusal(request: Request, server: Server) -> APIError | None:
    """Why a request is refused before it is read: wrong key, a foreign Host, a body that is not JSON."""
    if server.api_key and request.url.path != "/health":
        given = _bearer_token(request.headers.get("authorization", ""))
        if not hmac.compare_digest(given.encode(), server.api_key.encode()):
            return APIError(401, "invalid or missing API key", code="invalid_api_key")
    hosts = server.allowed_hosts
    if hosts is not None and request.headers.get("host", "").lower() not in hosts:
        # A loopback server without a key: a page on another site must not reach it through DNS rebinding.
        return APIError(400, "the Host header does not name this server", code="invalid_host")
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return APIError(415, "the request body must be JSON (Content-Type: application/json)")
    return None


class Guard:
    """ASGI middleware: the checks of :func:`_refusal` before any route runs (a plain ASGI layer, so a
    handler still sees its client disconnect)."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = _refusal(Request(scope), self.server)
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def loopback_hosts(host: str, port: int) -> set[str]:
    """Host headers a loopback server answers to: its names with its port (without one only on port 80)."""
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host.strip('[]')}]" if ":" in host else host}
    hosts = {f"{name}:{port}" for name in names}
    return hosts | (names if port == 80 else set())


def create_app(
    model: Model,
    runtime: RuntimeSettings | None = None,
    extend: ExtendSettings | None = None,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    allowed_hosts: set[str] | None = None,
) -> FastAPI:
    """The ASGI app; ``extend`` holds the server's default group/window (None: planned per request).

    ``allowed_hosts``: with no API key, the Host headers a request must carry (None: any).
    """
    limits = limits or ServerLimits()
    worker = Worker(model, runtime or RuntimeSettings(), limits.slots, limits.cells, limits.queue_size)
    server = Server(model, worker, limits, extend or ExtendSettings(), api_key, None if api_key else allowed_hosts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()
        server.prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="selfextend-local", version="1", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, _api_error)
    app.add_middleware(Guard, server=server)
    app.include_router(router)
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


# -- from a request body to an engine request -------------------------------------------------------


def settings_for(req: CommonRequest, server: Server) -> tuple[ExtendSettings, SamplingSettings]:
    """The request's SelfExtend and sampling settings; errors name the request's own fields."""
    limits, base = server.limits, server.extend
    if req.reply_tokens and req.reply_tokens > limits.max_tokens:
        raise APIError(
            400, f"max_tokens {req.reply_tokens} is over this server's limit {limits.max_tokens}", param="max_tokens"
        )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    own = req.selfextend
    try:
        ext = ExtendSettings(
            own.group if own and own.group else base.group,
            own.window if own and own.window else base.window,
            own.schedule if own else base.schedule,
            base.division,
        )
        structure = req.structure()
        if structure is not None:
            check_grammar(server.model.vocab, structure.grammar)
        sampling = SamplingSettings(
            temperature=_DEFAULTS.temperature if req.temperature is None else req.temperature,
            top_p=_DEFAULTS.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
            max_tokens=req.reply_tokens or _DEFAULTS.max_tokens,
            stop=tuple(s for s in stops if s),
            **(structure.fields() if structure else {}),
        )
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming(req.input_param)) from None
    return ext, sampling


class Call:
    """One request's way back from the engine thread: its events on this event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def request(self, tokens: list[int], extend: ExtendSettings, sampling: SamplingSettings) -> EngineRequest:
        return EngineRequest(
            tokens,
            sampling,
            extend,
            on_chunk=self._put,
            on_error=self._put,
            on_finish=lambda: self._put(None),
            on_start=lambda: self._put(STARTED),
        )

    async def next(self, naming: Naming):
        """STARTED, a Chunk, or None at the end; an error from the engine is raised as an APIError."""
        item = await self.events.get()
        if isinstance(item, Interrupted):
            raise APIError(503, "the request was cancelled: the server is stopping", kind="server_error")
        if isinstance(item, ReplyError):
            raise APIError.of(item, naming, status=422, code="reply_not_valid")
        if isinstance(item, SelfExtendError):
            raise APIError.of(item, naming)
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", kind="server_error")
        return item


STARTED = "started"  # the first event of a call: it has a slot, and its prompt is being read


async def start(tokens: list[int], req: CommonRequest, server: Server) -> tuple[Call, AsyncIterator[Chunk]]:
    """Plan the request (a bad one is refused now), queue it, and wait until it has a slot."""
    naming = http_naming(req.input_param)
    extend, sampling = await off_loop(server, settings_for, req, server)
    call = Call(asyncio.get_running_loop())
    request = call.request(tokens, extend, sampling)
    try:
        server.worker.plan(request)
    except InputTooLongError as exc:
        raise APIError.of(exc, naming, code="context_length_exceeded") from None
    except SelfExtendError as exc:
        raise APIError.of(exc, naming) from None
    if not server.worker.admit():
        raise APIError(
            429,
            "the server is busy: the request queue is full; retry shortly",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    server.worker.submit(request, call.cancelled)
    try:
        first = await call.next(naming)  # STARTED once the engine has a slot for it, None if refused
    except BaseException:
        call.cancelled.set()
        raise

    async def chunks() -> AsyncIterator[Chunk]:
        try:
            while first is not None and (item := await call.next(naming)) is not None:
                if item is not STARTED:
                    yield item
        finally:
            call.cancelled.set()  # a no-op once finished; stops generation if the client went away

    return call, chunks()


async def _watch(request: Request, call: Call) -> None:
    """Cancel the call when its (non-streaming) client goes away."""
    while not call.cancelled.is_set():
        if await request.is_disconnected():
            call.cancelled.set()
            return
        await asyncio.sleep(DISCONNECT_POLL)


async def respond(request: Request, req: CommonRequest, tokens: list[int], chat: bool):
    server: Server = request.app.state.server
    call, chunks = await start(tokens, req, server)
    reply = Reply.new(server.model_id, chat)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return EventSourceResponse(_events(chunks, reply, include_usage), ping=15)
    watcher = asyncio.create_task(_watch(request, call))
    try:
        parts, last = [], None
        async for last in chunks:
            parts.append(last.text)
    finally:
        watcher.cancel()
    return reply.whole("".join(parts), last, len(tokens))


async def parse(request: Request, schema: type[CommonRequest]) -> CommonRequest:
    data = await _read_json(request, request.app.state.server.limits.max_body_bytes)
    try:
        req = schema.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    req.refuse_unsupported()
    return req


async def off_loop(server: Server, work, *args):
    """Run ``work(*args)`` on the server's preparation threads: converting a schema, checking a grammar or
    tokenizing 8 MiB of text must not stop the event loop (``/health`` and every other client wait on it)."""
    return await asyncio.get_running_loop().run_in_executor(server.prep, work, *args)


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(400, f"invalid field {param}: {first['msg']}", param=param)


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}", code="malformed_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="malformed_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


# -- the routes -------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/v1/status")
async def status(request: Request) -> dict:
    """What the worker is doing (behind the API key, unlike /health)."""
    server: Server = request.app.state.server
    worker = server.worker
    return {
        "model": server.model_id,
        "queued": worker.pending,
        "busy_slots": worker.busy_slots,
        "slots": worker.slots,
        "cells": worker.cells,
    }


@router.get("/v1/models")
async def models(request: Request) -> dict:
    server: Server = request.app.state.server
    created = int(server.model.path.stat().st_mtime)
    return {
        "object": "list",
        "data": [{"id": server.model_id, "object": "model", "created": created, "owned_by": "local"}],
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = await parse(request, ChatRequest)
    server: Server = request.app.state.server
    messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
    return await respond(request, req, await off_loop(server, chat_tokens, server.model, messages), chat=True)


def chat_tokens(model: Model, messages: list[dict]) -> list[int]:
    """The conversation's tokens through the model's chat template (its lines joined, without one)."""
    try:
        if model.info.chat_template:
            return model.chat_tokens(messages)
        return model.tokenize("\n".join(m["content"] for m in messages))
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming("messages")) from None


def prompt_tokens(model: Model, prompt: str) -> list[int]:
    try:
        return model.tokenize(prompt)
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming("prompt")) from None


@router.post("/v1/completions")
async def completions(request: Request):
    req = await parse(request, CompletionRequest)
    if not req.prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    server: Server = request.app.state.server
    return await respond(request, req, await off_loop(server, prompt_tokens, server.model, req.prompt), chat=False)


async def _events(chunks: AsyncIterator[Chunk], reply: Reply, include_usage: bool):
    """Server-sent events in the OpenAI streaming shape, ending with ``[DONE]``."""
    last = None
    first = True
    try:
        async for last in chunks:
            if last.finish_reason is not None:
                break
            yield {"data": json.dumps(reply.piece(last.text, first=first))}
            first = False
        finish = "length" if last and last.finish_reason == "length" else "stop"
        yield {"data": json.dumps(reply.piece(last.text if last else "", finish=finish))}
        if include_usage and last is not None:
            yield {"data": json.dumps(reply.usage_piece(last, last.prompt_tokens))}
        yield {"data": "[DONE]"}
    except APIError as exc:
        yield {"data": json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}})}
