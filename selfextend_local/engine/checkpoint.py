"""Checkpoints of a long reading: its state written to the disk KV cache every so often while it is read,
so that a reading cut short (Ctrl-C, a closed lid, a server restart, a crash, an out-of-memory kill) starts
again where it was instead of at token 0.

A :class:`Checkpoints` belongs to one reading (the tokens a request reads: a document, or a whole prompt)
and is called by the slot that reads it (:mod:`.slots`) at fixed points: ``restore`` when the request
starts, ``after_chunk`` after each whole chunk (it writes when one is due), ``stopped`` when the request
is cancelled at a chunk's end, and ``finish`` once the reading is done. A checkpoint is an entry of the
:class:`~.kvcache.KVCache` (llama.cpp's state file, our header with the tokens read and the schedule's
state, a checksum; written to a temporary file, then renamed), keyed by everything the finished reading's
state depends on (:func:`identity`) and marked as a checkpoint: only the newest of a reading is kept,
each write replacing the one before, and a kill in the middle of a write leaves the previous one whole.
Checkpoints count toward the cache's size limit and are evicted with it; the finished reading's entry
replaces its checkpoint.

Only whole chunks are ever saved, at the boundaries an uninterrupted reading has too, so a resumed reading
ends in the state the uninterrupted one would have. Writing costs time on the engine's thread: a write is
due after :data:`EVERY_SECONDS` of reading, and never sooner than :data:`COST_RATIO` times the last write's
own time after it, so writing stays within 1/COST_RATIO of the reading whatever the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp

from . import state
from .errors import EngineError
from .kvcache import CacheWriteError, KVCache, tokens_digest
from .settings import CHECKPOINT_SECONDS

EVERY_SECONDS = CHECKPOINT_SECONDS  # of reading between two checkpoints
COST_RATIO = 40  # a write is at most 1/40 of the reading's time (2.5%)
MIN_TOKENS = 2048  # readings shorter than this are not checkpointed: they take seconds


def identity(model, sequence, tokens: list[int]) -> dict:
    """What a state of ``tokens`` read in ``sequence`` depends on: the model file, the llama.cpp build, the
    SelfExtend setting, division, KV type and chunk size, and the tokens. Two readings with the same
    identity reach the same state."""
    stat = model.path.stat()
    return {
        "model": str(model.path.resolve()),
        "model_size": stat.st_size,
        "model_mtime_ns": stat.st_mtime_ns,
        "llama_cpp": llama_cpp.__version__,
        "group": sequence.plan.group,
        "window": sequence.plan.window,
        "schedule": sequence.plan.schedule,
        "division": sequence.divider.name if sequence.divider else None,
        "kv_type": sequence.runtime.kv_type,
        "chunk": sequence.chunk,
        "document": tokens_digest(tokens),
        "n_tokens": len(tokens),
    }


class Checkpoints:
    """The newest checkpoint of one reading of ``tokens`` in ``cache``; see the module's text.

    ``every``: seconds of reading between two writes (0: after every chunk, for tests). ``on_restore(done,
    total)`` is told when a reading resumes from a checkpoint. ``entry_follows``: the finished reading gets
    an entry of its own, whose writer removes the checkpoint (:meth:`superseded`) once it is written; else
    the checkpoint goes as soon as the reading is done. :attr:`warnings` holds what went wrong (a damaged
    checkpoint discarded, a write that failed), each once.
    """

    def __init__(
        self,
        cache: KVCache,
        tokens: list[int],
        every: float = EVERY_SECONDS,
        on_restore: Callable[[int, int], None] | None = None,
        entry_follows: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.entry_follows = entry_follows
        self.tokens = tokens
        self.every = every
        self.on_restore = on_restore
        self.clock = clock
        self.warnings: list[str] = []
        self.restored = 0  # tokens the reading resumed from
        self.written = 0  # tokens in the newest checkpoint written here
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.broken = False  # a write failed: the reading goes on without checkpoints
        self._due = 0.0
        self._id: dict | None = None

    def key_identity(self, sequence) -> dict:
        if self._id is None:
            self._id = {**identity(sequence.model, sequence, self.tokens), "checkpoint": True}
        return self._id

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # -- the slot's calls ----------------------------------------------------------------------

    def restore(self, sequence, have: int = 0) -> int:
        """Load the newest checkpoint into ``sequence`` if it holds more of the reading than the ``have``
        tokens the sequence holds already; the tokens it holds after (``have`` when nothing was restored).
        A checkpoint that is damaged, from another reading, or refused by llama.cpp is deleted, with a
        warning, and the sequence emptied."""
        self._due = self.clock() + self.every
        wanted = self.key_identity(sequence)
        with self.cache.open(wanted) as entry:
            if entry is None or not have < entry.meta["n_tokens"] < len(self.tokens):
                self._take_cache_warnings()
                return have
            try:
                state.load_file(sequence, entry.state_path, entry.schedule_state)
                failed = sequence.tokens != self.tokens[: len(sequence.tokens)]
            except EngineError as exc:
                failed, why = True, str(exc)
            else:
                why = "its tokens are not this reading's"
        if failed:
            self.cache.discard(wanted, f"the checkpoint could not be used: {why}")
            self._take_cache_warnings()
            sequence.reset()
            return 0
        self.restored = self.written = len(sequence.tokens)
        if self.on_restore is not None:
            self.on_restore(self.restored, len(self.tokens))
        return self.restored

    def after_chunk(self, sequence) -> None:
        """A whole chunk has been read: write a checkpoint if one is due."""
        if self.clock() >= self._due:
            self.write(sequence)

    def stopped(self, sequence) -> None:
        """The reading was cancelled at a chunk's end: keep what it had read."""
        if len(sequence.tokens) > self.written:
            self.write(sequence)

    def finish(self, sequence) -> None:
        """The reading is done: its checkpoint goes, unless a finished entry is to replace it."""
        if not self.entry_follows:
            self.superseded(sequence)

    def superseded(self, sequence) -> None:
        """The finished reading is kept elsewhere now (or not kept at all): the checkpoint goes."""
        self.cache.remove(self.key_identity(sequence))
        self.written = 0

    # -- writing --------------------------------------------------------------------------------

    def write(self, sequence) -> None:
        """Write the sequence's state (a whole-chunk prefix of the reading) as the reading's checkpoint."""
        done = len(sequence.tokens)
        if self.broken or done <= 0 or done >= len(self.tokens) or sequence.tokens != self.tokens[:done]:
            return
        began = self.clock()
        info = {"model_name": sequence.model.info.name, "plan": sequence.plan.describe(), "of": len(self.tokens)}
        try:
            path = self.cache.put(
                self.key_identity(sequence),
                lambda p: state.save_file(sequence, p),
                done,
                sequence.schedule.state(),
                info,
            )
        except CacheWriteError as exc:
            self.broken = True
            self._warn(f"{exc}; the reading goes on without checkpoints")
            return
        took = self.clock() - began
        self.written = done
        self.write_seconds += took
        self.bytes_written += path.stat().st_size if path.exists() else 0
        self._due = self.clock() + max(self.every, COST_RATIO * took)
        self._take_cache_warnings()

    def _take_cache_warnings(self) -> None:
        for message in self.cache.warnings:
            self._warn(message)
        self.cache.warnings = []


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a front end's long readings are checkpointed: a reading of at least
    :data:`MIN_TOKENS` tokens gets :class:`Checkpoints` in ``cache`` (None: no checkpoints at all)."""

    cache: KVCache | None
    every: float = EVERY_SECONDS

    def __call__(self, tokens: list[int], **kwargs) -> Checkpoints | None:
        if self.cache is None or len(tokens) < MIN_TOKENS:
            return None
        return Checkpoints(self.cache, tokens, self.every, **kwargs)
