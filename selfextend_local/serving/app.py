"""The HTTP server's application: one engine thread, the guard in front of every route, and the APIs.

Requests run on a :class:`~selfextend_local.engine.scheduler.ServingThread` that decodes up to its slots'
number of them together, each with its own SelfExtend plan, sampling and grammar; waiting requests sit in
a bounded queue, and one more gets an immediate 429. A slot keeps its cache between requests: a request
whose tokens start with what a slot holds ingests only the rest. The APIs: OpenAI's
(:mod:`.openai_api`), Ollama's (:mod:`.ollama_api`), documents (:mod:`.documents_api`), and a page to
use them (:mod:`.page`).
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import scheduler
from ..engine.capacity import Capacity
from ..engine.errors import cut
from ..engine.kvcache import KVCache, default_dir
from ..engine.model import Model
from ..engine.settings import CHECKPOINT_SECONDS, DRAFT, ExtendSettings, RuntimeSettings
from .http import APIError, Server, server_of
from .library import Library
from .limits import ServerLimits


def _bearer_token(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


OPEN_PATHS = frozenset({"/health", "/"})  # answered without the API key (the page asks for it)
UPLOADS = frozenset({"/v1/documents"})  # bodies that are documents, not JSON


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _refusal(request: Request, server: Server) -> APIError | None:
    """Why a request is refused before it is read: wrong key, a foreign Host, a body that is not JSON."""
    if server.api_key and not _open(request.url.path):
        given = _bearer_token(request.headers.get("authorization", ""))
        if not hmac.compare_digest(given.encode(), server.api_key.encode()):
            return APIError(401, "invalid or missing API key", code="invalid_api_key")
    hosts = server.allowed_hosts
    if hosts is not None and request.headers.get("host", "").lower() not in hosts:
        # A loopback server without a key: a page on another site must not reach it through DNS rebinding.
        return APIError(400, "the Host header does not name this server", code="invalid_host")
    if request.method == "POST" and request.url.path not in UPLOADS:
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
            request = Request(scope)
            refusal = _refusal(request, self.server)
            if refusal is not None:
                await error_response(request, refusal)(scope, receive, send)
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
    capacity: Capacity | None = None,
    kv_cache: KVCache | None = None,
    documents: Path | None = None,
    checkpoint_every: float = CHECKPOINT_SECONDS,
    draft: int = DRAFT,
) -> FastAPI:
    """The ASGI app; ``extend`` holds the server's SelfExtend setting (None fields: planned per request),
    ``capacity`` its slots and cells (default: :func:`~selfextend_local.engine.scheduler.size`'s choice);
    documents given to it are kept in ``documents`` (default: a folder in the disk cache's) and read ones
    in ``kv_cache`` (None: not kept), where long readings are checkpointed every ``checkpoint_every`` seconds.
    ``draft``: tokens a request drafts a step from its own text when it does not say (:mod:`~..engine.drafting`).

    ``allowed_hosts``: with no API key, the Host headers a request must carry (None: any).
    """
    from . import documents_api, ollama_api, openai_api, page

    runtime, extend, limits = runtime or RuntimeSettings(), extend or ExtendSettings(), limits or ServerLimits()
    chosen = capacity or scheduler.size(model, runtime, extend)
    if model.info.chat_template:
        model.chat_tokens([{"role": "user", "content": "warm"}])  # the template compiles once, not on a request
    serving = scheduler.ServingThread(
        lambda: scheduler.Scheduler.create(model, runtime, capacity=chosen, prompt_cache=limits.prompt_cache_bytes),
        limits.queue_size,
    )
    library = Library(documents or default_dir() / "documents")
    hosts = None if api_key else allowed_hosts
    server = Server(model, serving, runtime, limits, extend, library, kv_cache, api_key, hosts, checkpoint_every, draft)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        serving.stop()
        server.prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="selfextend-local", version="1", lifespan=lifespan)
    app.state.server = server
    app.state.documents = documents_api.Documents(server)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(Guard, server=server)
    for routes in (router, openai_api.router, ollama_api.router, documents_api.router, page.router):
        app.include_router(routes)
    return app


def error_response(request: Request, exc: APIError) -> JSONResponse:
    """The error in the shape of the API it came to: Ollama's ``{"error": "..."}`` under /api/, else
    OpenAI's."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
    return exc.response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request, exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method a route does not take) in the API's shape, naming
    what was asked for."""
    what = f"{request.method} {cut(request.url.path)}"
    said = {404: "no such endpoint", 405: "the endpoint does not take this method"}.get(exc.status_code, exc.detail)
    code = "not_found" if exc.status_code == 404 else None
    return error_response(request, APIError(exc.status_code, f"{what}: {said}", code=code, headers=exc.headers))


router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/v1/status")
async def status(request: Request) -> dict:
    """What the engine thread is doing (behind the API key, unlike /health)."""
    server = server_of(request)
    serving = server.serving
    busy = serving.busy_slots
    return {
        "model": server.model_id,
        # waiting for a slot: the places taken (running and waiting, ServingThread.pending) less those in slots
        "queued": max(0, serving.pending - busy),
        "busy_slots": busy,
        "slots": serving.slots,
        "cells": serving.cells,
        "kv_type": server.runtime.kv_type,
    }


class UvicornServer(uvicorn.Server):
    """uvicorn's server that, on a stop (Ctrl-C, SIGTERM), first cancels every request of the app's engine:
    a stream ends at once with its last chunk and a request still waiting gets a 503, where otherwise each
    would be cut when uvicorn's graceful-shutdown timeout ran out."""

    async def shutdown(self, sockets=None) -> None:
        self.config.app.state.server.serving.stop(wait=False)
        await super().shutdown(sockets)
