"""OpenAI's API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

A request's settings are its own where it gives them and the server's where it does not: no field here
has a default or a bound of its own (those are the settings dataclasses', :mod:`~..engine.settings`, so a
value out of range is refused with the same words as on the command line, naming the request's field).
Fields OpenAI has and this server does not honour are refused by name unless their value changes nothing.
Every response says which SelfExtend setting served it (``selfextend`` beside ``usage``), and a streamed
one reports how far a long prompt has been read when asked (``return_progress``, as llama.cpp's server).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..engine.errors import BadInputError, Name, Naming, SelfExtendError, cut
from ..engine.grammar import Structure, response_format_structure
from ..engine.sampling import Chunk, check_grammar
from ..engine.settings import ExtendSettings, SamplingSettings
from ..engine.slots import Held
from ..engine.slots import Request as EngineRequest
from .http import (
    APIError,
    Call,
    Progress,
    Server,
    chat_tokens,
    http_naming,
    off_loop,
    parse,
    prompt_tokens,
    served_by,
    server_of,
)
from .http import start as start_call
from .http import watch as watch_call
from .openai import Reply, timings
from .sse import DONE, EventStream, event
from .tools import Tool, openai_choice, with_note


class SelfExtendOptions(BaseModel):
    """The extra body field ``selfextend``: a field left out is the server's setting. ``draft``: tokens
    drafted a step from the request's own text (a sampling setting; the others are SelfExtend's)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    group: int | None = None
    window: int | None = None
    schedule: str | None = None
    draft: int | None = None

    def extend_fields(self) -> dict:
        return {k: v for k, v in self.model_dump(exclude={"draft"}).items() if v is not None}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list | None = None  # an assistant's calls, as a client sends its conversation back

    def text(self, index: int) -> str:
        """The content as one string: text parts joined; null only where OpenAI allows it (assistant, whose
        calls' arguments are then its text, so the model sees what it wrote)."""
        if self.content is None:
            if self.role != "assistant":
                raise APIError(400, f"messages[{index}].content is null", param=f"messages.{index}.content")
            return "\n".join(_call_text(call) for call in self.tool_calls or [])
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"messages[{index}] has a content part of type {part.type!r}; only text parts are supported",
                    param=f"messages.{index}.content",
                )
        return "".join(part.text for part in self.content)


def _call_text(call: object) -> str:
    arguments = call.get("function", {}).get("arguments") if isinstance(call, dict) else None
    return arguments if isinstance(arguments, str) else ""


# OpenAI's fields this server does not honour, with the values that change nothing (accepted); any other
# value is refused by name, as `Llama` refuses the same arguments. Fields that only describe the caller are
# ignored, as OpenAI's own documentation says they may be.
NEUTRAL_FIELDS: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


class CommonRequest(BaseModel):
    """What a completion and a chat completion share. None everywhere means "the server's default"."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama.cpp's extensions, as its server takes them
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int | None = None
    stream_options: dict | None = None
    return_progress: bool = False
    selfextend: SelfExtendOptions | None = None

    input_param: ClassVar[str] = "prompt"  # how the request names its input, for errors

    def structure(self) -> Structure | None:
        return None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field this server does not honour (or does not know)."""
        if self.n not in (None, 1):
            raise APIError(400, f"n must be 1: this server gives one choice a request, got {self.n}", param="n")
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED_FIELDS or (key in NEUTRAL_FIELDS and value in NEUTRAL_FIELDS[key]):
                continue
            if key in NEUTRAL_FIELDS:
                message = f"{key} is not supported by this server; leave it out"
            else:
                message = f"unrecognised request field {cut(key)!r}"
            raise APIError(400, message, param=cut(key), code="unsupported_field")

    def sampling_fields(self) -> dict:
        """The sampling settings this request gives (the others are the defaults)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "stop": tuple(s for s in stops if s) or None,
            "draft": self.selfextend.draft if self.selfextend else None,
        }
        return {k: v for k, v in given.items() if v is not None}


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    response_format: dict | None = None
    document: str | None = None  # a document given to the server: the last user message is a question on it
    tools: list | None = None
    tool_choice: str | dict | None = None

    input_param: ClassVar[str] = "messages"

    def tool(self) -> Tool | None:
        """The function the reply calls (:mod:`.tools`), or None for a text (or response_format) reply."""
        tool = openai_choice(self.tools, self.tool_choice)
        if tool is not None and self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "give a response_format or a function to call, not both", param="response_format")
        return tool

    def structure(self) -> Structure | None:
        tool = self.tool()
        return tool.structure("tools") if tool else response_format_structure(self.response_format)


class CompletionRequest(CommonRequest):
    prompt: str


def extend_for(options: SelfExtendOptions | None, base: ExtendSettings) -> ExtendSettings:
    """The server's setting with the fields the request gives in its stead."""
    return replace(base, **options.extend_fields()) if options else base


def sampling_for(fields: dict, structure: Structure | None, server: Server) -> SamplingSettings:
    """The default sampling with the request's own ``fields`` and structure (each field's type and range
    checked by :class:`SamplingSettings`, then max_tokens against the server's limit, and the grammar
    against llama.cpp's parser)."""
    settings = replace(SamplingSettings(draft=server.draft), **fields, **(structure.fields() if structure else {}))
    most = server.limits.max_tokens
    if settings.max_tokens > most:
        raise BadInputError(
            "{name} {n} is over this server's limit {most}",
            param="max_tokens",
            name=Name("max_tokens"),
            n=settings.max_tokens,
            most=most,
        )
    if structure is not None:
        check_grammar(server.model.vocab, structure.grammar)
    return settings


