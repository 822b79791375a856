"""Server-sent events as the streaming APIs send them: a handler makes each event's bytes once (:func:`event`)
and :class:`EventStream` sends them as they come, with a comment line every ``ping`` seconds so that a proxy
does not close a stream whose long prompt is still being read.

Starlette's StreamingResponse underneath, not sse-starlette's EventSourceResponse: that one opened a cancel
scope and built an event object for every event it sent, which cost the event loop ~100 us a streamed token
on the two cores llama.cpp's threads are using (loop CPU a token, one client: 213-233 us before, 169-195
after). A server that stops cuts its streams after uvicorn's graceful-shutdown timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable

from starlette.responses import StreamingResponse
from starlette.types import Send

PING_SECONDS = 15.0
DONE = b"data: [DONE]\n\n"


def event(data: dict) -> bytes:
    """One ``data:`` event holding ``data`` as JSON."""
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response of the events ``events`` yields (bytes, each a whole event)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterable[bytes], ping: float = PING_SECONDS) -> None:
        super().__init__(events, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.ping = ping

    async def stream_response(self, send: Send) -> None:
        pinging = asyncio.ensure_future(self._ping(send))
        try:
            await super().stream_response(send)
        finally:
            pinging.cancel()  # the last body is sent (or the client is gone): no ping after it

    async def _ping(self, send: Send) -> None:
        while True:
            await asyncio.sleep(self.ping)
            await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
