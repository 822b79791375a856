"""One reading of a document, shared by everyone who waits on it, and one engine request a document at a time.

A :class:`Reading` is one engine request that reads a document into a slot, followed by any number of
clients (the page's tabs through ``/read``, questions waiting to be asked); each follower gets every event
from the last one on, and the reading is cancelled only when the last of them leaves. :class:`Turns`
lets one engine request at a time work on a document (a reading, then each question in turn), so that a
second request on the document finds it held in the slot the first one left, instead of reading it again
in another slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from ..engine.errors import SelfExtendError
from ..engine.eta import Clock
from .http import DISCONNECT_POLL, APIError, http_naming


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

    def __post_init__(self) -> None:
        self.last = {"state": "waiting", "done": 0, "total": self.total}  # for its turn, or for a slot

    @property
    def going(self) -> bool:
        """Under way and wanted: a new follower may join it."""
        return not self.over and not self.cancelled.is_set()

    def status(self) -> dict:
        """How far it is, for a document's card: ``state`` (waiting or reading), ``done`` and ``total``
        tokens, ``tokens_per_second`` and ``seconds_left`` (None until measured), ``followers``."""
        last = self.last
        state = last.get("state") if last.get("state") in ("waiting", "reading") else "reading"
        return {
            "state": state,
            "done": last.get("done", 0),
            "total": self.total,
            "tokens_per_second": last.get("tokens_per_second"),
            "seconds_left": last.get("seconds_left"),
            "followers": len(self.followers),
        }

    def follow(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(self.last)
        if self.over:
            queue.put_nowait(None)
        self.followers.append(queue)
        return queue

    def leave(self, queue: asyncio.Queue) -> None:
        if queue in self.followers:
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

    def end(self, state: str, seconds: float | None = None) -> None:
        """The last events: ``state`` (ready or cancelled) unless it failed, then the end."""
        if self.last.get("state") != "failed":
            took = round(time.perf_counter() - self.began, 2) if seconds is None else seconds
            self.publish({"state": state, "source": self.source, "total": self.total, "seconds": took})
        self.publish(None)

    def fail(self, error: dict) -> None:
        self.publish({"state": "failed", "error": error})
        self.publish(None)

    # -- called on the engine's thread ----------------------------------------------------------

    def started(self, reused: int) -> None:
        """It has a slot, which held (or a checkpoint gave) ``reused`` tokens: its time counts from now."""
        self.reused, self.began = reused, time.perf_counter()
        self.clock.mark(reused, self.began)  # the reading's first point: where it starts

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
        took = round(time.perf_counter() - self.began, 2)
        self.loop.call_soon_threadsafe(lambda: self.end("cancelled" if self.cancelled.is_set() else "ready", took))


def error_body(exc: Exception) -> dict:
    if isinstance(exc, APIError):
        return exc.body()["error"]
    if isinstance(exc, SelfExtendError):
        return APIError.of(exc, http_naming("document")).body()["error"]
    return {"message": str(exc), "type": "server_error", "param": None, "code": None}


async def progress_of(reading: Reading, queue: asyncio.Queue, request: Request | None = None) -> AsyncIterator[dict]:
    """The reading's progress as llama.cpp's server reports a prompt's (``total``, ``cache``,
    ``processed``, ``time_ms``) until it is ready; an APIError when it fails or is cancelled, or when the
    client (``request``) goes away."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL if request else None)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise APIError(499, "the client went away", kind="server_error") from None
            continue
        state = event.get("state") if event else None
        if state == "ready":
            return
        if state == "failed":
            error = event["error"]
            raise APIError(400 if error.get("type") == "invalid_request_error" else 503, error["message"])
        if event is None or state == "cancelled":
            raise APIError(503, "the document's reading was cancelled", kind="server_error")
        elapsed = int((time.perf_counter() - reading.began) * 1000)
        left = event.get("seconds_left")
        yield {
            "total": reading.total,
            "cache": reading.reused,
            "processed": event.get("done", 0),
            "time_ms": elapsed,
            "eta_ms": None if left is None else int(left * 1000),
        }


class Turns:
    """One engine request a document at a time (see the module's text)."""

    def __init__(self) -> None:
        self.locks: dict[str, asyncio.Lock] = {}

    async def take(self, ident: str) -> Callable[[], None]:
        """Wait for the document's turn; returns its release, to call once from any thread (later calls
        do nothing)."""
        lock = self.locks.setdefault(ident, asyncio.Lock())
        await lock.acquire()
        loop = asyncio.get_running_loop()
        guard, given = threading.Lock(), []

        def free() -> None:
            lock.release()
            if not lock.locked() and self.locks.get(ident) is lock and not getattr(lock, "_waiters", None):
                del self.locks[ident]  # nobody waits: the next one makes a new lock

        def release() -> None:
            with guard:
                if given:
                    return
                given.append(True)
            loop.call_soon_threadsafe(free)

        return release
