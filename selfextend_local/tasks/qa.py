"""Questions about one long document: ingest it once (or restore it from the cache), then answer each
question by ingesting only the question.

After the document, the session is *held* (see :meth:`Session.hold`): questions and answers are appended
without grouping, so dropping them restores the document's state exactly, with no copy of it in memory.
The on-disk cache entry is written by llama.cpp a layer at a time, after the first answer rather than
while the user waits for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from ..engine import checkpoint, state
from ..engine.errors import EngineError, InputTooLongError
from ..engine.generate import stream_generate
from ..engine.kvcache import CacheWriteError, KVCache
from ..engine.model import Model
from ..engine.sampling import Chunk
from ..engine.session import open_session
from ..engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from ..engine.slots import Progress

SYSTEM = "Answer the question using the document. Be brief and precise."
QUESTION_BUDGET = 256  # tokens reserved for each question in the context
_SLOT = "\x00QUESTION\x00"

Pieces = list[tuple[str, bool]]


def document_prompt(model: Model, document: str) -> tuple[list[int], Pieces]:
    """The prompt's tokens up to where the question goes, and the template's pieces after it."""
    user = f"Document:\n{document}\n\nQuestion:{_SLOT}"
    if model.info.chat_template:
        pieces = model.chat_segments([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    else:
        pieces = [(f"{SYSTEM}\n\n", True), (user, False), ("\nAnswer:", True)]
    at = next(i for i, (text, _) in enumerate(pieces) if _SLOT in text)
    head, _, tail = pieces[at][0].rpartition(_SLOT)  # the document's own text may hold the mark too
    return model.segments_tokens(pieces[:at] + [(head, False)]), [(tail, False)] + pieces[at + 1 :]


def question_tokens(model: Model, question: str, after: Pieces) -> list[int]:
    """The question (user text: special-token syntax in it is not parsed) and the template's tail."""
    tokens = model.segments_tokens([(" " + question.strip(), False)] + after, bos=False)
    if len(tokens) > QUESTION_BUDGET:
        raise InputTooLongError(
            "the question has {n} tokens; keep it under {most}", param="question", n=len(tokens), most=QUESTION_BUDGET
        )
    return tokens


class DocumentCache:
    """A document's state in the disk cache (:class:`~..engine.kvcache.KVCache`), for any sequence that
    holds it: a qa session, or a slot of the server's. The entry is keyed by what the state depends on, so
    a document read by ``qa`` opens at once in the server, and the other way round."""

    def __init__(self, model: Model, doc_tokens: list[int], cache: KVCache | None) -> None:
        self.model, self.doc_tokens, self.cache = model, doc_tokens, cache
        self.warnings: list[str] = []
        self._checkpoints: checkpoint.Checkpoints | None = None

    def identity(self, sequence) -> dict:
        """What a cached state must match: model file, build, settings and the document's tokens."""
        return checkpoint.identity(self.model, sequence, self.doc_tokens)

    def cached(self, sequence) -> bool:
        """Whether the cache has an entry for this document as ``sequence`` would hold it (not verified)."""
        return self.cache is not None and self.cache.has(self.identity(sequence))

    def restore(self, sequence) -> bool:
        """Load the document's state into ``sequence`` from the cache; False (and an empty sequence) when
        there is none, or llama.cpp or the schedule will not take it (that entry is deleted)."""
        if self.cache is None:
            return False
        identity = self.identity(sequence)
        with self.cache.open(identity) as entry:
            if entry is None:
                return False
            try:
                state.load_file(sequence, entry.state_path, entry.schedule_state)
            except EngineError:
                failed = True
            else:
                failed = sequence.tokens != self.doc_tokens
        if failed:
            self.cache.discard(identity)
            sequence.reset()
        return not failed

    def save(self, sequence) -> None:
        """Write the state of ``sequence`` (holding exactly the document) to the cache; a cache that cannot
        be written is skipped, and :meth:`take_warnings` says why."""
        if self.cache is None:
            return
        info = {"model_name": self.model.info.name, "plan": sequence.plan.describe()}
        try:
            self.cache.put(
                self.identity(sequence),
                lambda path: state.save_file(sequence, path),
                len(self.doc_tokens),
                sequence.schedule.state(),
                info,
            )
        except CacheWriteError as exc:
            self.warnings.append(str(exc))
            return
        if self._checkpoints is not None:  # the finished entry replaces the reading's checkpoint
            self._checkpoints.superseded(sequence)

    def checkpoints(self, every: float = checkpoint.EVERY_SECONDS) -> checkpoint.Checkpoints | None:
        """The checkpoints of this document's reading (None without a cache), their warnings told here."""
        if self.cache is None:
            return None
        self._checkpoints = checkpoint.Checkpoints(self.cache, self.doc_tokens, every, entry_follows=True)
        return self._checkpoints

    def take_warnings(self) -> list[str]:
        """What the cache had to say since the last call, each once."""
        found = self.warnings + (self.cache.warnings if self.cache else [])
        if self._checkpoints is not None:
            found += self._checkpoints.warnings
            self._checkpoints.warnings = []
        self.warnings = []
        if self.cache:
            self.cache.warnings = []
        return list(dict.fromkeys(found))


