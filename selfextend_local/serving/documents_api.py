"""Documents over HTTP: give the server a document, follow its reading, ask about it.

- ``POST /v1/documents?name=NAME``: the document's bytes as the body (text, Markdown, HTML or PDF, read by
  ``qa``'s readers); answers its card: id, tokens, the plan that will read it, the KV cache it takes, an
  estimate of the time (from the last document read here), whether the disk cache has it, and, when no
  setting reaches it, why not.
- ``GET /v1/documents`` and ``GET /v1/documents/ID``: the cards; ``DELETE /v1/documents/ID``.
- ``POST /v1/documents/ID/read``: server-sent events while the document is read (``reading``, with the
  tokens done, tok/s and time left), then ``ready`` (``source``: read, disk or memory). A reading is one
  request in one slot; other requests go on beside it. A client that goes away cancels the reading
  unless another follows it.
- ``POST /v1/chat/completions`` with ``"document": ID`` (:mod:`.openai_api`): the last user message is a
  question about the document, answered as ``qa`` answers it: the document held in a slot, the question
  and answer dropped after, the disk cache shared with ``qa``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import llama_cpp
from fastapi import APIRouter, Request

from ..engine.errors import SelfExtendError
from ..engine.eta import Clock
from ..engine.kvcache import tokens_digest
from ..engine.memory import kv_bytes_per_cell
from ..engine.planning import Plan
from ..engine.settings import SamplingSettings
from ..engine.slots import Held
from ..engine.slots import Request as EngineRequest
from ..tasks.documents import MAX_FILE_BYTES
from ..tasks.qa import QUESTION_BUDGET, DocumentCache, Pieces, document_prompt, question_tokens
from . import sse
from .http import APIError, Server, http_naming, off_loop, read_body, server_of
from .library import Stored

ROOM = QUESTION_BUDGET + SamplingSettings.max_tokens  # a question and its answer after the document, as qa
MAX_ANSWER = SamplingSettings.max_tokens
TOKENIZED = 8  # documents whose tokens are kept in memory


@dataclass
class Document:
    """A stored document made ready for this server's model: its tokens and where a question goes."""

    card: Stored
    tokens: list[int]
    after: Pieces
    cache: DocumentCache

    def held(self, restore=None) -> Held:
        """The document as the start of a request: held for a question and its answer (as qa holds it)."""
        return Held(len(self.tokens), ROOM, restore or self.cache.restore, self.cache.save)

    def question(self, text: str) -> list[int]:
        """The document's tokens, then the question's (qa's own prompt)."""
        return self.tokens + question_tokens(self.cache.model, text, self.after)


