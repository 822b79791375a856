"""Questions about one long document: ingest it once (or restore it from the cache), then answer each
question by ingesting only the question."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import llama_cpp

from .engine import open_session
from .errors import EngineError, InputTooLongError
from .generate import Chunk, stream_generate
from .kvcache import CacheWriteError, KVCache, tokens_digest
from .model import Model
from .session import Progress
from .settings import ExtendSettings, RuntimeSettings, SamplingSettings

SYSTEM = "Answer the question using the document. Be brief and precise."
QUESTION_BUDGET = 256  # tokens reserved for each question in the context
_SLOT = "\x00QUESTION\x00"


class DocumentQA:
    """A document held in a session; ``ask`` restores the document-only state before each question."""

    def __init__(
        self,
        model: Model,
        document: str,
        extend: ExtendSettings,
        runtime: RuntimeSettings,
        sampling: SamplingSettings,
        cache: KVCache | None = None,
    ) -> None:
        self.model = model
        self.sampling = sampling
        self.cache = cache
        user = f"Document:\n{document}\n\nQuestion:{_SLOT}"
        if model.info.chat_template:
            pieces = model.chat_segments([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
        else:
            pieces = [(f"{SYSTEM}\n\n", True), (user, False), ("\nAnswer:", True)]
        # Everything before the slot is the document's part of the prompt; what follows it, the template's tail.
        at = next(i for i, (text, _) in enumerate(pieces) if _SLOT in text)
        head, tail = pieces[at][0].split(_SLOT)
        self.doc_tokens = model.segments_tokens(pieces[:at] + [(head, False)])
        self._after = [(tail, False)] + pieces[at + 1 :]
        needed = len(self.doc_tokens) + QUESTION_BUDGET + sampling.max_tokens
        self.session = open_session(model, needed, extend, runtime)
        self._snapshot: tuple[bytearray, dict[str, int]] | None = None
        self.source: str | None = None
        self.cache_warning: str | None = None

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DocumentQA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def identity(self) -> dict:
        """What a cached state must match: model file, build, settings and the document's tokens."""
        session = self.session
        stat = self.model.path.stat()
        return {
            "model": str(self.model.path.resolve()),
            "model_size": stat.st_size,
            "model_mtime_ns": stat.st_mtime_ns,
            "llama_cpp": llama_cpp.__version__,
            "group": session.plan.group,
            "window": session.plan.window,
            "schedule": session.plan.schedule,
            "division": session.divider.name if session.divider else None,
            "kv_type": session.runtime.kv_type,
            "chunk": session.chunk,
            "document": tokens_digest(self.doc_tokens),
            "n_tokens": len(self.doc_tokens),
        }

    def load(self, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> str:
        """Make the document's state ready: from the cache ("cache") or by ingesting it ("ingested").

        An entry that llama.cpp or the schedule will not take is deleted and the document ingested; a
        cache that cannot be written is skipped, and ``cache_warning`` says why.
        """
        identity = self.identity() if self.cache else None
        if self.cache and self._restore(identity):
            self.source = "cache"
            return self.source
        self.session.reset()
        self.session.ingest(self.doc_tokens, progress, should_stop=should_stop)
        self._snapshot = (self.session.state_bytes(), self.session.schedule.state())
        if self.cache:
            info = {"model_name": self.model.info.name, "plan": self.session.plan.describe()}
            try:
                self.cache.put(identity, self.doc_tokens, self._snapshot[1], self._snapshot[0], info)
            except CacheWriteError as exc:
                self.cache_warning = str(exc)
        self.source = "ingested"
        return self.source

    def _restore(self, identity: dict) -> bool:
        entry = self.cache.get(identity)
        if entry is None or entry.tokens != self.doc_tokens:
            return False
        try:
            self.session.load_state(entry.state, entry.tokens, entry.schedule_state)
        except EngineError:
            self.cache.discard(identity)
            return False
        self._snapshot = (entry.state, entry.schedule_state)
        return True

    def question_tokens(self, question: str) -> list[int]:
        # The question is user text: special-token syntax in it is not parsed; the template's tail is.
        tokens = self.model.segments_tokens([(" " + question.strip(), False)] + self._after, bos=False)
        if len(tokens) > QUESTION_BUDGET:
            raise InputTooLongError(f"the question has {len(tokens)} tokens; keep it under {QUESTION_BUDGET}")
        return tokens

    def ask(
        self, question: str, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[Chunk]:
        """Stream the answer to ``question``; the document is loaded first if it is not yet.

        Timings include the loading, so the first chunk's ``prompt_seconds`` is the time to first token.
        """
        tokens = self.question_tokens(question)
        start = time.perf_counter()
        ingested = False
        if self._snapshot is None:
            ingested = self.load(progress, should_stop) == "ingested"
        elif self.session.tokens != self.doc_tokens:
            self.session.load_state(self._snapshot[0], self.doc_tokens, self._snapshot[1])
        setup = time.perf_counter() - start
        for chunk in stream_generate(self.session, self.doc_tokens + tokens, self.sampling, None, should_stop):
            reused = 0 if ingested else chunk.reused_tokens
            yield replace(chunk, prompt_seconds=chunk.prompt_seconds + setup, reused_tokens=reused)
