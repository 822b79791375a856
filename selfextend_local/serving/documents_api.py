"""Documents over HTTP: give the server a document, follow its reading, ask about it.

- ``POST /v1/documents?name=NAME``: the document's bytes as the body (text, Markdown, HTML or PDF, read by
  ``qa``'s readers; a form's file part; without a name, its content type or a PDF's signature says which);
  answers its card: id, tokens, the plan that will read it, the KV cache it takes, an estimate of the time
  (from the last document read here), whether the disk cache has it, a reading under way (``reading``:
  state, done and total tokens, rate, time left, followers), and, when no setting reaches it, why not.
- ``GET /v1/documents`` and ``GET /v1/documents/ID``: the cards, from the facts kept with each document
  (nothing is read or tokenized again to list them); ``DELETE /v1/documents/ID``.
- ``POST /v1/documents/ID/read``: server-sent events while the document is read (``waiting``, then
  ``reading`` with the tokens done, tok/s and time left), then ``ready`` (``source``: read, disk or memory).
- ``POST /v1/chat/completions`` with ``"document": ID`` (:mod:`.openai_api`): the last user message is a
  question about the document, answered as ``qa`` answers it: the document held in a slot, the question
  and answer dropped after, the disk cache shared with ``qa``.

A document is read once however many ask for it (:mod:`.readings`): a question, or another tab, on a
document being read waits on that reading (a question streamed with ``return_progress`` reports it) and
uses its result; a reading stops only when nobody follows it; one engine request works on a document at
a time, so the next finds it held where the last one left it. Uploads are read off the event loop and
off the engine's thread (a PDF or HTML in a bounded child process), at most :data:`UPLOADS` at once. A
document's tokens are kept on disk beside it; in memory at most :data:`READY_BYTES` of them, for the
documents used last.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

import llama_cpp
import numpy as np
from fastapi import APIRouter, Request

from ..engine.errors import SelfExtendError, cut
from ..engine.kvcache import tokens_digest
from ..engine.memory import kv_bytes_per_cell
from ..engine.paces import pace_for
from ..engine.planning import Plan
from ..engine.settings import SamplingSettings
from ..engine.slots import Held
from ..engine.slots import Request as EngineRequest
from ..tasks.documents import MAX_FILE_BYTES
from ..tasks.qa import QUESTION_BUDGET, DocumentCache, Pieces, document_prompt, question_tokens
from . import sse
from .http import APIError, Server, http_naming, off_loop, read_body, server_of
from .library import Stored, Upload
from .readings import Reading, Turns, error_body, progress_of

ROOM = QUESTION_BUDGET + SamplingSettings.max_tokens  # a question and its answer after the document, as qa
MAX_ANSWER = SamplingSettings.max_tokens
READY_BYTES = 64 << 20  # documents' tokens kept in memory (4 bytes a token), the least recently used going
UPLOADS = 2  # uploads read at once; the others wait before their bodies are read


@dataclass(frozen=True)
class Document:
    """A stored document made ready for this server's model: its tokens (int32, 4 bytes each) and their
    digest, the key of the disk cache's entry."""

    card: Stored
    tokens: np.ndarray
    digest: str