@dataclass
class Reading:
    """One document being read, for everyone who follows it; the last to leave cancels it."""

    total: int
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    followers: list[asyncio.Queue] = field(default_factory=list)
    last: dict = field(default_factory=dict)
    began: float = field(default_factory=time.perf_counter)
    source: str = "read"
    over: bool = False
    reused: int = 0  # tokens a slot held already when it began (or a checkpoint gave it)
    clock: Clock = field(default_factory=Clock)  # the time left, from the reading's own cost model

    def follow(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.last:
            queue.put_nowait(self.last)
        if self.over:
            queue.put_nowait(None)
        self.followers.append(queue)
        return queue

    def leave(self, queue: asyncio.Queue) -> None:
        self.followers.remove(queue)
        if not self.followers and not self.over:
            self.cancelled.set()

    def publish(self, event: dict | None) -> None:
        if event is None:
            self.over = True
        else:
            self.last = event
        for queue in self.followers:
            queue.put_nowait(event)

    # -- called on the engine's thread ----------------------------------------------------------

    def progress(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.clock.mark(done, now)
        seconds = now - self.began
        rate = (done - self.reused) / seconds if seconds > 0 else 0.0
        left = self.clock.seconds_left(done, total)
        event = {"state": "reading", "done": done, "total": total, "tokens_per_second": round(rate, 1)}
        event.update(resumed=self.reused, seconds_left=None if left is None else round(left, 1))
        self.loop.call_soon_threadsafe(self.publish, event)

    def failed(self, exc: Exception) -> None:
        self.loop.call_soon_threadsafe(self.publish, {"state": "failed", "error": error_body(exc)})

    def finished(self) -> None:
        self.loop.call_soon_threadsafe(self._end, round(time.perf_counter() - self.began, 2))

    def _end(self, seconds: float) -> None:
        if self.last.get("state") != "failed":
            state = "cancelled" if self.cancelled.is_set() else "ready"
            self.publish({"state": state, "source": self.source, "total": self.total, "seconds": seconds})
        self.publish(None)


def error_body(exc: Exception) -> dict:
    if isinstance(exc, APIError):
        return exc.body()["error"]
    if isinstance(exc, SelfExtendError):
        return APIError.of(exc, http_naming("document")).body()["error"]
    return {"message": str(exc), "type": "server_error", "param": None, "code": None}


class Documents:
    """The server's documents: the library on disk, their tokens for this model, the readings going on,
    and the reading speed measured here (for estimates)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ready: OrderedDict[str, Document] = OrderedDict()
        self.readings: dict[str, Reading] = {}
        self.rate: float | None = None  # tokens/s of the last document read here

    def document(self, ident: str) -> Document:
        """The document ``ident`` made ready (tokenized once, kept for the next few), or a 404."""
        if ident in self.ready:
            self.ready.move_to_end(ident)
            return self.ready[ident]
        found = self.server.library.get(ident)
        if found is None:
            raise APIError(404, f"no document {ident!r}; GET /v1/documents lists them", param="document")
        card, text = found
        tokens, after = document_prompt(self.server.model, text)
        doc = Document(card, tokens, after, DocumentCache(self.server.model, tokens, self.server.kv_cache))
        self.ready[ident] = doc
        while len(self.ready) > TOKENIZED:
            self.ready.popitem(last=False)
        return doc

    def plan(self, doc: Document) -> Plan:
        request = EngineRequest(doc.tokens, extend=self.server.extend, generate=False, held=doc.held())
        return self.server.serving.plan(request)

    def card(self, doc: Document) -> dict:
        """What the page shows before reading: tokens, plan, memory, time, and the cache."""
        body = {"object": "document", **asdict(doc.card), "tokens": len(doc.tokens)}
        reading = self.readings.get(doc.card.id)
        body["reading"] = reading.last if reading is not None and not reading.over else None
        try:
            plan = self.plan(doc)
        except SelfExtendError as exc:
            return {**body, "fits": False, "plan": None, "error": error_body(exc)}
        runtime = self.server.runtime
        per_cell = kv_bytes_per_cell(self.server.model.info, runtime.kv_type)
        return {
            **body,
            "fits": True,
            "plan": {"group": plan.group, "window": plan.window, "schedule": plan.schedule, "kv_type": runtime.kv_type},
            "kv_bytes": (len(doc.tokens) + ROOM) * per_cell,
            "estimate_seconds": round(len(doc.tokens) / self.rate, 1) if self.rate else None,
            "cached": self.cached(doc, plan),
            "error": None,
        }

    def cached(self, doc: Document, plan: Plan) -> bool:
        """Whether the disk cache has the document as this server reads it (model, build and settings)."""
        if self.server.kv_cache is None:
            return False
        wanted = {
            "model": str(self.server.model.path.resolve()),
            "llama_cpp": llama_cpp.__version__,
            "group": plan.group,
            "window": plan.window,
            "schedule": plan.schedule,
            "kv_type": self.server.runtime.kv_type,
            "document": tokens_digest(doc.tokens),
        }
        for entry in self.server.kv_cache.entries():
            identity = entry.meta.get("identity", {})
            if all(identity.get(k) == v for k, v in wanted.items()):
                return True
        return False

    def reading(self, doc: Document) -> Reading:
        """The reading of ``doc`` going on, or a new one handed to the engine."""
        reading = self.readings.get(doc.card.id)
        if reading is not None and not reading.over:
            return reading
        reading = Reading(len(doc.tokens), asyncio.get_running_loop())

        def restore(sequence) -> bool:
            done = doc.cache.restore(sequence)
            if done:
                reading.source = "disk"
            return done

        request = EngineRequest(doc.tokens, extend=self.server.extend, generate=False, held=doc.held(restore))
        if self.server.kv_cache is not None:
            request.checkpoints = doc.cache.checkpoints(self.server.checkpoint_every)
        request.progress, request.on_error, request.on_finish = reading.progress, reading.failed, reading.finished
        request.on_start = lambda: _note_memory(reading, request)
        serving = self.server.serving
        try:
            serving.plan(request)
        except SelfExtendError as exc:
            raise APIError.of(exc, http_naming("document")) from None
        if not serving.admit():
            raise APIError(429, "the server is busy: the request queue is full; retry shortly", code="queue_full")
        serving.submit(request, reading.cancelled)
        self.readings[doc.card.id] = reading
        return reading

    def measured(self, reading: Reading) -> None:
        """Keep the speed of a document read here (not restored), for the next estimates."""
        last = reading.last
        if reading.source == "read" and last.get("state") == "ready" and last.get("seconds"):
            self.rate = reading.total / last["seconds"]


def _note_memory(reading: Reading, request: EngineRequest) -> None:
    reading.reused = request.reused
    reading.clock.mark(request.reused, time.perf_counter())  # the reading's first point: where it starts
    if request.reused == reading.total and reading.source != "disk":
        reading.source = "memory"  # a slot held it already


def documents_of(request: Request) -> Documents:
    return request.app.state.documents


# -- the routes -------------------------------------------------------------------------------------

router = APIRouter()


@router.post("/v1/documents")
async def upload(request: Request, name: str = "document.txt") -> dict:
    server = server_of(request)
    data = await read_body(request, MAX_FILE_BYTES, "the document")
    kind = request.headers.get("content-type", "")
    try:
        card, _ = await off_loop(server, server.library.add, data, name, kind)
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming("document")) from None
    documents = documents_of(request)
    doc = await off_loop(server, documents.document, card.id)
    return documents.card(doc)


@router.get("/v1/documents")
async def listing(request: Request) -> dict:
    server, documents = server_of(request), documents_of(request)
    cards = await off_loop(server, server.library.cards)
    found = [await off_loop(server, documents.document, card.id) for card in cards]
    return {"object": "list", "data": [documents.card(doc) for doc in found]}


@router.get("/v1/documents/{ident}")
async def one(request: Request, ident: str) -> dict:
    documents = documents_of(request)
    return documents.card(await off_loop(server_of(request), documents.document, ident))


@router.delete("/v1/documents/{ident}")
async def remove(request: Request, ident: str) -> dict:
    server, documents = server_of(request), documents_of(request)
    if not server.library.remove(ident):
        raise APIError(404, f"no document {ident!r}", param="document")
    documents.ready.pop(ident, None)
    return {"id": ident, "object": "document", "deleted": True}


@router.post("/v1/documents/{ident}/read")
async def read(request: Request, ident: str):
    documents = documents_of(request)
    doc = await off_loop(server_of(request), documents.document, ident)
    reading = documents.reading(doc)
    queue = reading.follow()

    async def events():
        try:
            while (event := await queue.get()) is not None:
                yield sse.event(event)
            documents.measured(reading)
            yield sse.DONE
        finally:
            reading.leave(queue)  # the last follower gone mid-reading cancels it

    return sse.EventStream(events())