def naming_for(req: CommonRequest, tool: Tool | None = None) -> Naming:
    """The request's field names; a reply held to a function's arguments blames ``tools`` for its schema."""
    naming = http_naming(req.input_param)
    return Naming({**naming.names, "response_format": "tools", "grammar": "tools"}) if tool else naming


def settings_for(req: CommonRequest, server: Server) -> tuple[ExtendSettings, SamplingSettings]:
    """The request's SelfExtend and sampling settings; errors name the request's own fields."""
    try:
        return extend_for(req.selfextend, server.extend), sampling_for(req.sampling_fields(), req.structure(), server)
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming(req.input_param)) from None


@dataclass
class Begun:
    """A request under way: its events, the reply they make, and its call (to cancel it)."""

    events: AsyncIterator
    reply: Reply
    call: Call
    n_prompt: int


async def begin(
    request: Request,
    req: CommonRequest,
    tokens: list[int],
    chat: bool,
    held: Held | None = None,
    tool: Tool | None = None,
    settings: tuple[ExtendSettings, SamplingSettings] | None = None,
    finished: Callable[[], None] | None = None,
) -> Begun:
    """Hand ``tokens`` to the engine as ``req`` asks (``settings``: already made from it; ``finished``:
    called, from any thread, once the engine is done with it) and wait until it has a slot."""
    server = server_of(request)
    extend, sampling = settings or await off_loop(server, settings_for, req, server)
    call = Call(asyncio.get_running_loop(), naming_for(req, tool))
    engine_request = EngineRequest(tokens, sampling, extend, held=held)
    call.wire(engine_request, progress=req.stream and req.return_progress, server=server)
    if finished is not None:
        wired = engine_request.on_finish
        engine_request.on_finish = lambda: (wired(), finished())
    events = await start_call(server, call, engine_request)
    reply = Reply.new(server.model_id, chat, served_by(engine_request, server.runtime), tool and tool.name)
    return Begun(events, reply, call, len(tokens))


async def respond(
    request: Request,
    req: CommonRequest,
    tokens: list[int],
    chat: bool,
    held: Held | None = None,
    tool: Tool | None = None,
):
    """Serve ``tokens`` as ``req`` asks and answer in OpenAI's shape (``tool``: as a call to it)."""
    begun = await begin(request, req, tokens, chat, held, tool)
    return EventStream(stream(begun, req)) if req.stream else await whole(request, begun)


def stream(begun: Begun, req: CommonRequest) -> AsyncIterator[bytes]:
    """The request's server-sent events."""
    return _events(begun.events, begun.reply, bool((req.stream_options or {}).get("include_usage")))


async def whole(request: Request, begun: Begun) -> dict:
    """The whole reply, once generated (cancelled if the client goes away first)."""
    watcher = asyncio.create_task(watch_call(request, begun.call))
    try:
        parts, last = [], None
        async for item in begun.events:
            if isinstance(item, Chunk):
                parts.append(item.text)
                last = item
    finally:
        watcher.cancel()
    return begun.reply.whole("".join(parts), last, begun.n_prompt)


async def _events(events: AsyncIterator, reply: Reply, include_usage: bool):
    """Server-sent events in the OpenAI streaming shape, ending with ``[DONE]``."""
    last = None
    first = True
    try:
        async for item in events:
            if isinstance(item, Progress):
                yield event(reply.progress_piece(item.as_dict()))
                continue
            last = item
            if last.finish_reason is not None:
                break
            yield event(reply.piece(last.text, first=True)) if first else reply.piece_event(last.text)
            first = False
        finish = "length" if last and last.finish_reason == "length" else "stop"
        yield event({**reply.piece(last.text if last else "", finish=finish), "timings": timings(last)})
        if include_usage and last is not None:
            yield event(reply.usage_piece(last, last.prompt_tokens))
        yield DONE
    except APIError as exc:
        yield event({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}})


# -- the routes -------------------------------------------------------------------------------------

router = APIRouter()


def model_card(server: Server) -> dict:
    created = int(server.model.path.stat().st_mtime)
    return {"id": server.model_id, "object": "model", "created": created, "owned_by": "local"}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(server_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict:
    server = server_of(request)
    if model_id != server.model_id:
        raise APIError(
            404,
            f"the model {cut(model_id)!r} does not exist; this server has {server.model_id!r}",
            param="model",
            code="model_not_found",
        )
    return model_card(server)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = await parse(request, ChatRequest)
    server = server_of(request)
    messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
    tool = req.tool()
    if req.document is not None:
        if tool is not None:
            raise APIError(400, "a question about a document is answered in text; leave out tools", param="tools")
        return await request.app.state.documents.about(request, req, messages)  # :mod:`.documents_api`
    if tool is not None:
        messages = with_note(messages, tool)
    tokens = await off_loop(server, chat_tokens, server.model, messages)
    return await respond(request, req, tokens, chat=True, tool=tool)


@router.post("/v1/completions")
async def completions(request: Request):
    req = await parse(request, CompletionRequest)
    if not req.prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    server = server_of(request)
    return await respond(request, req, await off_loop(server, prompt_tokens, server.model, req.prompt), chat=False)
