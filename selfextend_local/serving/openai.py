"""The OpenAI response shapes (which llama-cpp-python's high-level API returns too): completions, chat
completions, their stream chunks and usage. Shared by the HTTP server and :class:`selfextend_local.Llama`."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from functools import cached_property

from ..engine.sampling import Chunk


def finish_reason(chunk: Chunk | None) -> str:
    return "length" if chunk and chunk.finish_reason == "length" else "stop"


def drafts(chunk: Chunk) -> dict:
    """Tokens drafted from the request's own text and kept, as llama.cpp's server says them (only when some
    were drafted)."""
    return {"draft_n": chunk.drafted, "draft_n_accepted": chunk.accepted} if chunk.drafted else {}


def timings(chunk: Chunk | None) -> dict:
    """llama.cpp's server's ``timings`` of a reply: the prompt read and the tokens generated, in
    milliseconds, and the drafts."""
    if chunk is None:
        return {}
    read, generated = chunk.prompt_tokens - chunk.reused_tokens, chunk.generated_tokens
    prompt_ms, predicted_ms = chunk.prompt_seconds * 1000, chunk.generate_seconds * 1000
    return {
        "cache_n": chunk.reused_tokens,
        "prompt_n": read,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / read if read else 0.0,
        "prompt_per_second": chunk.prompt_tps,
        "predicted_n": generated,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / generated if generated else 0.0,
        "predicted_per_second": chunk.generate_tps,
        **drafts(chunk),
    }


def usage(chunk: Chunk | None, prompt_tokens: int) -> dict:
    """OpenAI's usage, with the prompt tokens reused from the cache as ``cached_tokens``."""
    completion = chunk.generated_tokens if chunk else 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": chunk.reused_tokens if chunk else 0},
    }


@dataclass(frozen=True)
class Reply:
    """One response's identity: ``chat`` (chat.completion) or not (text_completion); ``served``, the
    SelfExtend setting that served it (``selfextend`` in the response, beside ``usage``); ``tool``, the
    function a chat reply calls (its text is then the call's arguments, sent as ``tool_calls``)."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0
    served: dict | None = None
    tool: str | None = None
    call_id: str = ""

    @classmethod
    def new(cls, model: str, chat: bool, served: dict | None = None, tool: str | None = None) -> Reply:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return cls(model, chat, rid, int(time.time()), served, tool, f"call_{uuid.uuid4().hex[:24]}")

    def _finish(self, finish: str | None) -> str | None:
        return "tool_calls" if self.tool is not None and finish == "stop" else finish

    def _message(self, text: str) -> dict:
        if self.tool is None:
            return {"role": "assistant", "content": text}
        call = {"id": self.call_id, "type": "function", "function": {"name": self.tool, "arguments": text}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def _text_delta(self, text: str, first: bool) -> dict:
        if self.tool is None:
            return {"role": "assistant", "content": text} if first else {"content": text}
        if first:
            return {**self._message(text), "tool_calls": [{"index": 0, **self._message(text)["tool_calls"][0]}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    def _served(self) -> dict:
        return {"selfextend": self.served} if self.served is not None else {}

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, text: str, last: Chunk | None, prompt_tokens: int) -> dict:
        """The complete response: one choice with the text, its finish reason, and usage."""
        choice = {"index": 0, "logprobs": None, "finish_reason": self._finish(finish_reason(last))}
        if self.chat:
            choice["message"] = self._message(text)
            kind = "chat.completion"
        else:
            choice["text"] = text
            kind = "text_completion"
        return self._envelope(kind, [choice], usage=usage(last, prompt_tokens), timings=timings(last), **self._served())

    def piece(self, text: str, first: bool = False, finish: str | None = None) -> dict:
        """A stream chunk with ``text`` (the chat's first one carries the role; the last, the reason and
        the setting that served it)."""
        if self.chat:
            return self.delta(self._text_delta(text, first), self._finish(finish))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], **(self._served() if finish else {}))

    def piece_event(self, text: str) -> bytes:
        """The server-sent event of ``piece(text)`` (neither the first nor the last), as bytes: the JSON
        around the text is made once a reply, so a streamed token costs one ``json.dumps`` of its text
        (the event loop's time a token is taken from the decode's two cores)."""
        before, after = self._around
        return before + json.dumps(text).encode() + after

    @cached_property
    def _around(self) -> tuple[bytes, bytes]:
        """A piece's event before and after its text (the text is the last string in it)."""
        mark = "\x00text\x00"
        before, _, after = json.dumps(self.piece(mark)).rpartition(json.dumps(mark))
        return b"data: " + before.encode(), after.encode() + b"\n\n"

    def delta(self, delta: dict, finish: str | None = None) -> dict:
        """A chat stream chunk with any ``delta`` (``{"role": ...}``, ``{"content": ...}``, or ``{}``)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._envelope("chat.completion.chunk", [choice], **(self._served() if finish else {}))

    def progress_piece(self, progress: dict) -> dict:
        """A stream chunk that only says how far the prompt has been read, as llama.cpp's server sends it."""
        if self.chat:
            return {**self.delta({"role": "assistant", "content": None}), "prompt_progress": progress}
        return {**self.piece(""), "prompt_progress": progress}

    def usage_piece(self, last: Chunk, prompt_tokens: int) -> dict:
        """The stream's closing usage chunk (``stream_options.include_usage``)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [], usage=usage(last, prompt_tokens), timings=timings(last), **self._served())
