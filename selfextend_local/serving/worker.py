"""The server's engine thread: admits waiting requests into free slots of an :class:`Engine`, steps it,
and lets each request's callbacks hand its chunks to the event loop it came from.

Requests wait in a bounded queue (the HTTP layer refuses one more with 429). A request whose client went
away is cancelled, and its slot freed, at the next step.
"""

from __future__ import annotations

import queue
import threading

from ..engine.model import Model
from ..engine.planning import Plan
from ..engine.settings import RuntimeSettings
from ..engine.slots import Engine, Request


class Worker:
    """Owns the engine; one thread runs it."""

    def __init__(self, model: Model, runtime: RuntimeSettings, slots: int, cells: int, queue_size: int) -> None:
        self.slots = slots
        self.queue_size = queue_size
        self.requests: queue.Queue[tuple[Request, threading.Event] | None] = queue.Queue()
        self.pending = 0  # running and waiting
        self.running: set[threading.Event] = set()
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        ready: queue.Queue[Exception | None] = queue.Queue()
        self.thread = threading.Thread(
            target=self._run, args=(model, runtime, slots, cells, ready), name="selfextend-engine", daemon=True
        )
        self.thread.start()
        if (error := ready.get()) is not None:  # e.g. a context beyond the machine's memory
            self.thread.join()
            raise error
        self.cells = self.engine.cells

    def plan(self, request: Request) -> Plan:
        """Plan the request now (pure), so a bad one is refused before it waits; the engine keeps the plan."""
        request.plan = self.engine.plan(request)
        return request.plan

    def admit(self) -> bool:
        """Take a place (in a slot or in the queue) if one is free."""
        with self.lock:
            if self.pending >= self.slots + self.queue_size:
                return False
            self.pending += 1
            return True

    def submit(self, request: Request, cancelled: threading.Event) -> None:
        """Queue an admitted request; ``cancelled`` set means its client went away (or the server stops)."""
        request.cancelled = cancelled.is_set
        self.requests.put((request, cancelled))

    @property
    def busy_slots(self) -> int:
        return len(self.running)

    def stop(self) -> None:
        """Cancel every request, running or waiting, then end the thread and free the engine."""
        with self.requests.mutex:
            for item in self.requests.queue:
                if item is not None:
                    item[1].set()
        self._cancel_running()
        self.requests.put(None)
        self.thread.join(timeout=10)

    def _run(self, model: Model, runtime: RuntimeSettings, slots: int, cells: int, ready: queue.Queue) -> None:
        # The context is made on the thread that decodes with it: llama.cpp's CPU threads (an OpenMP team)
        # belong to the calling thread, and a second team idling beside the first halves decode speed.
        try:
            self.engine = Engine.create(model, slots, cells, runtime)
        except Exception as exc:
            ready.put(exc)
            return
        ready.put(None)
        try:
            self._serve()
        finally:
            self.engine.close()

    def _serve(self) -> None:
        running = True
        while running or self.engine.active:
            if running:
                running = self._take(block=not self.engine.active)
            if self.engine.active:
                try:
                    self.engine.step()
                except Exception as exc:  # a defect, not a request's fault: fail what is running, go on
                    self.engine.fail_all(exc)
        while True:  # answer whatever is still waiting
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._refuse(item[0], None)

    def _take(self, block: bool) -> bool:
        """Start waiting requests while slots are free; False once told to stop."""
        while self.engine.free:
            try:
                item = self.requests.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                self._cancel_running()
                return False
            block = False
            self._start(*item)
        return True

    def _cancel_running(self) -> None:
        with self.lock:
            for cancelled in self.running:
                cancelled.set()

    def _start(self, request: Request, cancelled: threading.Event) -> None:
        if cancelled.is_set():
            self._refuse(request, None)
            return
        finish = request.on_finish

        def finished() -> None:
            finish()
            self._release(cancelled)

        request.on_finish = finished
        with self.lock:
            self.running.add(cancelled)
        try:
            self.engine.add(request)
        except Exception as exc:  # delivered to the request, the worker goes on
            request.on_error(exc)
            finished()

    def _refuse(self, request: Request, error: Exception | None) -> None:
        """End a request that never started: its error (or nothing, for one whose client is gone)."""
        if error is not None:
            request.on_error(error)
        request.on_finish()
        self._release(None)

    def _release(self, cancelled: threading.Event | None) -> None:
        with self.lock:
            self.running.discard(cancelled)
            self.pending -= 1
