"""The server's engine thread: admits waiting jobs into free slots of a :class:`BatchEngine`, steps it,
and hands every job's chunks to the event loop the job came from.

Jobs wait in a bounded queue (the HTTP layer refuses one more with 429). Each job gets ``STARTED`` once
it has a slot (or the error that kept it from one), then its chunks, then ``None``. A job whose client
went away is cancelled and its slot freed at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from .batching import BatchEngine, Request
from .model import Model
from .planning import Plan
from .settings import ExtendSettings, RuntimeSettings, SamplingSettings

STARTED = "started"  # the first item of a job: it has a slot and its prompt is being read


@dataclass(eq=False)
class Job:
    tokens: list[int]
    extend: ExtendSettings
    sampling: SamplingSettings
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Worker:
    """Owns the batch engine; one thread runs it."""

    def __init__(self, model: Model, runtime: RuntimeSettings, slots: int, cells: int, queue_size: int) -> None:
        self.slots = slots
        self.queue_size = queue_size
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0  # running and waiting
        self.running: set[Job] = set()
        self.lock = threading.Lock()
        self.engine: BatchEngine | None = None
        ready: queue.Queue[Exception | None] = queue.Queue()
        self.thread = threading.Thread(
            target=self._run, args=(model, runtime, slots, cells, ready), name="selfextend-engine", daemon=True
        )
        self.thread.start()
        if (error := ready.get()) is not None:  # e.g. a context beyond the machine's memory
            self.thread.join()
            raise error
        self.cells = self.engine.cells

    def plan(self, job: Job) -> Plan:
        """The plan the job will get, computed here (pure), so a bad request is refused before it waits."""
        request = Request(job.tokens, job.sampling, job.extend)
        return self.engine.plan(request)

    def admit(self) -> bool:
        """Take a place (in a slot or in the queue) if one is free."""
        with self.lock:
            if self.pending >= self.slots + self.queue_size:
                return False
            self.pending += 1
            return True

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel every job, running or waiting, then end the thread and free the engine."""
        with self.jobs.mutex:
            for job in self.jobs.queue:
                if job is not None:
                    job.cancelled.set()
        self._cancel_running()
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self, model: Model, runtime: RuntimeSettings, slots: int, cells: int, ready: queue.Queue) -> None:
        # The context is made on the thread that decodes with it: llama.cpp's CPU threads (an OpenMP team)
        # belong to the calling thread, and a second team idling beside the first halves decode speed.
        try:
            self.engine = BatchEngine(model, slots, cells, runtime)
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
                    self.engine._fail_all(exc)
        while True:  # answer whatever is still waiting
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._end(job, None)

    def _take(self, block: bool) -> bool:
        """Start waiting jobs while slots are free; False once told to stop."""
        while self.engine.free:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                self._cancel_running()
                return False
            block = False
            self._start(job)
        return True

    def _cancel_running(self) -> None:
        with self.lock:
            for job in self.running:
                job.cancelled.set()

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._end(job, None)
            return
        request = Request(
            job.tokens,
            job.sampling,
            job.extend,
            on_chunk=lambda chunk: self._chunk(job, chunk),
            on_error=lambda exc: self._end(job, exc),
            cancelled=job.cancelled.is_set,
        )
        try:
            self.engine.add(request)
        except Exception as exc:  # delivered to the request, the worker goes on
            self._end(job, exc)
            return
        with self.lock:
            self.running.add(job)
        job.send(STARTED)

    def _chunk(self, job: Job, chunk) -> None:
        job.send(chunk)
        if chunk.finish_reason is not None:
            self._end(job, None)

    def _end(self, job: Job, item) -> None:
        job.send(item)
        with self.lock:
            self.running.discard(job)
            self.pending -= 1
