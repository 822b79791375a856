"""What every HTTP API of the server shares: its state, errors in the OpenAI shape, reading a JSON body, and
the way from a request body to the engine and back.

A handler turns its body into an engine :class:`~selfextend_local.engine.slots.Request` (tokens and
settings, prepared on :data:`Server.prep` threads, off the event loop), then :func:`start` plans it (a
bad one is refused before it waits), takes a place in the queue (429 when full) and hands it to the
:class:`~selfextend_local.engine.scheduler.ServingThread`; the request's events come back on this event
loop through its :class:`Call`: STARTED once it has a slot, :class:`Progress` while its prompt is read
(when asked for), then its chunks, then the end. A client that goes away cancels its call.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ..engine.checkpoint import Checkpointing
from ..engine.errors import InputTooLongError, Interrupted, Naming, SelfExtendError, cut
from ..engine.eta import Clock
from ..engine.grammar import ReplyError
from ..engine.kvcache import KVCache
from ..engine.model import Model
from ..engine.paces import pace_for
from ..engine.scheduler import ServingThread
from ..engine.settings import CHECKPOINT_SECONDS, DRAFT, ExtendSettings, RuntimeSettings
from ..engine.slots import Request as EngineRequest
from .library import Library
from .limits import ServerLimits

EXTRA_FIELD = "selfextend"  # the extra body field for per-request settings: {"group": 4, "window": 2048, ...}
DISCONNECT_POLL = 0.2  # seconds between checks that a non-streaming client is still there
PREP_THREADS = 2  # threads that turn request bodies into engine requests (tokens, grammars)


def http_naming(input_param: str) -> Naming:
    """Settings as a request names them: ``selfextend.group``, ``max_tokens``; the prompt as ``messages``
    or ``prompt``; the server's own options as its command line does."""
    names = {key: f"{EXTRA_FIELD}.{key}" for key in ("group", "window", "schedule", "division", "draft")}
    names.update(input=input_param, ctx="the server's --ctx", llama_log="serve --llama-log")
    names.update(grammar="response_format")  # a request gives a grammar only as a response format
    return Naming(names)


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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Server:
    """What the handlers share: the model, the serving thread, the limits, the default settings, the
    documents given to it and the disk cache of read documents."""

    model: Model
    serving: ServingThread
    runtime: RuntimeSettings
    limits: ServerLimits
    extend: ExtendSettings
    library: Library
    kv_cache: KVCache | None = None
    api_key: str | None = None
    allowed_hosts: set[str] | None = None
    checkpoint_every: float = CHECKPOINT_SECONDS  # seconds of a long reading between its checkpoints
    draft: int = DRAFT  # tokens a request drafts a step when it does not say (engine/drafting.py)
    model_id: str = field(init=False)
    prep: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.model_id = self.model.path.stem
        self.prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="selfextend-prep")


def server_of(request: Request) -> Server:
    return request.app.state.server


async def off_loop(server: Server, work: Callable, *args):
    """Run ``work(*args)`` on the server's preparation threads: converting a schema, checking a grammar or
    tokenizing 8 MiB of text must not stop the event loop (``/health`` and every other client wait on it)."""
    return await asyncio.get_running_loop().run_in_executor(server.prep, work, *args)


# -- bodies -----------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, what: str = "request body") -> bytes:
    """The body, at most ``limit`` bytes: a 413 as soon as it says or shows it is larger."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"{what} is over {limit:,} bytes", code="body_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, at most ``limit`` bytes (413 beyond), else a 400 that says why."""
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}", code="malformed_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="malformed_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


async def parse(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The body validated against ``schema`` (a 400 naming the first field at fault); a schema with
    ``refuse_unsupported`` refuses the fields it does not honour."""
    data = await read_json(request, server_of(request).limits.max_body_bytes)
    try:
        body = schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = cut(".".join(str(p) for p in first["loc"])) or None
        raise APIError(400, f"invalid field {param}: {first['msg']}", param=param) from None
    if hasattr(body, "refuse_unsupported"):
        body.refuse_unsupported()
    return body


# -- to the engine and back -------------------------------------------------------------------------


def chat_tokens(model: Model, messages: list[dict], input_param: str = "messages") -> list[int]:
    """The conversation's tokens through the model's chat template (its lines joined, without one)."""
    try:
        if model.info.chat_template:
            return model.chat_tokens(messages)
        return model.tokenize("\n".join(m["content"] for m in messages))
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming(input_param)) from None


def prompt_tokens(model: Model, prompt: str, special: bool = False) -> list[int]:
    """A prompt's tokens (``special``: control-token syntax in it is parsed, as a raw prompt wants)."""
    try:
        return model.tokenize(prompt, parse_special=special)
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming("prompt")) from None


