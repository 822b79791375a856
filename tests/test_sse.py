"""The server's event streams: whole events as the handler made them, and a ping while nothing comes."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from selfextend_local.serving.sse import DONE, EventStream, event


def test_a_quiet_stream_is_pinged_and_its_events_arrive_whole_and_in_order():
    async def events():
        yield event({"n": 1})
        await asyncio.sleep(0.35)  # a long prompt being read: nothing to send for a while
        yield event({"n": 2, "text": "é\n"})
        yield DONE

    async def handler(_):
        return EventStream(events(), ping=0.1)

    async def fetch() -> httpx.Response:
        app = Starlette(routes=[Route("/", handler)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/")

    reply = asyncio.run(fetch())
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["cache-control"] == "no-store"
    blocks = reply.text.split("\n\n")
    assert blocks[-1] == "" and blocks[0] == 'data: {"n": 1}' and blocks[-2] == "data: [DONE]"
    assert blocks[-3] == 'data: {"n": 2, "text": "\\u00e9\\n"}'
    pings = blocks[1:-3]
    assert 1 <= len(pings) <= 4 and set(pings) == {": ping"}, blocks


def test_a_streamed_piece_made_from_its_template_is_the_event_of_the_whole_piece():
    """A reply's token events are its JSON around the text, made once: the bytes equal the event of the whole
    piece for text that JSON escapes, and for a model whose name holds the template's own mark."""
    from selfextend_local.serving.openai import Reply

    for chat in (True, False):
        reply = Reply.new('odd "model" \x00text\x00', chat, {"group": 4, "window": 1024})
        for text in ("", "plain", 'a "quote", a \\ and\na line', "é中😀", "\x00text\x00", "</script>"):
            assert reply.piece_event(text) == event(reply.piece(text)), (chat, text)