class DocumentQA:
    """A document held in a session; ``ask`` returns to the document-only state before each question."""

    def __init__(
        self,
        model: Model,
        document: str,
        extend: ExtendSettings,
        runtime: RuntimeSettings,
        sampling: SamplingSettings,
        cache: KVCache | None = None,
        checkpoint_every: float = checkpoint.EVERY_SECONDS,
    ) -> None:
        self.model = model
        self.sampling = sampling
        self.cache = cache
        self.doc_tokens, self._after = document_prompt(model, document)
        room = QUESTION_BUDGET + sampling.max_tokens
        self.session = open_session(model, len(self.doc_tokens) + room, extend, runtime, generate=room)
        self._room = room
        self._snapshot: tuple[bytearray, dict[str, int]] | None = None  # only when the session cannot hold
        self._unsaved = False
        self.source: str | None = None
        self.doc_cache = DocumentCache(model, self.doc_tokens, cache)
        self.checkpoints = self.doc_cache.checkpoints(checkpoint_every)

    def close(self) -> None:
        if self.session.ctx is not None:
            self.save()
            self.session.close()

    def __enter__(self) -> DocumentQA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def identity(self) -> dict:
        """What a cached state must match (see :class:`DocumentCache`)."""
        return self.doc_cache.identity(self.session)

    def load(self, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> str:
        """Make the document's state ready: from the cache ("cache") or by ingesting it ("ingested"), resuming
        from the reading's newest checkpoint if there is one (``checkpoints.restored`` says how far).

        An entry that llama.cpp or the schedule will not take is deleted and the document ingested. A stop
        raises Interrupted, with the reading's checkpoint written where it stopped.
        """
        if self.cache and self._restore():
            self.source = "cache"
        else:
            self.session.reset()
            self.session.ingest(self.doc_tokens, progress, should_stop=should_stop, checkpoints=self.checkpoints)
            self.source = "ingested"
            self._unsaved = self.cache is not None
        if not self.session.hold(self._room):
            # Questions and answers would reach past the training context without grouping: keep a copy.
            self._snapshot = (state.state_bytes(self.session), self.session.schedule.state())
            self.save()
        return self.source

    def _restore(self) -> bool:
        return self.doc_cache.restore(self.session)

    def save(self) -> None:
        """Write the document's state to the cache if it was ingested and not written yet (once).

        A cache that cannot be written is skipped, and :meth:`take_warnings` says why.
        """
        if not self._unsaved:
            return
        self._unsaved = False
        self._back_to_document()
        self.doc_cache.save(self.session)

    def _back_to_document(self) -> None:
        if self.session.tokens == self.doc_tokens:
            return
        if self.session.held is not None:
            self.session.rewind()
        else:
            state.load_bytes(self.session, self._snapshot[0], self.doc_tokens, self._snapshot[1])

    def take_warnings(self) -> list[str]:
        """What the cache had to say since the last call (a damaged entry rebuilt, a write that failed,
        something in its folder it left alone, a checkpoint discarded), each once."""
        return self.doc_cache.take_warnings()

    def question_tokens(self, question: str) -> list[int]:
        return question_tokens(self.model, question, self._after)

    def ask(
        self, question: str, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[Chunk]:
        """Stream the answer to ``question``; the document is loaded first if it is not yet, and written
        to the cache once the first answer is complete.

        Timings include the loading, so the first chunk's ``prompt_seconds`` is the time to first token.
        """
        tokens = self.question_tokens(question)
        start = time.perf_counter()
        ingested = False
        if self.source is None:
            ingested = self.load(progress, should_stop) == "ingested"
        else:
            self._back_to_document()
        setup = time.perf_counter() - start
        for chunk in stream_generate(self.session, self.doc_tokens + tokens, self.sampling, None, should_stop):
            reused = 0 if ingested else chunk.reused_tokens
            yield replace(chunk, prompt_seconds=chunk.prompt_seconds + setup, reused_tokens=reused)
        self.save()