class Documents:
    """The server's documents: the library on disk, their tokens for this model, the readings going on,
    and the reading speed measured here (for estimates)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ready: OrderedDict[str, Document] = OrderedDict()
        self.lock = threading.Lock()  # the preparation threads share ``ready``
        self.readings: dict[str, Reading] = {}
        self.turns = Turns()
        self.tasks: set[asyncio.Task] = set()
        self.rate: float | None = None  # tokens/s of the last document read here
        self.uploads = asyncio.Semaphore(UPLOADS)
        stat = server.model.path.stat()
        model = f"{server.model.path.name}:{stat.st_size}:{stat.st_mtime_ns}:{server.model.n_vocab}"
        self.key = hashlib.sha256(model.encode()).hexdigest()[:16]  # a document's facts are this model's
        self._after: Pieces | None = None

    async def about(self, request: Request, req, messages: list[dict]):
        """The OpenAI chat endpoint's question on a document (it reaches this module through the app's
        state, so the two modules do not import each other)."""
        return await about_document(request, req, messages)

    # -- a document's tokens (on the preparation threads) ---------------------------------------

    def document(self, ident: str) -> Document:
        """The document ``ident`` made ready (tokenized once, its tokens kept on disk), or a 404."""
        with self.lock:
            if ident in self.ready:
                self.ready.move_to_end(ident)
                return self.ready[ident]
        library = self.server.library
        card = library.card(ident)
        tokens = library.tokens(ident, self.key) if card is not None and self.key in card.facts else None
        if card is not None and tokens is None:
            card, tokens = self._tokenize(card)
        if card is None:
            raise APIError(404, f"no document {cut(ident)!r}; GET /v1/documents lists them", param="document")
        doc = Document(card, tokens, card.facts[self.key]["digest"])
        with self.lock:
            self.ready[ident] = doc
            while sum(d.tokens.nbytes for d in self.ready.values()) > READY_BYTES and len(self.ready) > 1:
                self.ready.popitem(last=False)
        return doc

    def _tokenize(self, card: Stored) -> tuple[Stored | None, np.ndarray | None]:
        library = self.server.library
        text = library.text(card.id)
        if text is None:
            return None, None
        listed, _ = document_prompt(self.server.model, text)
        tokens = np.asarray(listed, dtype=np.int32)
        library.save_tokens(card.id, self.key, tokens)
        noted = library.note(card.id, self.key, {"tokens": len(tokens), "digest": tokens_digest(tokens)})
        return noted, tokens

    def after(self) -> Pieces:
        """The chat template after the document, where a question goes (the same for every document)."""
        if self._after is None:
            self._after = document_prompt(self.server.model, "-")[1]
        return self._after

    def question(self, doc: Document, text: str) -> list[int]:
        """The document's tokens, then the question's (qa's own prompt)."""
        return doc.tokens.tolist() + question_tokens(self.server.model, text, self.after())

    def cache(self, doc: Document, prompt: list[int]) -> DocumentCache:
        """The document's entry in the disk cache, for a request whose ``prompt`` begins with it."""
        n = len(doc.tokens)
        return DocumentCache(self.server.model, prompt if len(prompt) == n else prompt[:n], self.server.kv_cache)

    def held(self, doc: Document, cache: DocumentCache, reading: Reading | None = None) -> Held:
        """The document as the start of a request: held for a question and its answer (as qa holds it);
        a ``reading`` notes when the disk cache gave it."""

        def restore(sequence) -> bool:
            done = cache.restore(sequence)
            if done and reading is not None:
                reading.source = "disk"
            return done

        return Held(len(doc.tokens), ROOM, restore, cache.save)

    # -- cards ----------------------------------------------------------------------------------

    def plan(self, n_tokens: int) -> Plan:
        request = EngineRequest([0], extend=self.server.extend, generate=False, held=Held(n_tokens, ROOM))
        return self.server.serving.plan(request)

    def cards(self, stored: list[Stored]) -> list[dict]:
        """The cards of ``stored`` documents, from their kept facts (a document not yet tokenized for this
        model is, once; one removed meanwhile is left out; one that cannot be read says so)."""
        identities = self.identities()
        found = []
        for card in stored:
            try:
                if self.key not in card.facts:
                    card = self.document(card.id).card
                found.append(self.card(card, identities))
            except APIError:
                continue  # removed while listed
            except Exception as exc:  # a stored document this server cannot use: listed with why
                found.append({**self._base(card), "fits": False, "plan": None, "error": error_body(exc)})
        return found

    def _base(self, card: Stored) -> dict:
        body = {"object": "document", **{k: v for k, v in asdict(card).items() if k != "facts"}}
        reading = self.readings.get(card.id)
        body["tokens"] = card.facts.get(self.key, {}).get("tokens")
        body["reading"] = reading.status() if reading is not None and reading.going else None
        return body

    def card(self, card: Stored, identities: list[dict] | None = None) -> dict:
        """What the page shows before reading: tokens, plan, memory, time, the cache, a reading under way."""
        body = self._base(card)
        n_tokens, digest = body["tokens"], card.facts[self.key]["digest"]
        try:
            plan = self.plan(n_tokens)
        except SelfExtendError as exc:
            return {**body, "fits": False, "plan": None, "error": error_body(exc)}
        runtime = self.server.runtime
        per_cell = kv_bytes_per_cell(self.server.model.info, runtime.kv_type)
        if identities is None:
            identities = self.identities()
        return {
            **body,
            "fits": True,
            "plan": {"group": plan.group, "window": plan.window, "schedule": plan.schedule, "kv_type": runtime.kv_type},
            "kv_bytes": (n_tokens + ROOM) * per_cell,
            "estimate_seconds": round(n_tokens / self.rate, 1) if self.rate else None,
            "cached": self.cached(plan, digest, identities),
            "error": None,
        }

    def identities(self) -> list[dict]:
        """What the disk cache's entries hold (read once a listing)."""
        cache = self.server.kv_cache
        return [entry.meta.get("identity", {}) for entry in cache.entries()] if cache else []

    def cached(self, plan: Plan, digest: str, identities: list[dict]) -> bool:
        """Whether the disk cache has the document as this server reads it (model, build and settings)."""
        wanted = {
            "model": str(self.server.model.path.resolve()),
            "llama_cpp": llama_cpp.__version__,
            "group": plan.group,
            "window": plan.window,
            "schedule": plan.schedule,
            "kv_type": self.server.runtime.kv_type,
            "document": digest,
        }
        return any(all(identity.get(k) == v for k, v in wanted.items()) for identity in identities)

    # -- readings (on the event loop) -----------------------------------------------------------

    def reading(self, doc: Document) -> Reading:
        """The reading of ``doc`` going on, or a new one (it starts when the document's turn comes)."""
        reading = self.readings.get(doc.card.id)
        if reading is not None and reading.going:
            return reading
        try:
            self.plan(len(doc.tokens))  # refused now, not after a wait
        except SelfExtendError as exc:
            raise APIError.of(exc, http_naming("document")) from None
        reading = self.readings[doc.card.id] = Reading(len(doc.tokens), asyncio.get_running_loop())
        task = asyncio.create_task(self._read(doc, reading))
        self.tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.tasks.discard)
        return reading

    async def _read(self, doc: Document, reading: Reading) -> None:
        server = self.server
        release = await self.turns.take(doc.card.id)
        try:
            if reading.cancelled.is_set():  # everyone left while it waited for its turn
                release()
                reading.end("cancelled")
                return
            prompt = await off_loop(server, doc.tokens.tolist)
            cache = self.cache(doc, prompt)
            request = EngineRequest(prompt, extend=server.extend, generate=False, held=self.held(doc, cache, reading))
            if server.kv_cache is not None:  # a stopped reading (a restart too) resumes from its last checkpoint
                request.checkpoints = cache.checkpoints(server.checkpoint_every)
            request.progress, request.on_error = reading.progress, reading.failed
            request.on_start = lambda: _note_memory(reading, request)
            server.serving.plan(request)
            pace = pace_for(server.model.path, server.runtime, request.plan)
            reading.clock = pace.clock()  # from earlier readings of the setup; a whole reading leaves its own
            request.on_finish = lambda: (pace.record(reading.clock, reading.total), reading.finished(), release())
            if not server.serving.admit():
                raise APIError(429, "the server is busy: the request queue is full; retry shortly", code="queue_full")
        except Exception as exc:
            release()
            reading.fail(error_body(exc))
            return
        server.serving.submit(request, reading.cancelled)

    def measured(self, reading: Reading) -> None:
        """Keep the speed of a document read here (not restored), for the next estimates."""
        last = reading.last
        if reading.source == "read" and last.get("state") == "ready" and last.get("seconds"):
            self.rate = reading.total / last["seconds"]


