"""How a request is served: the one scheduler under every front end.

A :class:`Scheduler` owns an :class:`~.slots.Engine` sized for the requests it is to serve (:func:`size`),
takes requests in (:meth:`Scheduler.submit` plans each at once, so a request that cannot be served is
refused before it waits), starts waiting requests in free slots in the order they came, steps the engine,
and delivers each request's events through the request's own callbacks, on the thread that runs it:
``on_start`` when it has a slot, ``progress`` as its prompt is read, ``on_chunk`` for each piece of its
reply, ``on_error`` once if it fails, and ``on_finish`` last.

Front ends differ only in how they wait:

- one request in the caller's thread (``Session``, ``Llama``, generate, chat, qa): :meth:`Scheduler.stream`
  yields its chunks as they come;
- many requests in the caller's thread (``Llama.batch``, ``summarize --parallel``, Ray workers):
  :meth:`Scheduler.submit` each, then :meth:`Scheduler.run`, or iterate :meth:`Scheduler.steps` to act
  between steps (a callback may submit a request's follow-up);
- requests from other threads (the HTTP server): a :class:`ServingThread` makes the scheduler on a thread
  of its own and runs it until stopped.

What each step holds is the engine's rule (:meth:`~.slots.Engine.step`): one token for every generating
slot, with the tokens it drafts from its own text where they pay (:mod:`.drafting`: those the sampler
agrees with are kept, so the reply is the one a token at a time gives), then prompt chunks, a request's
first chunk ahead of a long prompt's later ones.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator

from . import arena, capacity
from .capacity import Capacity
from .errors import EngineError, Interrupted
from .model import Model
from .planning import Plan, align_cells
from .sampling import Chunk
from .settings import ExtendSettings, RuntimeSettings
from .slots import Engine, Request


def size(
    model: Model,
    runtime: RuntimeSettings,
    extend: ExtendSettings,
    slots: int | None = None,
    longest: int | None = None,
    memory: int | None = None,
) -> Capacity:
    """Slots, and KV cells a slot, for the requests to come: ``runtime.ctx`` cells if given, else room for
    the ``longest`` request (prompt and reply, in tokens) when the caller knows it, else what the model
    family's SelfExtend setting reaches; ``slots`` as asked, or as many as half the available memory holds
    (at most :data:`~.capacity.DEFAULT_SLOTS`)."""
    cells = runtime.ctx or (align_cells(longest) if longest else None)
    return capacity.choose(model, runtime, extend, slots, cells, memory)


class Scheduler:
    """Requests served by the slots of one engine; see the module's text. Use it on one thread: the one
    that made it (llama.cpp's CPU threads belong to the thread that first decodes)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.waiting: deque[Request] = deque()

    @classmethod
    def create(
        cls,
        model: Model,
        runtime: RuntimeSettings | None = None,
        extend: ExtendSettings | None = None,
        *,
        slots: int | None = None,
        longest: int | None = None,
        capacity: Capacity | None = None,
        prompt_cache: int = 0,
    ) -> Scheduler:
        """A scheduler over an engine of its own: of ``capacity``, or of the size :func:`size` chooses for
        ``slots`` requests of up to ``longest`` tokens; ``prompt_cache`` bytes keep the prompts of slots that
        move on (:mod:`.promptcache`)."""
        runtime = runtime or RuntimeSettings()
        chosen = capacity or size(model, runtime, extend or ExtendSettings(), slots, longest)
        return cls(Engine.create(model, chosen.slots, chosen.cells, runtime, prompt_cache))

    @classmethod
    def over(cls, sequence) -> Scheduler:
        """One slot over a sequence that already has a context of its own (a :class:`~.session.Session`)."""
        return cls(Engine(sequence.context, [sequence]))

    def warm_up(self) -> None:
        """One small decode in every slot's stream, then forgotten: the first requests a server takes then
        do not pay for llama.cpp's first graphs of several streams (measured: 4 prompts of 40 tokens took
        0.48 s as the server's first step, 0.19 s after)."""
        self.engine.warm_up()

    def close(self) -> None:
        """Every request still waiting ends with an Interrupted error; the engine closes."""
        self.refuse_waiting(Interrupted("the scheduler closed before this request started"))
        self.engine.close()

    def refuse_waiting(self, error: Exception) -> None:
        """End every request still waiting for a slot with ``error``."""
        while self.waiting:
            _refuse(self.waiting.popleft(), error)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cells(self) -> int:
        """KV cells each slot holds: the longest request, prompt and reply."""
        return self.engine.cells

    @property
    def slots(self) -> int:
        return len(self.engine.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.engine.active > 0

    # -- intake ---------------------------------------------------------------------------------

    def plan(self, request: Request) -> Plan:
        """Plan ``request`` within a slot's cells (pure; raises InputTooLongError and the like); kept on it."""
        if request.plan is None:
            request.plan = self.engine.plan(request)
        return request.plan

    def submit(self, request: Request) -> None:
        """Plan ``request`` (a bad one raises here, before it waits) and queue it behind the others."""
        if not request.prompt:
            raise EngineError("nothing to ingest: the prompt is empty", param="input")
        self.plan(request)
        self.waiting.append(request)

    # -- running --------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting requests while slots are free; a request its slot refuses ends with that error."""
        while self.waiting and self.engine.free:
            request = self.waiting.popleft()
            if request.cancelled():
                _refuse(request, None)
                continue
            try:
                self.engine.add(request)
            except Exception as exc:  # delivered to the request; the others go on
                _refuse(request, exc)

    def advance(self) -> bool:
        """Admit waiting requests, then one step of the engine; False when there was nothing to do."""
        self._admit()
        if not self.engine.active:
            return False
        try:
            self.engine.step()
        except Exception as exc:  # a defect, not a request's fault: fail what is running, go on
            self.engine.fail_all(exc)
        return True

    def steps(self) -> Iterator[None]:
        """Step until nothing is waiting or running, yielding after each step (callers act in between)."""
        while self.advance():
            yield

    def run(self) -> None:
        """Serve every request submitted (and every one submitted meanwhile) to its end."""
        for _ in self.steps():
            pass

    def stream(self, request: Request, should_stop: Callable[[], bool] | None = None) -> Iterator[Chunk]:
        """Serve ``request`` and yield its chunks as they come; its error is raised (a stop while the
        prompt is read raises Interrupted). For a scheduler with nothing else to do."""
        chunks: deque[Chunk] = deque()
        errors: list[Exception] = []
        request.on_chunk, request.on_error = chunks.append, errors.append
        if should_stop is not None:
            request.cancelled = should_stop
        self.submit(request)
        for _ in self.steps():
            while chunks:
                yield chunks.popleft()
            if errors:
                raise errors[0]
        while chunks:
            yield chunks.popleft()
        if errors:
            raise errors[0]


def _refuse(request: Request, error: Exception | None) -> None:
    """End a request that never started: its error (or nothing, for one whose caller went away)."""
    if error is not None:
        request.on_error(error)
    request.on_finish()


class ServingThread:
    """A :class:`Scheduler` on a thread of its own, for requests from other threads (the HTTP server).

    The scheduler is made on that thread, from ``make``; requests arrive through a thread-safe queue and
    at most ``slots + queue_size`` are admitted at once (:meth:`admit`: the server answers 429 beyond). A
    request whose ``cancelled`` event is set (its client went away, or the server stops) is cancelled at
    the next step and its slot freed.

    A request's events are delivered after the step that made them, all together, when the engine is about
    to enter llama_decode: a callback that wakes another thread (the server's event loop) mid-step would
    let that thread take the GIL at the engine's next call into llama.cpp and hold the step up for its
    whole turn (measured: 0.27 ms of an 8 ms token).
    """

    def __init__(self, make: Callable[[], Scheduler], queue_size: int) -> None:
        self.queue_size = queue_size
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0  # admitted and not finished: running and waiting
        self.running: set[threading.Event] = set()
        self.scheduler: Scheduler | None = None
        self.outbox: list[tuple[Callable, tuple]] = []  # this step's events; only the engine's thread uses it
        ready: queue.Queue[Exception | None] = queue.Queue()
        arena.share_main_arena()  # decodes ran 10-15% slower on a thread arena or fresh mappings
        self.thread = threading.Thread(target=self._run, args=(make, ready), name="selfextend-engine", daemon=True)
        self.thread.start()
        if (error := ready.get()) is not None:  # e.g. a context beyond the machine's memory
            self.thread.join()
            raise error
        self.slots, self.cells = self.scheduler.slots, self.scheduler.cells

    @property
    def busy_slots(self) -> int:
        return self.scheduler.engine.active

    def plan(self, request: Request) -> Plan:
        """Plan the request now, on the caller's thread (pure), so a bad one is refused before it waits."""
        return self.scheduler.plan(request)

    def admit(self) -> bool:
        """Take a place (in a slot or in the queue) if one is free; :meth:`submit` must follow."""
        with self.lock:
            if self.pending >= self.slots + self.queue_size:
                return False
            self.pending += 1
            return True

    def submit(self, request: Request, cancelled: threading.Event) -> None:
        """Queue an admitted request; ``cancelled`` set means its client went away (or the server stops)."""
        request.cancelled = cancelled.is_set
        finish = request.on_finish

        def finished() -> None:  # the place is given back when the request ends, however it ends
            try:
                finish()
            finally:
                with self.lock:
                    self.pending -= 1
                    self.running.discard(cancelled)

        request.on_start, request.on_chunk = self._later(request.on_start), self._later(request.on_chunk)
        request.on_error, request.on_finish = self._later(request.on_error), self._later(finished)
        if request.progress is not None:
            request.progress = self._later(request.progress)
        with self.lock:
            self.running.add(cancelled)
        self.inbox.put(request)

    def stop(self, wait: bool = True) -> None:
        """Cancel every request (one running ends with its last chunk, one waiting with an Interrupted
        error), then end the thread and free the engine; ``wait``: until it has."""
        with self.lock:
            for cancelled in self.running:
                cancelled.set()
        self.inbox.put(None)
        if wait:
            self.thread.join(timeout=10)

    def _later(self, callback: Callable) -> Callable:
        """``callback``, called once the step that calls it is over (:meth:`_deliver`)."""
        return lambda *args: self.outbox.append((callback, args))

    def _deliver(self) -> None:
        outbox, self.outbox = self.outbox, []
        for callback, args in outbox:
            try:
                callback(*args)
            except Exception:  # a front end's defect: the other events (its on_finish too) still go out
                logging.getLogger(__name__).exception("a request's callback failed")

    def _run(self, make: Callable[[], Scheduler], ready: queue.Queue) -> None:
        try:
            self.scheduler = make()
            self.scheduler.warm_up()
        except Exception as exc:
            ready.put(exc)
            return
        ready.put(None)
        scheduler = self.scheduler
        try:
            taking = True
            while taking or scheduler.busy:  # once told to stop, until the cancelled requests have ended
                if taking:
                    taking = self._take(block=not scheduler.busy)
                    if not taking:
                        scheduler.refuse_waiting(Interrupted("the server stopped before this request started"))
                scheduler.advance()
                self._deliver()
            while not self.inbox.empty():  # arrived after the stop: they never start
                if (request := self.inbox.get_nowait()) is not None:
                    _refuse(request, None)
        finally:
            scheduler.close()
            self._deliver()

    def _take(self, block: bool) -> bool:
        """Hand arrived requests to the scheduler (waiting for one when ``block``); False once told to stop."""
        while True:
            if not block and self.inbox.empty():  # as each step asks: cheaper than get's Empty
                return True
            try:
                request = self.inbox.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            self.scheduler.submit(request)
            block = False
