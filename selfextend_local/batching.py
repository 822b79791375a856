"""Continuous batching: many sequences in one llama.cpp context, each with its own SelfExtend plan.

A :class:`BatchEngine` has ``n_slots`` slots, each a :class:`Sequence` with its own cache stream, plan,
schedule and token budget. Every :meth:`BatchEngine.step` is one ``llama_decode`` holding one token for
each sequence that is generating and, in what room is left of ``n_batch``, prompt chunks of those still
reading theirs. Requests join between steps, and one that finishes or is cancelled frees its slot at once.
Each request samples with its own settings (temperature, seed, stops) and streams its own chunks.

A slot keeps its cells after its request ends, so a later request that starts with the same tokens (a
growing chat, the same document with a new question) reuses them, as a single session does.

Make and step an engine on one thread: llama.cpp's CPU threads belong to the thread that first decodes,
and a second set idling beside them (the engine made on one thread, stepped on another) halved the decode
speed on two cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import plan_for
from .errors import EngineError, SelfExtendError
from .generate import Chunk, Sampler, TextStream
from .model import Model
from .planning import Plan
from .session import Context, Entry, Sequence
from .settings import ExtendSettings, RuntimeSettings, SamplingSettings


def _ignore(_) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class Request:
    """One prompt to answer. ``on_chunk`` is called on the engine's thread for every chunk, the last one
    with a finish reason, or ``on_error`` once if a decode fails; ``cancelled()`` is polled before every
    step."""

    prompt: list[int]
    sampling: SamplingSettings
    extend: ExtendSettings = field(default_factory=ExtendSettings)
    on_chunk: Callable[[Chunk], None] = _ignore
    on_error: Callable[[Exception], None] = _ignore
    cancelled: Callable[[], bool] = _never
    on_logits: Callable[[np.ndarray], None] | None = None  # the logits each token is sampled from


@dataclass
class Slot:
    """A sequence and the request it is serving, if any."""

    index: int
    sequence: Sequence | None = None
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    next_token: int | None = None  # sampled, to be decoded next step
    sampler: Sampler | None = None
    stream: TextStream | None = None
    reused: int = 0
    started: float = 0.0
    last_used: float = 0.0
    staged: list[int] = field(default_factory=list)
    output: int | None = None  # index of this slot's logits in the latest decode

    @property
    def busy(self) -> bool:
        return self.request is not None


class BatchEngine:
    """``n_slots`` sequences of ``cells`` KV cells each in one context, decoded together."""

    def __init__(self, model: Model, n_slots: int, cells: int, runtime: RuntimeSettings | None = None) -> None:
        self.model = model
        self.runtime = runtime or RuntimeSettings()
        # room for a whole prompt chunk beside one generated token a slot: a sequence is read in the chunks
        # it would be read in alone, so its grouping (and its output) does not depend on its neighbours
        self.context = Context(model, cells, self.runtime, n_slots, batch=self.runtime.batch + n_slots)
        if model.info.extendable_reason is None:
            self.context.divider("auto")  # the probe needs an empty sequence 0: now, before any request
        self.slots = [Slot(i) for i in range(n_slots)]
        self.steps = 0
        self._cells = self.context.cells  # read once: plan() may be called from another thread

    def close(self) -> None:
        for slot in self.slots:
            self._release(slot)
        self.context.close()

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cells(self) -> int:
        return self._cells

    @property
    def free(self) -> int:
        return sum(not s.busy for s in self.slots)

    @property
    def active(self) -> int:
        return sum(s.busy for s in self.slots)

    def plan(self, request: Request) -> Plan:
        """The plan a request gets, within a slot's cells; raises InputTooLongError and the like."""
        runtime = RuntimeSettings(
            ctx=self.cells,
            threads=self.runtime.threads,
            gpu_layers=self.runtime.gpu_layers,
            batch=self.runtime.batch,
            kv_type=self.runtime.kv_type,
        )
        n_new = request.sampling.max_tokens
        return plan_for(self.model, len(request.prompt) + n_new, request.extend, runtime, generate=n_new)

    # -- admission ------------------------------------------------------------------------------

    def add(self, request: Request) -> Slot:
        """Start ``request`` in a free slot (the one whose cache shares the longest prefix with it, else
        the least recently used). Raises SelfExtendError for a request that cannot be served, and
        EngineError when no slot is free."""
        if not request.prompt:
            raise EngineError("nothing to ingest: the prompt is empty")
        plan = self.plan(request)
        slot = self._choose(request.prompt, plan)
        if slot.sequence is None or self._key(slot.sequence.plan) != self._key(plan):
            self._release(slot)
            slot.sequence = Sequence(self.context, slot.index, plan)
        slot.reused = slot.sequence.reuse(request.prompt)
        slot.pending = list(request.prompt[slot.reused :])
        slot.request = request
        slot.sampler = Sampler(request.sampling)
        slot.stream = None
        slot.next_token = None
        slot.started = time.perf_counter()
        return slot

    @staticmethod
    def _key(plan: Plan) -> tuple:
        return plan.group, plan.window, plan.schedule, plan.division

    def _choose(self, prompt: list[int], plan: Plan) -> Slot:
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise EngineError("no free slot")

        def shared(slot: Slot) -> int:
            if slot.sequence is None or self._key(slot.sequence.plan) != self._key(plan):
                return 0
            n = 0
            for a, b in zip(slot.sequence.tokens, prompt):
                if a != b:
                    break
                n += 1
            return n

        best = max(free, key=lambda s: (shared(s), -s.last_used))
        if shared(best) == 0:  # nothing to reuse: take the slot whose cache is least likely to be wanted
            best = min(free, key=lambda s: (s.sequence is not None, s.last_used))
        return best

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> int:
        """One decode for every busy slot that has work: returns how many tokens it decoded (0: idle)."""
        for slot in self.slots:
            if slot.busy and slot.request.cancelled():
                self._finish(slot, slot.stream.end("interrupted") if slot.stream else self._empty(slot))
        entries: list[Entry] = []
        for slot in self.slots:
            if slot.busy and slot.next_token is not None:
                self._stage(slot, [slot.next_token], entries, want_logits=True)
        room = self.context.n_batch - len(entries)
        for slot in sorted((s for s in self.slots if s.busy and s.pending), key=lambda s: s.started):
            part = slot.pending[: slot.sequence.chunk]
            if len(part) > room:
                break  # whole chunks only; the next step has room for it
            self._stage(slot, part, entries, want_logits=len(part) == len(slot.pending))
            room -= len(part)
        if not entries:
            return 0
        try:
            self.context.decode(entries)
        except SelfExtendError as exc:
            self._fail_all(exc)
            return 0
        self.steps += 1
        for slot in self.slots:
            if slot.staged:
                self._after_decode(slot)
        return len(entries)

    def _stage(self, slot: Slot, tokens: list[int], entries: list[Entry], want_logits: bool) -> None:
        start = slot.sequence.stage(len(tokens))
        for i, token in enumerate(tokens):
            entries.append(Entry(token, start + i, slot.index, want_logits and i == len(tokens) - 1))
        slot.staged = tokens
        slot.output = len(entries) - 1 if want_logits else None

    def _after_decode(self, slot: Slot) -> None:
        sequence, tokens = slot.sequence, slot.staged
        sequence.commit(tokens)
        slot.staged = []
        if slot.next_token is not None:
            slot.next_token = None
        else:
            del slot.pending[: len(tokens)]
        if slot.output is None:
            return
        if slot.stream is None:  # the prompt is in: generation starts
            prompt_seconds = time.perf_counter() - slot.started
            request = slot.request
            slot.stream = TextStream(self.model, request.sampling, len(request.prompt), slot.reused, prompt_seconds)
            if sequence.held is None:
                sequence.hold(request.sampling.max_tokens)
        if slot.request.on_logits:
            slot.request.on_logits(self.context.logits(slot.output)[0])
        token = slot.sampler.sample_at(self.context.ctx, slot.output)
        for chunk in slot.stream.push(token):
            slot.request.on_chunk(chunk)
        if slot.stream.finish is None:
            slot.next_token = token
        else:
            self._done(slot)

    def _empty(self, slot: Slot) -> Chunk:
        request = slot.request
        return Chunk("", None, "interrupted", len(request.prompt), slot.reused, 0, 0.0, 0.0)

    def _finish(self, slot: Slot, last: Chunk) -> None:
        slot.request.on_chunk(last)
        self._done(slot)

    def _done(self, slot: Slot) -> None:
        """The request is over; its cells stay for reuse, but the slot is free from now on."""
        if slot.sampler is not None:
            slot.sampler.close()
        slot.request = slot.sampler = slot.stream = None
        slot.pending, slot.next_token, slot.staged = [], None, []
        slot.last_used = time.perf_counter()

    def _release(self, slot: Slot) -> None:
        """Forget the slot's cells (its sequence is replanned or the engine closes)."""
        if slot.sequence is not None:
            slot.sequence.reset()
            slot.sequence = None

    def _fail_all(self, exc: SelfExtendError) -> None:
        """A decode failed: every request in it ends with the error, and the slots start clean."""
        for slot in self.slots:
            if slot.busy:
                request = slot.request
                self._done(slot)
                request.on_error(exc)
            self._release(slot)

    def run(self) -> None:
        """Step until every request has finished."""
        while self.active:
            self.step()