def _note_memory(reading: Reading, request: EngineRequest) -> None:
    reading.started(request.reused)
    if request.reused == reading.total and reading.source != "disk":
        reading.source = "memory"  # a slot held it already


def documents_of(request: Request) -> Documents:
    return request.app.state.documents


async def ask(request: Request, req, question: str):
    """Answer ``question`` about ``req.document``: wait on the document's reading (started if none is
    going on; it ends at once when a slot holds the document), then, in the document's turn, ask in the
    slot that holds it. A stream with ``return_progress`` reports the reading's progress while it waits."""
    from .openai_api import begin, settings_for, stream, whole

    server, documents = server_of(request), documents_of(request)
    settings = await off_loop(server, settings_for, req, server)  # a bad request is refused before any wait
    doc = await off_loop(server, documents.document, req.document)
    try:
        tokens = await off_loop(server, documents.question, doc, question)
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming("messages")) from None
    reading = documents.reading(doc)
    follower = reading.follow()

    async def asked():  # in the document's turn, given back when the engine is done with the question
        release = await documents.turns.take(doc.card.id)
        try:
            held = documents.held(doc, documents.cache(doc, tokens))
            return await begin(request, req, tokens, True, held, settings=settings, finished=release)
        except BaseException:
            release()
            raise

    if not req.stream:
        try:
            async for _ in progress_of(reading, follower, request):
                pass
        finally:
            reading.leave(follower)
        return await whole(request, await asked())

    async def events():
        try:
            try:
                async for progress in progress_of(reading, follower):
                    if req.return_progress:
                        yield sse.event(progress_piece(server, progress))
            finally:
                reading.leave(follower)  # a client gone while it waited: the reading may stop
            begun = await asked()
        except APIError as exc:
            yield sse.event({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}})
            return
        async for piece in stream(begun, req):
            yield piece

    return sse.EventStream(events())


