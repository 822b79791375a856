"""An OpenAI-compatible HTTP server with SelfExtend (FastAPI, uvicorn, SSE through sse-starlette).

Requests run on an engine thread (:mod:`selfextend_local.worker`) that decodes up to ``slots`` of them
together (:mod:`selfextend_local.batching`), each with its own SelfExtend plan and sampling; waiting
requests sit in a bounded queue, and one more gets an immediate 429. A slot keeps its cache between
requests: a request whose tokens start with what a slot holds ingests only the rest. A client that
disconnects mid-stream stops its generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse

from .errors import BadInputError, InputTooLongError, SelfExtendError
from .generate import Chunk
from .model import Model
from .settings import SCHEDULES, ExtendSettings, RuntimeSettings, SamplingSettings
from .worker import Job, Worker

EXTRA_FIELD = "selfextend"  # the extra body field for per-request settings: {"group": 4, "window": 2048, ...}
_DEFAULTS = SamplingSettings()


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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class SelfExtendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: int | None = Field(default=None, gt=0)
    window: int | None = Field(default=None, gt=0)
    schedule: str = "neighbor"


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
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


class CommonRequest(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict | None = None
    selfextend: SelfExtendOptions | None = None


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(CommonRequest):
    prompt: str


async def _next_item(job: Job):
    """The worker's next item for ``job``: STARTED, a Chunk, or None at the end; errors are raised."""
    item = await job.out.get()
    if isinstance(item, SelfExtendError):
        raise APIError(400, str(item))
    if isinstance(item, Exception):
        raise APIError(500, f"generation failed: {item}", kind="server_error")
    return item


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


