"""Ollama's API, for the tools that speak only it: ``/api/chat``, ``/api/generate``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``, on the same engine and slots as OpenAI's, self-extended.

Streamed replies are newline-delimited JSON (``"stream": false`` gives one object), errors are Ollama's ``{"error":
"..."}``. ``options`` map to our settings (``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``stop``,
``num_predict``, and llama.cpp's penalties ``repeat_penalty``, ``repeat_last_n``, ``presence_penalty``,
``frequency_penalty``), plus ``selfextend_group``, ``selfextend_window``, ``selfextend_schedule`` and
``selfextend_draft`` (tokens drafted a step from the request's own text; the final object then says ``draft_n`` and
``draft_n_accepted``, as llama.cpp's server's timings), each checked as the OpenAI API's fields are (the settings
dataclasses' types and bounds, a 400 naming ``options.X``); ``num_ctx`` is taken and needs no effect (a request is
served when its prompt and ``num_predict`` fit a slot, self-extended past the training context); the options that
configure Ollama's own runner (threads, GPU layers, batch, memory mapping) are the server's and ignored, as are
``keep_alive`` and ``truncate``. Any other field or option, and a value of a sampling option we do not have (mirostat,
typical_p) other than the one that changes nothing, is refused by name.
``format`` is ``"json"`` or a JSON schema, through the same grammar as OpenAI's ``response_format``; one tool in
``tools`` makes the reply a call to it (:mod:`.tools`). ``/api/generate`` with a ``context`` continues it: the prompt
as a user's turn after it, in the chat template (verbatim with ``raw``). The endpoints of Ollama's not served here
(embeddings, pulling and pushing models) answer in Ollama's shape, by name.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from dataclasses import replace
from typing import Any, ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..engine.errors import Naming, SelfExtendError, cut
from ..engine.grammar import Structure, json_structure, schema_structure
from ..engine.sampling import Chunk
from ..engine.settings import SamplingSettings
from ..engine.slots import Request as EngineRequest
from .http import (
    APIError,
    Call,
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
from .openai import drafts
from .openai_api import sampling_for
from .tools import arguments, ollama_choice, with_note

COMPATIBLE_VERSION = "0.12.0"  # the Ollama API this follows (clients read /api/version)
RUNNER_OPTIONS = frozenset(  # Ollama's settings of its own runner: here they are the server's
    {"num_thread", "num_gpu", "main_gpu", "num_batch", "use_mmap", "use_mlock", "numa", "low_vram", "vocab_only"}
)
NEUTRAL_OPTIONS = {  # sampling we do not have, accepted at the value that changes nothing
    "typical_p": (1, 1.0),
    "tfs_z": (1, 1.0),
    "mirostat": (0,),
}
IGNORED_OPTIONS = frozenset({"num_ctx", "num_keep", "penalize_newline", "mirostat_tau", "mirostat_eta"})
SAMPLING_OPTIONS = {
    **{
        key: key
        for key in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "seed",
            "repeat_penalty",
            "repeat_last_n",
            "presence_penalty",
            "frequency_penalty",
        )
    },
    "selfextend_draft": "draft",
}
NOT_SERVED = {  # Ollama's endpoints this server does not have: each says so by name
    "embed": "embeddings are not served by this server",
    "embeddings": "embeddings are not served by this server",
    "pull": "this server serves the one model it was started with; it does not pull models",
    "push": "this server does not push models",
    "create": "this server serves the one model it was started with; it does not create models",
    "copy": "this server does not copy models",
    "delete": "this server does not delete models",
    "blobs": "this server does not take model files",
}
SERVED = {"chat": "POST", "generate": "POST", "show": "POST", "tags": "GET", "ps": "GET", "version": "GET"}
EXTEND_OPTIONS = {"selfextend_group": "group", "selfextend_window": "window", "selfextend_schedule": "schedule"}


def ollama_naming() -> Naming:
    """Settings as an Ollama request names them: options.temperature, options.selfextend_group."""
    names = {value: f"options.{key}" for key, value in {**SAMPLING_OPTIONS, **EXTEND_OPTIONS}.items()}
    names.update(max_tokens="options.num_predict", stop="options.stop", grammar="format", response_format="format")
    return Naming({**http_naming("messages").names, **names, "input": "messages"})


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str = ""
    images: list | None = None
    tool_calls: list | None = None
    thinking: str | None = None
    tool_name: str | None = None

    def text(self) -> str:
        """The content; an assistant's calls with none are their arguments, so the model sees what it wrote."""
        if self.content or not self.tool_calls:
            return self.content
        calls = [c.get("function", {}).get("arguments") for c in self.tool_calls if isinstance(c, dict)]
        return "\n".join(json.dumps(a) if isinstance(a, dict) else str(a or "") for a in calls)