STARTED = "started"  # the first event of a call: it has a slot, and its prompt is being read


@dataclass(frozen=True)
class Progress:
    """How far the prompt has been read: llama.cpp's server reports ``total``, ``cache`` (reused, or
    restored from a checkpoint), ``processed`` (read, reused included) and ``time_ms`` (since reading
    began); ``eta_ms`` is ours: the time left, by the reading's cost model (None until it can tell)."""

    total: int
    cache: int
    processed: int
    time_ms: int
    eta_ms: int | None = None

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "cache": self.cache,
            "processed": self.processed,
            "time_ms": self.time_ms,
            "eta_ms": self.eta_ms,
        }


class Call:
    """One request's way back from the engine thread: its events on this event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, naming: Naming) -> None:
        self.loop = loop
        self.naming = naming
        # arrived and not yet taken, and the future :meth:`next` waits on (an asyncio.Queue's getters and
        # wake-ups cost the event loop more a streamed token)
        self.events: deque = deque()
        self.waiter: asyncio.Future | None = None
        self.cancelled = threading.Event()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item) -> None:
        self.events.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def wire(self, request: EngineRequest, progress: bool = False, server: Server | None = None) -> EngineRequest:
        """Route ``request``'s events here (with ``progress``, the prompt's too: its time left from the
        ``server``'s earlier readings of the same setup, :mod:`..engine.paces`, and it leaves its own)."""
        request.on_chunk = request.on_error = self._put
        request.on_finish = lambda: self._put(None)
        request.on_start = lambda: self._put(STARTED)
        if progress:
            began = time.perf_counter()
            clock, pace = Clock(), None

            def start() -> None:  # the request has its slot, and its plan: the setup is known
                nonlocal clock, pace
                if server is not None and request.plan is not None:
                    pace = pace_for(server.model.path, server.runtime, request.plan)
                    clock = pace.clock()
                self._put(STARTED)
                report(request.reused, len(request.prompt))

            def report(done: int, total: int) -> None:
                now = time.perf_counter()
                clock.mark(done, now)
                left = clock.seconds_left(done, total)
                eta = None if left is None else int(left * 1000)
                self._put(Progress(total, request.reused, done, int((now - began) * 1000), eta))
                if done >= total and pace is not None:
                    pace.record(clock, total)

            request.progress, request.on_start = report, start
        return request

    async def next(self):
        """STARTED, a Progress, a Chunk, or None at the end; an error from the engine is raised as an APIError."""
        while not self.events:
            self.waiter = self.loop.create_future()
            await self.waiter
        item = self.events.popleft()
        if isinstance(item, Interrupted):
            raise APIError(503, "the request was cancelled: the server is stopping", kind="server_error")
        if isinstance(item, ReplyError):
            raise APIError.of(item, self.naming, status=422, code="reply_not_valid")
        if isinstance(item, SelfExtendError):
            raise APIError.of(item, self.naming)
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", kind="server_error")
        return item


async def start(server: Server, call: Call, request: EngineRequest) -> AsyncIterator:
    """Plan ``request`` (a bad one is refused now), queue it, wait until it has a slot; then its events
    (Progress and Chunk) as they come. The call is cancelled when the iterator is closed early."""
    try:
        server.serving.plan(request)
    except InputTooLongError as exc:
        raise APIError.of(exc, call.naming, code="context_length_exceeded") from None
    except SelfExtendError as exc:
        raise APIError.of(exc, call.naming) from None
    if not server.serving.admit():
        raise APIError(
            429,
            "the server is busy: the request queue is full; retry shortly",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if request.checkpoints is None and request.held is None:  # the same prompt after a restart resumes
        request.checkpoints = Checkpointing(server.kv_cache, server.checkpoint_every)(request.prompt)
    server.serving.submit(request, call.cancelled)
    try:
        first = await call.next()  # STARTED once the engine has a slot for it, None if refused
    except BaseException:
        call.cancelled.set()
        raise

    async def events() -> AsyncIterator:
        try:
            while first is not None and (item := await call.next()) is not None:
                if item is not STARTED:
                    yield item
        finally:
            call.cancelled.set()  # a no-op once finished; stops generation if the client went away

    return events()


async def watch(request: Request, call: Call) -> None:
    """Cancel the call when its (non-streaming) client goes away."""
    while not call.cancelled.is_set():
        if await request.is_disconnected():
            call.cancelled.set()
            return
        await asyncio.sleep(DISCONNECT_POLL)


def served_by(request: EngineRequest, runtime: RuntimeSettings) -> dict:
    """Which SelfExtend setting served a request (every response carries it beside ``usage``)."""
    plan = request.plan
    return {"group": plan.group, "window": plan.window, "schedule": plan.schedule, "kv_type": runtime.kv_type}