async def about_document(request: Request, req, messages: list[dict]):
    """A chat request whose last user message is a question on a document given to the server (:func:`ask`)."""
    if req.selfextend is not None and req.selfextend.extend_fields():
        raise APIError(
            400,
            "a document is read with the server's setting; leave out selfextend's group, window and schedule",
            param="selfextend",
        )
    if (req.max_completion_tokens or req.max_tokens or 0) > MAX_ANSWER:
        raise APIError(400, f"an answer about a document has at most {MAX_ANSWER} tokens", param="max_tokens")
    asked = [m["content"] for m in messages if m["role"] == "user"]
    if not asked or not asked[-1].strip():
        raise APIError(400, "a question about a document is the last user message; it is empty", param="messages")
    return await ask(request, req, asked[-1])


def progress_piece(server: Server, progress: dict) -> dict:
    from .openai import Reply

    return Reply.new(server.model_id, True).progress_piece(progress)


# -- the routes -------------------------------------------------------------------------------------

router = APIRouter()


@router.post("/v1/documents")
async def upload(request: Request, name: str | None = None) -> dict:
    server, documents = server_of(request), documents_of(request)
    async with documents.uploads:  # the others wait here, their bodies unread
        data = await read_body(request, MAX_FILE_BYTES, "the document")
        given = Upload(data, name, request.headers.get("content-type", ""))
        try:
            card = await off_loop(server, server.library.add, given)
        except SelfExtendError as exc:
            raise APIError.of(exc, http_naming("document")) from None
        del data, given
        doc = await off_loop(server, documents.document, card.id)
    return await off_loop(server, documents.card, doc.card)


@router.get("/v1/documents")
async def listing(request: Request) -> dict:
    server, documents = server_of(request), documents_of(request)
    stored = await off_loop(server, server.library.cards)
    return {"object": "list", "data": await off_loop(server, documents.cards, stored)}


@router.get("/v1/documents/{ident}")
async def one(request: Request, ident: str) -> dict:
    server, documents = server_of(request), documents_of(request)
    doc = await off_loop(server, documents.document, ident)
    return await off_loop(server, documents.card, doc.card)


@router.delete("/v1/documents/{ident}")
async def remove(request: Request, ident: str) -> dict:
    server, documents = server_of(request), documents_of(request)
    if not await off_loop(server, server.library.remove, ident):
        raise APIError(404, f"no document {cut(ident)!r}", param="document")
    with documents.lock:
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