class OllamaRequest(BaseModel):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None

    known: ClassVar[frozenset[str]] = frozenset()

    def refuse_unsupported(self) -> None:
        for key in self.model_extra or {}:
            raise APIError(400, f"unrecognised field {cut(key)!r}", param=cut(key))
        if self.think:
            raise APIError(400, "think is not supported: this server's models do not think aloud", param="think")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server; leave them out", param="logprobs")


class ChatBody(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools and self.format not in (None, ""):
            raise APIError(400, "give format or a tool to call, not both", param="format")
        for i, message in enumerate(self.messages):
            if message.images:
                raise APIError(400, f"messages[{i}] has images; this server reads text only", param="messages")


class GenerateBody(OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.images:
            raise APIError(400, "images are not supported: this server reads text only", param="images")
        if self.suffix:
            raise APIError(400, "suffix (fill in the middle) is not supported by this server", param="suffix")
        if self.template:
            raise APIError(400, "template is not supported: the GGUF's own chat template is used", param="template")


# -- from a body to settings ------------------------------------------------------------------------


def served_name(server: Server) -> str:
    return f"{server.model_id}:latest"


def check_model(body: OllamaRequest, server: Server) -> None:
    """Ollama's answer to a model that is not served: 404, model 'NAME' not found."""
    if not body.model:
        raise APIError(400, "model is required", param="model")
    if body.model not in (server.model_id, served_name(server)):
        raise APIError(404, f"model '{cut(body.model)}' not found", param="model", code="model_not_found")


def split_options(options: dict[str, Any], server: Server) -> tuple[dict, dict]:
    """The sampling fields and SelfExtend fields the options give, as they are (their types and bounds are
    the settings dataclasses' to check); the others refused by name."""
    sampling, extend = {}, {}
    for key, value in options.items():
        if key in SAMPLING_OPTIONS:
            sampling[SAMPLING_OPTIONS[key]] = value
        elif key in EXTEND_OPTIONS:
            extend[EXTEND_OPTIONS[key]] = value
        elif key == "num_predict":
            as_long = isinstance(value, int) and not isinstance(value, bool) and value <= 0  # -1, -2: Ollama's "all"
            sampling["max_tokens"] = server.limits.max_tokens if as_long else value
        elif key == "stop":
            sampling["stop"] = (value,) if isinstance(value, str) else value
        elif key in NEUTRAL_OPTIONS:
            if value not in NEUTRAL_OPTIONS[key]:
                raise APIError(
                    400, f"options.{key} is not supported by this server; leave it out", param=f"options.{key}"
                )
        elif key not in RUNNER_OPTIONS | IGNORED_OPTIONS:
            raise APIError(400, f"unrecognised option {cut(key)!r}", param=f"options.{cut(key)}")
    return sampling, extend


def structure_of(body: OllamaRequest) -> Structure | None:
    """The reply's structure: ``format`` (``"json"`` or a schema), or the arguments of the one tool."""
    if isinstance(body, ChatBody) and (tool := ollama_choice(body.tools)) is not None:
        return tool.structure("tools")
    form = body.format
    if form in (None, ""):
        return None
    if form == "json":
        return json_structure()
    if isinstance(form, dict):
        return schema_structure(form)
    raise APIError(400, 'format must be "json" or a JSON schema', param="format")


def settings_for(body: OllamaRequest, server: Server):
    """The request's SelfExtend and sampling settings, worded in its own terms when refused."""
    try:
        sampling, extend = split_options(body.options or {}, server)
        return replace(server.extend, **extend), sampling_for(sampling, structure_of(body), server)
    except SelfExtendError as exc:
        raise APIError.of(exc, ollama_naming()) from None


# -- the replies ------------------------------------------------------------------------------------


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def stats(last: Chunk | None, total: float, served: dict) -> dict:
    """The closing fields of a reply: durations in nanoseconds, counts, the reason, and our setting."""
    if last is None:
        return {"done": True, "done_reason": "stop", "total_duration": int(total * 1e9), "selfextend": served}
    return {
        "done": True,
        "done_reason": "length" if last.finish_reason == "length" else "stop",
        "total_duration": int(total * 1e9),
        "load_duration": 0,
        "prompt_eval_count": last.prompt_tokens - last.reused_tokens,
        "prompt_eval_duration": int(last.prompt_seconds * 1e9),
        "eval_count": last.generated_tokens,
        "eval_duration": int(last.generate_seconds * 1e9),
        **drafts(last),
        "selfextend": served,
    }


async def reply(request: Request, body: OllamaRequest, tokens: list[int], piece, ending, whole: bool = False):
    """Serve ``tokens`` and answer as Ollama does: NDJSON lines of ``piece(text)`` and a last one of
    ``ending(text, generated tokens)`` with the counts (or that one object alone, with ``stream`` false;
    ``whole``: the text only in the last line, streamed or not). An error once the reply has begun ends a
    stream with an ``{"error": ...}`` line; without a stream it is the answer, with its own status (a
    grammar with no way forward is the request's fault: 400, as on the OpenAI API)."""
    began = time.perf_counter()  # Ollama's total_duration: from the request's arrival (uvloop's clock ticks in ms)
    server = server_of(request)
    extend, sampling = await off_loop(server, settings_for, body, server)
    call = Call(asyncio.get_running_loop(), ollama_naming())
    engine_request = call.wire(EngineRequest(tokens, sampling, extend))
    events = await start_call(server, call, engine_request)
    served = served_by(engine_request, server.runtime)
    streamed = body.stream and not whole

    async def lines():
        parts, generated, last = [], [], None
        async for last in events:
            if last.token is not None:
                generated.append(last.token)
            if last.text:
                parts.append(last.text)
                if streamed:
                    yield json.dumps(piece(last.text)) + "\n"
        closing = ending("" if streamed else "".join(parts), generated)
        yield json.dumps({**closing, **stats(last, time.perf_counter() - began, served)}) + "\n"

    if body.stream:

        async def guarded():
            try:
                async for line in lines():
                    yield line
            except APIError as exc:
                yield json.dumps({"error": exc.message}) + "\n"

        return StreamingResponse(guarded(), media_type="application/x-ndjson")
    watcher = asyncio.create_task(watch_call(request, call))
    try:
        text = "".join([line async for line in lines()])
    except APIError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    finally:
        watcher.cancel()
    return JSONResponse(json.loads(text))


# -- the routes -------------------------------------------------------------------------------------

router = APIRouter()


@router.post("/api/chat")
async def chat(request: Request):
    body = await parse(request, ChatBody)
    server = server_of(request)
    check_model(body, server)
    name = served_name(server)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if not messages:  # Ollama loads the model and says so
        return {
            "model": name,
            "created_at": now(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "load",
        }
    tool = ollama_choice(body.tools)
    if tool is not None:
        messages = with_note(messages, tool)
    tokens = await off_loop(server, chat_tokens, server.model, messages)

    def piece(text: str) -> dict:
        return {"model": name, "created_at": now(), "message": {"role": "assistant", "content": text}, "done": False}

    def ending(text: str, generated: list[int]) -> dict:
        message = {"role": "assistant", "content": text}
        if tool is not None and (given := arguments(text)) is not None:  # a call, as Ollama returns one
            message = {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": tool.name, "arguments": given}}],
            }
        return {"model": name, "created_at": now(), "message": message}

    return await reply(request, body, tokens, piece, ending, whole=tool is not None)


@router.post("/api/generate")
async def generate(request: Request):
    body = await parse(request, GenerateBody)
    server = server_of(request)
    check_model(body, server)
    name = served_name(server)
    if not body.prompt and not body.context:
        return {"model": name, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
    tokens = await off_loop(server, generate_tokens, server, body)

    def piece(text: str) -> dict:
        return {"model": name, "created_at": now(), "response": text, "done": False}

    def ending(text: str, generated: list[int]) -> dict:  # context: to continue from, as Ollama gives it
        return {"model": name, "created_at": now(), "response": text, "context": tokens + generated}

    return await reply(request, body, tokens, piece, ending)


def generate_tokens(server: Server, body: GenerateBody) -> list[int]:
    """The prompt as Ollama gives it: verbatim when raw, else in the model's chat template as a user's
    message (after ``system``). After a ``context`` (a reply's, to continue from), the prompt is the next
    user's turn: the assistant's turn that the context ends in closed, as the template closes it."""
    context = checked_context(server, body.context or [])
    if body.raw:
        return context + prompt_tokens(server.model, body.prompt, special=True)
    if context:
        return context + (next_turn(server.model, body.prompt) if body.prompt else [])
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": body.prompt}
    ]
    return chat_tokens(server.model, messages, "prompt")


def checked_context(server: Server, context: list[int]) -> list[int]:
    """The context's token ids, each one of the model's (llama_decode fails a whole batch on one that is not)."""
    n_vocab = server.model.n_vocab
    wrong = next((i for i, token in enumerate(context) if not 0 <= token < n_vocab), None)
    if wrong is not None:
        raise APIError(
            400,
            f"context[{wrong}] = {cut(str(context[wrong]))} is not a token id of this model (0 to {n_vocab - 1}); "
            "send back the context a reply gave",
            param="context",
        )
    return list(context)


def next_turn(model, prompt: str) -> list[int]:
    """The tokens after an assistant's reply that make ``prompt`` the user's next turn: what the chat
    template writes after an assistant's message and around a user's (a line break without a template)."""
    if not model.info.chat_template:
        return prompt_tokens(model, "\n" + prompt)
    try:
        pieces = model.chat_segments([{"role": "assistant", "content": "-"}, {"role": "user", "content": prompt}])
    except SelfExtendError as exc:
        raise APIError.of(exc, http_naming("prompt")) from None
    reply = next(i for i, (_, markup) in enumerate(pieces) if not markup)  # the assistant's own text
    return model.segments_tokens(pieces[reply + 1 :], bos=False)


def details(server: Server) -> dict:
    info = server.model.info
    size = f"{info.n_params / 1e9:.1f}B" if info.n_params >= 1e9 else f"{info.n_params / 1e6:.0f}M"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": size,
        "quantization_level": info.quantization,
    }


def card(server: Server) -> dict:
    stat = server.model.path.stat()
    digest = hashlib.sha256(f"{server.model.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    modified = dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    name = served_name(server)
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": stat.st_size,
        "digest": digest,
        "details": details(server),
    }


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    return {"models": [card(server_of(request))]}


@router.get("/api/version")
async def version() -> dict:
    return {"version": COMPATIBLE_VERSION, "selfextend_local": __version__}


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool | None = None


@router.post("/api/show")
async def show(request: Request) -> dict:
    body = await parse(request, ShowBody)
    server = server_of(request)
    check_model(OllamaRequest(model=body.model or body.name), server)
    info = server.model.info
    model_info = {
        "general.architecture": info.architecture,
        "general.name": info.name,
        "general.parameter_count": info.n_params,
        f"{info.architecture}.context_length": info.n_ctx_train,
        f"{info.architecture}.block_count": info.n_layers,
        "selfextend.reach": server.serving.cells,
    }
    defaults = default_parameters(server)
    return {
        "modelfile": f"FROM {server.model.path}\n" + "".join(f"PARAMETER {k} {v}\n" for k, v in defaults.items()),
        "parameters": "".join(f"{name:<30} {value}\n" for name, value in defaults.items()),  # Ollama's layout
        "template": TEMPLATE_NOTE + info.chat_template if info.chat_template else "",
        "details": details(server),
        "model_info": model_info,
        "capabilities": ["completion", "tools"],
        "modified_at": card(server)["modified_at"],
    }


TEMPLATE_NOTE = (  # a Jinja comment: the text stays the template it is
    "{# The GGUF's own chat template (Jinja, not Ollama's Go template), applied by this server; a request's "
    "template field is not taken. #}\n"
)


def default_parameters(server: Server) -> dict:
    """The options a request gets when it gives none, by Ollama's names."""
    defaults = SamplingSettings()
    return {
        "num_ctx": server.serving.cells,
        "num_predict": defaults.max_tokens,
        "temperature": defaults.temperature,
        "top_k": defaults.top_k,
        "top_p": defaults.top_p,
        "min_p": defaults.min_p,
        "repeat_penalty": defaults.repeat_penalty,
        "repeat_last_n": defaults.repeat_last_n,
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    server = server_of(request)
    loaded = {
        **card(server),
        "expires_at": "2099-01-01T00:00:00Z",
        "size_vram": 0,
        "context_length": server.serving.cells,
    }
    return {"models": [loaded]}


@router.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
async def not_served(request: Request, rest: str):
    """Ollama's answer, in its shape, to an endpoint or a method this server does not serve."""
    endpoint = f"/api/{cut(rest)}"
    first = rest.split("/")[0]
    if first in SERVED:
        raise APIError(405, f"{request.method} {endpoint} is not served: use {SERVED[first]}")
    if first in NOT_SERVED:
        raise APIError(501, f"{endpoint} is not supported: {NOT_SERVED[first]}", code="not_supported")
    raise APIError(404, f"{endpoint} is not an endpoint of Ollama's API served here", code="not_found")
