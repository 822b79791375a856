"""The one slot loop: every generation, single or batched, is requests served by slots of a context.

A :class:`Slot` owns a :class:`~.sequence.Sequence` and serves one :class:`Request` at a time: it keeps
the longest cached prefix of the prompt, reads the rest in chunks, holds the sequence's grouping after the
prompt, samples with the request's own settings and streams its chunks. An :class:`Engine` has a slot for
each sequence of its context, and each :meth:`Engine.step` is one ``llama_decode`` holding one token for
each slot that is generating (with the tokens it drafts from its own text, :mod:`.drafting`, checked in the
same decode) and, in what room is left of ``n_batch``, prompt chunks of those still reading theirs.
Requests join between steps; one that finishes or is cancelled frees its slot at once.

One request alone is one busy slot (:mod:`.generate` drives a one-slot engine over a session), as in
llama.cpp's server, so prefix reuse, chunking, the hold, sampling and streaming exist once.

Make and step an engine on one thread: llama.cpp's CPU threads belong to the thread that first decodes,
and a second set idling beside them (the engine made on one thread, stepped on another) halved the decode
speed on two cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import llama_cpp
import numpy as np

from . import kshift
from .budget import StepBudget
from .checkpoint import Checkpoints
from .context import Context, Span
from .drafting import Drafter, costs_for
from .errors import EngineError, Interrupted, SelfExtendError
from .model import Model
from .planning import Plan, plan_for
from .promptcache import PromptCache
from .sampling import Chunk, Sampler, TextStream
from .sequence import Sequence
from .settings import MAX_DRAFT, ExtendSettings, RuntimeSettings, SamplingSettings

Progress = Callable[[int, int], None]
# A reading of more than LONG_READING tokens goes in pieces while other slots generate (:mod:`.budget`): at
# 8k tokens of context a whole chunk of 512 takes seconds on a laptop's CPU, and each generated token of a
# chat beside it would wait that long. Shorter prompts (a chat's own) are read in whole chunks.
LONG_READING = 2048
LogitsSink = Callable[[int, np.ndarray], None]


def _ignore(*_) -> None:
    return None


def _never() -> bool:
    return False


def _not_restored(_sequence) -> bool:
    return False


@dataclass(frozen=True)
class Held:
    """The start of a prompt to keep exactly: a document that questions follow. Its first ``length`` tokens
    are read in chunks that end at it, then the sequence is held for ``room`` tokens more (questions and
    answers appended without grouping, so the next request drops them and finds the document as read).
    ``restore(sequence)`` may load the document from a disk cache instead (True when it did);
    ``on_read(sequence)`` is called once it has been read (to write that cache)."""

    length: int
    room: int
    restore: Callable[[Sequence], bool] = _not_restored
    on_read: Callable[[Sequence], None] = _ignore


@dataclass(eq=False)
class Request:
    """One prompt to serve.

    Callbacks run on the engine's thread: ``on_start`` when it takes a slot, then ``on_chunk`` for every
    chunk (the last one has a finish reason) or ``on_error`` once, then ``on_finish``; ``cancelled()`` is
    polled before every step. ``plan`` is computed once, by :meth:`Engine.plan` (a caller may do it early,
    to refuse a request before it waits). With ``generate`` False the prompt is only read (evaluations,
    documents): ``prompt_logits(offset, rows)`` then receives every prompt token's logits, chunk by chunk.
    ``held``: the prompt begins with a document to keep (:class:`Held`). ``checkpoints``: the reading of
    the prompt (or of the held document) is checkpointed to disk and resumed from there
    (:mod:`.checkpoint`).
    """

    prompt: list[int]
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    extend: ExtendSettings = field(default_factory=ExtendSettings)
    plan: Plan | None = None
    on_chunk: Callable[[Chunk], None] = _ignore
    on_error: Callable[[Exception], None] = _ignore
    on_finish: Callable[[], None] = _ignore
    on_start: Callable[[], None] = _ignore
    cancelled: Callable[[], bool] = _never
    on_logits: Callable[[np.ndarray], None] | None = None  # the logits each token is sampled from
    progress: Progress | None = None  # (done, total) over the prompt, reused tokens included
    generate: bool = True
    prompt_logits: LogitsSink | None = None
    reused: int = 0  # set when it starts: prompt tokens its slot already held (or restored)
    held: Held | None = None
    checkpoints: Checkpoints | None = None


class Slot:
    """A sequence and the request it is serving, if any."""

    def __init__(self, index: int, sequence: Sequence | None = None) -> None:
        self.index = index
        self.sequence = sequence
        self.request: Request | None = None
        self.pending: list[int] = []  # prompt tokens still to decode
        self.next_token: int | None = None  # sampled, to be decoded next step
        self.sampler: Sampler | None = None
        self.stream: TextStream | None = None
        self.drafter: Drafter | None = None  # drafts from the request's own text (:mod:`.drafting`)
        self.reused = 0
        self.chunks = 0  # prompt chunks (or pieces of them) decoded for the current request
        self.chunk_left = 0  # tokens of the chunk begun that are still to decode
        self.chunk_pos = 0  # the position of its next token
        self.started = 0.0
        self.last_used = 0.0
        self.staged: list[int] = []
        self.output: int | None = None  # batch index of this slot's last token in the latest decode

    @property
    def busy(self) -> bool:
        return self.request is not None

    def start(self, request: Request) -> None:
        """Serve ``request``: keep what the sequence holds of its prompt, read the rest from the next step."""
        self.request = request
        self.reused = self._keep_document(request) or self.sequence.reuse(request.prompt)
        if request.checkpoints is not None:
            self.reused = request.checkpoints.restore(self.sequence, self.reused)
        request.reused = self.reused
        self.chunks = self.chunk_left = 0
        self.pending = list(request.prompt[self.reused :])
        self.sampler = Sampler(request.sampling, self.sequence.model) if request.generate else None
        self.stream = self.drafter = None
        self.next_token = None
        self.started = time.perf_counter()

    def _keep_document(self, request: Request) -> int:
        """For a request with a held document: the document's length when this slot holds it (after a
        restore from the disk cache, if need be), the questions after it dropped; else 0."""
        held, sequence = request.held, self.sequence
        if held is None or (request.generate and len(request.prompt) <= held.length):
            return 0  # (a reply needs a token after the document, to be sampled from its logits)
        document = request.prompt[: held.length]
        if sequence.tokens[: held.length] != document:
            if not held.restore(sequence) or sequence.tokens != document:
                sequence.reset()
                return 0
            sequence.hold(held.room)
        if sequence.held != held.length or not sequence.truncate(held.length):
            return 0
        return held.length

    # -- one step -------------------------------------------------------------------------------

    def token_span(self, room: int = 0, step: int = 1) -> Span:
        """The generated token to decode this step, and after it up to ``room`` tokens drafted from the
        request's own text (:mod:`.drafting`), as many as pay in a step of ``step`` tokens so far."""
        draft = self._draft(room, step) if self.drafter is not None else []
        return self._stage([self.next_token, *draft], "all" if draft else "last")

    def _draft(self, room: int, step: int) -> list[int]:
        """A draft no longer than the reply may still be, and than one decode appends exactly as decoding a
        token at a time would (no grouping between its tokens)."""
        limit = min(room, self.drafter.most, self.stream.max_tokens - self.stream.generated - 1)
        if limit > 0:
            limit = self.sequence.in_one_step(1 + limit) - 1
        return self.drafter.propose(limit, step)

    def prompt_span(self, room: int, piece: int | None = None) -> Span | None:
        """The next prompt chunk, if a whole one fits in ``room`` tokens; with ``piece``, at most that many
        tokens of it (the chunk's position edits are made once, before its first piece, so its cells end
        where a whole chunk's would)."""
        if not self.chunk_left:
            size = min(len(self.pending), self.sequence.chunk)
            held, have = self.request.held, len(self.sequence.tokens)
            if held and have < held.length:  # the document's last chunk ends where it does
                size = min(size, held.length - have)
            if size > room and piece is None:
                return None
            self.chunk_pos = self.sequence.stage(size)
            self.chunk_left = size
        part = self.pending[: min(self.chunk_left, room, piece or self.chunk_left)]
        if not part:
            return None
        last = len(part) == len(self.pending)
        request = self.request
        logits = "all" if request.prompt_logits else "last" if last else "none"
        self.staged = part
        return Span(part, self.chunk_pos, self.index, logits)

    def _stage(self, tokens: list[int], logits: str) -> Span:
        start = self.sequence.stage(len(tokens))
        self.staged = tokens
        return Span(tokens, start, self.index, logits)

    def decoded(self, context: Context, first: int) -> bool:
        """Take the step's result (this slot's tokens were batch indices ``first``..); True when the request
        is over."""
        tokens, self.staged = self.staged, []
        if self.next_token is not None:
            self.next_token = None
            return self._verify(context, first, tokens)
        self.sequence.commit(tokens)
        request = self.request
        del self.pending[: len(tokens)]
        self.chunk_left -= len(tokens)
        self.chunk_pos += len(tokens)
        self.chunks += 1
        held = request.held
        if held and len(self.sequence.tokens) == held.length and self.sequence.held is None:
            self.sequence.hold(held.room)
            held.on_read(self.sequence)
        self._checkpoint()
        if request.prompt_logits:
            request.prompt_logits(
                len(request.prompt) - self.reused - len(self.pending) - len(tokens), context.logits(first, len(tokens))
            )
        if request.progress:
            request.progress(len(request.prompt) - len(self.pending), len(request.prompt))
        if self.pending:
            return False
        if not request.generate:
            return True
        self._begin_reply()
        return self._sample(context, first + len(tokens) - 1)

    def _verify(self, context: Context, first: int, tokens: list[int]) -> bool:
        """Sample from the row of the token decoded, then from each drafted token's row while the token
        sampled before it equals it: every token of the reply is the sampler's own pick after the tokens
        before it, as a token at a time. The drafted tokens not kept leave the cache."""
        drafted = tokens[1:]
        self.stream.drafted += len(drafted)
        kept = 0
        while not (over := self._sample(context, first + kept)):
            if kept == len(drafted) or self.next_token != drafted[kept]:
                break
            kept += 1
            self.stream.accepted += 1
        self.sequence.commit(tokens[: 1 + kept])
        if drafted:
            self.sequence.drop_uncommitted()
            self.drafter.verified(len(drafted), kept)
        return over

    def _checkpoint(self) -> None:
        """After a chunk, or a piece of one: a checkpoint of the reading when one is due at a whole chunk's
        end; the checkpoint's end once the reading is done."""
        checkpoints = self.request.checkpoints
        if checkpoints is None or self.chunk_left:
            return
        if len(self.sequence.tokens) < len(checkpoints.tokens):
            checkpoints.after_chunk(self.sequence)
        else:
            checkpoints.finish(self.sequence)

    def _begin_reply(self) -> None:
        """The prompt is in: hold the grouping for the reply, so it moves no cell (when it fits the trained
        positions) and a later prompt that extends this one reuses all of it."""
        request, sequence = self.request, self.sequence
        prompt_seconds = time.perf_counter() - self.started
        model = sequence.model
        self.stream = TextStream(model, request.sampling, len(request.prompt), self.reused, prompt_seconds)
        if sequence.held is None:
            sequence.hold(request.sampling.max_tokens)
        if request.sampling.draft:
            self.drafter = Drafter(request.prompt, request.sampling.draft, costs_for(model))

    def _sample(self, context: Context, index: int) -> bool:
        request = self.request
        if request.on_logits:
            request.on_logits(context.logits(index)[0])
        try:
            token = self.sampler.sample(context.ctx, index)
            chunks = self.stream.push(token)
        except SelfExtendError as exc:  # the grammar allows nothing more, or the reply breaks its schema
            request.on_error(exc)
            return True
        for chunk in chunks:
            request.on_chunk(chunk)
        if self.stream.finish is None:
            self.next_token = token
            if self.drafter is not None:
                self.drafter.add(token)
            return False
        return True

    def cancel(self) -> None:
        """End the request now: an interrupted last chunk, or an Interrupted error while it was reading."""
        request = self.request
        if self.stream is not None:
            request.on_chunk(self.stream.end("interrupted"))
        elif request.generate or self.pending:
            if request.checkpoints is not None and not self.chunk_left:
                request.checkpoints.stopped(self.sequence)
            done, total = len(request.prompt) - len(self.pending), len(request.prompt)
            request.on_error(Interrupted("stopped after {done} of {total} tokens", done=done, total=total))

    def release(self) -> Request | None:
        """The request is over; the cells stay for reuse, but the slot is free from now on."""
        request = self.request
        if self.sampler is not None:
            self.sampler.close()
        self.request = self.sampler = self.stream = self.drafter = None
        self.pending, self.next_token, self.staged = [], None, []
        self.chunk_left = 0
        self.last_used = time.perf_counter()
        return request