def _bearer_token(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _host_name(header: str) -> str:
    """The host part of a Host header: ``[::1]:8080`` -> ``::1``, ``localhost:8080`` -> ``localhost``."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _refusal(request: Request, api_key: str | None, allowed_hosts: set[str] | None) -> APIError | None:
    """Why a request is refused before it is read: wrong key, a foreign Host, a body that is not JSON."""
    if api_key and request.url.path != "/health":
        given = _bearer_token(request.headers.get("authorization", ""))
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return APIError(401, "invalid or missing API key", code="invalid_api_key")
    if allowed_hosts is not None and _host_name(request.headers.get("host", "")).lower() not in allowed_hosts:
        # A loopback server without a key: a page on another site must not reach it through DNS rebinding.
        return APIError(400, "the Host header does not name this server", code="invalid_host")
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return APIError(415, "the request body must be JSON (Content-Type: application/json)")
    return None


def loopback_names(host: str) -> set[str]:
    """Host header names a loopback server answers to."""
    return {"localhost", "127.0.0.1", "::1", host.strip("[]").lower()}


def create_app(
    model: Model,
    runtime: RuntimeSettings | None = None,
    extend: ExtendSettings | None = None,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    allowed_hosts: set[str] | None = None,
) -> FastAPI:
    """The ASGI app; ``extend`` holds the server's default group/window (None: planned per request).

    ``allowed_hosts``: with no API key, the Host names a request must carry (None: any).
    """
    runtime = runtime or RuntimeSettings()
    limits = limits or ServerLimits()
    base_extend = extend or ExtendSettings()
    allowed_hosts = None if api_key else allowed_hosts
    model_id = model.path.stem
    worker = Worker(model, runtime, limits.slots, limits.cells, limits.queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    app = FastAPI(title="selfextend-local", version="1", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        refusal = _refusal(request, api_key, allowed_hosts)
        if refusal is not None:
            return refusal.response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/status")
    async def status() -> dict:
        """What the worker is doing (behind the API key, unlike /health)."""
        return {"model": model_id, "queued": worker.pending, "slots": worker.slots, "cells": worker.cells}

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(model.path.stat().st_mtime)
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "local"}],
        }

    def settings_for(req: CommonRequest) -> tuple[ExtendSettings, SamplingSettings]:
        if req.max_tokens and req.max_tokens > limits.max_tokens:
            raise APIError(
                400, f"max_tokens {req.max_tokens} is over this server's limit {limits.max_tokens}", param="max_tokens"
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        own = req.selfextend
        try:
            if own and own.schedule not in SCHEDULES:
                raise BadInputError(f"unknown schedule {own.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
            ext = ExtendSettings(
                own.group if own and own.group else base_extend.group,
                own.window if own and own.window else base_extend.window,
                own.schedule if own else base_extend.schedule,
                base_extend.division,
            )
        except BadInputError as exc:
            raise APIError(400, str(exc), param=EXTRA_FIELD) from None
        try:
            sampling = SamplingSettings(
                temperature=_DEFAULTS.temperature if req.temperature is None else req.temperature,
                top_p=_DEFAULTS.top_p if req.top_p is None else req.top_p,
                seed=req.seed,
                max_tokens=req.max_tokens or _DEFAULTS.max_tokens,
                stop=tuple(s for s in stops if s),
            )
        except BadInputError as exc:
            raise APIError(400, str(exc).replace("--", ""), param="stop" if "stop" in str(exc) else None) from None
        return ext, sampling

    async def run_job(tokens: list[int], req: CommonRequest) -> tuple[Job, AsyncIterator[Chunk]]:
        ext, sampling = settings_for(req)
        job = Job(tokens, ext, sampling, asyncio.get_running_loop(), asyncio.Queue())
        try:
            worker.plan(job)
        except InputTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except BadInputError as exc:
            raise APIError(400, str(exc), param=EXTRA_FIELD) from None
        if not worker.admit():
            raise APIError(
                429,
                "the server is busy: the request queue is full; retry shortly",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        worker.submit(job)
        try:
            first = await _next_item(job)  # STARTED once the worker has a session for it, or an error
        except BaseException:
            job.cancelled.set()
            raise

        async def chunks() -> AsyncIterator[Chunk]:
            try:
                while first is not None and (item := await _next_item(job)) is not None:
                    yield item
            finally:
                job.cancelled.set()  # a no-op once finished; stops generation if the client went away

        return job, chunks()

    async def respond(req: CommonRequest, tokens: list[int], chat: bool):
        _, chunks = await run_job(tokens, req)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return EventSourceResponse(_events(chunks, rid, created, model_id, chat, include_usage), ping=15)
        parts, last = [], None
        async for last in chunks:
            parts.append(last.text)
        text = "".join(parts)
        choice = {"index": 0, "finish_reason": _finish(last)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model_id,
            "choices": [choice],
            "usage": _usage(last, len(tokens)),
        }

    async def parse(request: Request, schema: type[CommonRequest]):
        data = await _read_json(request, limits.max_body_bytes)
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
        try:
            tokens = (
                model.chat_tokens(messages)
                if model.info.chat_template
                else model.tokenize("\n".join(m["content"] for m in messages))
            )
        except SelfExtendError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return await respond(req, tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        if not req.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return await respond(req, model.tokenize(req.prompt), chat=False)

    return app


def _finish(chunk: Chunk | None) -> str:
    return "length" if chunk and chunk.finish_reason == "length" else "stop"


def _usage(chunk: Chunk | None, prompt_tokens: int) -> dict:
    """OpenAI's usage, with the prompt tokens reused from the cache as ``cached_tokens``."""
    completion = chunk.generated_tokens if chunk else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": chunk.reused_tokens if chunk else 0},
    }


async def _events(chunks, rid: str, created: int, model_id: str, chat: bool, include_usage: bool):
    """Server-sent events in the OpenAI streaming shape, ending with ``[DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    last = None
    first = True
    try:
        async for last in chunks:
            if last.finish_reason is not None:
                break
            if chat:
                delta = {"role": "assistant", "content": last.text} if first else {"content": last.text}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": last.text, "logprobs": None, "finish_reason": None}
            first = False
            yield {
                "data": json.dumps(
                    {"id": rid, "object": kind, "created": created, "model": model_id, "choices": [choice]}
                )
            }
        tail = {"index": 0, "finish_reason": _finish(last)}
        tail.update(
            {"delta": {"content": last.text if last else ""}}
            if chat
            else {"text": last.text if last else "", "logprobs": None}
        )
        yield {
            "data": json.dumps({"id": rid, "object": kind, "created": created, "model": model_id, "choices": [tail]})
        }
        if include_usage and last is not None:
            yield {
                "data": json.dumps(
                    {
                        "id": rid,
                        "object": kind,
                        "created": created,
                        "model": model_id,
                        "choices": [],
                        "usage": _usage(last, last.prompt_tokens),
                    }
                )
            }
        yield {"data": "[DONE]"}
    except APIError as exc:
        yield {"data": json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}})}