class Engine:
    """Slots over the sequences of one context, decoded together; ``owns_context``: closing the engine
    closes the context."""

    def __init__(
        self,
        context: Context,
        sequences: list[Sequence] | None = None,
        owns_context: bool = False,
        prompts: PromptCache | None = None,
    ) -> None:
        self.context = context
        self.prompts = prompts  # where a slot's prompt goes when the slot moves on (None: nowhere)
        self.model = context.model
        self.runtime = context.runtime
        self.owns_context = owns_context
        given = sequences or []
        self.slots = [Slot(i, given[i] if i < len(given) else None) for i in range(context.n_seq)]
        self.budget = StepBudget()
        self.draft_costs = costs_for(self.model)  # what a drafted token costs here (:mod:`.drafting`)
        self.steps = 0
        self._cells = context.cells  # read once: plan() may be called from another thread

    @classmethod
    def create(
        cls, model: Model, n_slots: int, cells: int, runtime: RuntimeSettings | None = None, prompt_cache: int = 0
    ) -> Engine:
        """``n_slots`` sequences of ``cells`` KV cells each in a context of their own; ``prompt_cache``
        bytes of host memory keep the prompts of slots that move on (:mod:`.promptcache`; 0: none)."""
        runtime = runtime or RuntimeSettings()
        # the K-shift's first check probes in contexts of its own: before this one's cache exists, not beside it
        extendable = model.info.extendable_reason is None and kshift.check(model, runtime).safe
        # room for a whole prompt chunk beside one generated token a slot and its longest draft: a sequence
        # is read in the chunks it would be read in alone, so its grouping (and its output) does not depend on
        # its neighbours (a decode holds n_ubatch tokens at most whatever n_batch is: no memory for this room)
        context = Context(model, cells, runtime, n_slots, batch=runtime.batch + n_slots * (1 + MAX_DRAFT))
        try:
            if extendable:
                context.divider("auto")  # the probe needs an empty sequence 0: now, before any request
        except BaseException:
            context.close()
            raise
        return cls(context, owns_context=True, prompts=PromptCache(prompt_cache) if prompt_cache else None)

    def warm_up(self) -> None:
        """Decode one token in every idle slot's empty stream at once, then remove it."""
        idle = [slot for slot in self.slots if not slot.busy and (slot.sequence is None or not slot.sequence.tokens)]
        if not idle:
            return
        token = llama_cpp.llama_vocab_bos(self.model.vocab)
        self.context.decode([Span([max(token, 0)], 0, slot.index, "last") for slot in idle])
        for slot in idle:
            llama_cpp.llama_memory_seq_rm(self.context.mem, slot.index, -1, -1)

    def close(self) -> None:
        for slot in self.slots:
            if slot.busy:
                slot.release()
            if self.owns_context:
                self._forget(slot)
        if self.owns_context:
            self.context.close()

    def __enter__(self) -> Engine:
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
        """The plan a request gets, within a slot's cells; raises InputTooLongError and the like (pure). A
        request with a held document gets the document's plan (the reading and every question the same)."""
        if request.held is not None:
            n_new = request.held.room
            n_tokens = request.held.length + n_new
        else:
            n_new = request.sampling.max_tokens if request.generate else 0
            n_tokens = len(request.prompt) + n_new
        runtime = replace(self.runtime, ctx=None)  # a slot's cells are fixed: the room, not --ctx, is the limit
        return plan_for(self.model, n_tokens, request.extend, runtime, generate=n_new, room=self.cells)

    # -- admission ------------------------------------------------------------------------------

    def add(self, request: Request) -> Slot:
        """Start ``request`` in a free slot (the one whose cache shares the longest prefix with it, else
        the least recently used), planning it if it is not yet. Raises SelfExtendError for a request that
        cannot be served, and EngineError when no slot is free."""
        if not request.prompt:
            raise EngineError("nothing to ingest: the prompt is empty")
        if request.plan is None:
            request.plan = self.plan(request)
        slot = self._choose(request.prompt, request.plan)
        if slot.sequence is None or _key(slot.sequence.plan) != _key(request.plan):
            self._keep(slot, 0)
            self._forget(slot)
            slot.sequence = Sequence(self.context, slot.index, request.plan)
        if request.held is None:
            self._start_from_kept(slot, request.prompt)
        try:
            slot.start(request)
        except BaseException:  # e.g. its sampler refused: the request ends alone, its slot free and clean
            slot.release()
            raise
        self.budget.started(slot.index)
        request.on_start()
        if not slot.pending and not request.generate:  # all of it was there already: nothing to read
            if request.progress:
                request.progress(len(request.prompt), len(request.prompt))
            self._end(slot)
        return slot

    def _choose(self, prompt: list[int], plan: Plan) -> Slot:
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise EngineError("no free slot")

        def shared(slot: Slot) -> int:
            if slot.sequence is None or _key(slot.sequence.plan) != _key(plan):
                return 0
            return slot.sequence.shared_prefix(prompt)

        best = max(free, key=lambda s: (shared(s), -s.last_used))
        if shared(best) == 0:  # nothing to reuse: take the slot whose cache is least likely to be wanted
            best = min(free, key=lambda s: (s.sequence is not None, s.last_used))
        return best

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> int:
        """One decode for every busy slot that has work: returns how many tokens it decoded (0: idle)."""
        for slot in self.slots:
            if slot.busy and slot.request.cancelled():
                slot.cancel()
                self._end(slot)
        spans, pieces = self._gather()
        if not spans:
            return 0
        began = time.perf_counter()
        try:
            self.context.decode([span for _, span in spans])
        except SelfExtendError as exc:
            self.fail_all(exc)
            return 0
        seconds = time.perf_counter() - began
        generating = sum(1 for slot, _ in spans if slot.next_token is not None)
        self.budget.took(seconds, generating, pieces)
        if generating == len(spans):
            depth = max(len(slot.sequence.tokens) for slot, _ in spans)  # the deepest slot's attention leads
            self.draft_costs.took(seconds, sum(len(span.tokens) for _, span in spans), depth)
        self.steps += 1
        first = 0
        for slot, span in spans:
            if slot.decoded(self.context, first):
                self._end(slot)
            first += len(span.tokens)
        return first

    def _gather(self) -> tuple[list[tuple[Slot, Span]], dict[int, int]]:
        """This step's spans: each generating slot's token (and its draft, :mod:`.drafting`), then whole
        prompt chunks: first those of prompts not yet begun, then the rest, each in arrival order (a short
        new request's first token does not wait for a long prompt's later chunks). While some slots
        generate, a long reading goes in the pieces the step budget allows (:mod:`.budget`), so that their
        tokens do not each wait for a whole chunk of it; those pieces are returned too (tokens by slot)."""
        generating = [slot for slot in self.slots if slot.busy and slot.next_token is not None]
        spans, step = [], len(generating)  # step: the tokens it holds so far
        for slot in generating:
            spans.append((slot, slot.token_span(self.context.n_batch - step, step)))
            step += len(spans[-1][1].tokens) - 1
        pieces: dict[int, int] = {}
        room = self.context.n_batch - step
        reading = (s for s in self.slots if s.busy and s.pending)
        for slot in sorted(reading, key=lambda s: (s.chunks > 0, s.started)):
            piece = None
            if spans and len(slot.request.prompt) - slot.reused > LONG_READING:
                piece = self.budget.piece(slot.index)
                if not piece:
                    continue
            span = slot.prompt_span(room, piece)
            if span is None:
                break  # whole chunks only; the next step has room for it
            spans.append((slot, span))
            room -= len(span.tokens)
            if piece:
                pieces[slot.index] = len(span.tokens)
        return spans, pieces

    def _end(self, slot: Slot) -> None:
        request = slot.release()
        if request is not None:
            request.on_finish()

    def _keep(self, slot: Slot, keep: int) -> None:
        """Before a slot's cells after the first ``keep`` tokens are lost, keep them in the prompt cache."""
        sequence = slot.sequence
        if self.prompts is not None and sequence is not None and len(sequence.tokens) > keep:
            self.prompts.keep(sequence, _key(sequence.plan))

    def _start_from_kept(self, slot: Slot, prompt: list[int]) -> None:
        """Restore a kept prompt that begins ``prompt`` further than the slot's own cells do."""
        if self.prompts is None:
            return
        sequence = slot.sequence
        own = sequence.shared_prefix(prompt)
        kept = self.prompts.best(_key(sequence.plan), prompt, own)
        self._keep(slot, own)
        if kept is None:
            return
        try:
            self.prompts.restore(sequence, kept)
        except EngineError:
            sequence.reset()

    def _forget(self, slot: Slot) -> None:
        """Forget the slot's cells (its sequence is replanned, or the engine closes)."""
        if slot.sequence is not None:
            slot.sequence.reset()
            slot.sequence = None

    def fail_all(self, exc: Exception) -> None:
        """A decode failed: every request in it ends with the error, and the slots start clean."""
        for slot in self.slots:
            if slot.busy:
                request = slot.request
                slot.release()
                request.on_error(exc)
                request.on_finish()
            if slot.sequence is not None:
                slot.sequence.reset()


def _key(plan: Plan) -> tuple:
    return plan.group, plan.window, plan.schedule, plan.division
