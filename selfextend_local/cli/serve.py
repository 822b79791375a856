"""``serve``: the OpenAI-compatible server."""

from __future__ import annotations

import ipaddress
import os
import socket

import click

from ..serving.limits import ServerLimits
from .display import log, note
from .options import (
    cache_dir_option,
    cache_size_option,
    checkpoint_option,
    draft_option,
    extend_options,
    log_options,
    model_option,
    open_cache,
    runtime_options,
)
from .run import load_for_cli

API_KEY_ENV = "SELFEXTEND_LOCAL_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line error (port in use, unknown address)."""
    from ..engine.errors import SelfExtendError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise SelfExtendError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int) -> str:
    """``http://HOST:PORT`` with an IPv6 address in brackets."""
    bare = host.strip("[]")
    shown = f"[{bare}]" if ":" in bare else bare
    return f"http://{shown}:{port}"


_LIMITS = ServerLimits()  # the defaults, written once there


@click.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, help=f"Require 'Authorization: Bearer KEY' (or set {API_KEY_ENV}).")
@click.option(
    "--queue-size",
    default=_LIMITS.queue_size,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Requests that may wait for a slot; more get 429.",
)
@click.option(
    "--max-body",
    default=_LIMITS.max_body_bytes / (1 << 20),
    show_default=True,
    type=click.FloatRange(min=0, max=1024, min_open=True),
    help="Largest request body in MiB.",
)
@click.option(
    "--max-tokens-limit",
    default=_LIMITS.max_tokens,
    show_default=True,
    type=click.IntRange(1, 1 << 20),
    help="Largest max_tokens a request may ask for.",
)
@click.option(
    "--prompt-cache",
    default=_LIMITS.prompt_cache_bytes / (1 << 20),
    show_default=True,
    type=click.FloatRange(min=0, max=1 << 20),
    help="MiB of memory for prompts kept when their slot moves on (0: none).",
)
@click.option(
    "--parallel",
    "-p",
    type=click.IntRange(1, 64),
    default=None,
    help="Requests decoded together (slots). Default: 4, or fewer if half the available memory cannot hold them.",
)
@click.option("--no-cache", is_flag=True, help="Do not keep read documents in the disk cache.")
@cache_dir_option
@cache_size_option
@checkpoint_option
@draft_option
@model_option
@runtime_options
@extend_options
@log_options
def serve(
    host,
    port,
    api_key,
    queue_size,
    max_body,
    max_tokens_limit,
    prompt_cache,
    parallel,
    no_cache,
    cache_dir,
    cache_size,
    checkpoint_every,
    draft,
    model,
    runtime,
    extend,
    verbose,
) -> None:
    """Serve the model: a page at / to chat and to read long documents, and OpenAI's API with SelfExtend.

    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, the documents under
    /v1/documents, GET /health. Settings are planned per request unless -g/-w are given; a request may pass
    its own in the extra body field "selfextend": {"group": G, "window": W, "schedule": "neighbor",
    "draft": N} (--draft is the default for requests that give none). Up to
    --parallel requests are decoded together, each in a slot of --ctx cells (default: what the model
    family's setting reaches). Documents given to the server, and the state of those read, are kept in
    --cache-dir (shared with qa).
    """
    import uvicorn

    from ..engine import scheduler
    from ..engine.budget import StepBudget
    from ..engine.settings import SamplingSettings
    from ..serving.app import UvicornServer, create_app, loopback_hosts

    api_key = api_key or os.environ.get(API_KEY_ENV)
    SamplingSettings(draft=draft)  # refused before the model loads
    llm = load_for_cli(model, runtime, verbose)
    chosen = scheduler.size(llm, runtime, extend, parallel)
    limits = ServerLimits(queue_size, int(max_body * (1 << 20)), max_tokens_limit, int(prompt_cache * (1 << 20)))
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    if not _is_loopback(host) and not api_key:
        log(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    hosts = loopback_hosts(host, port) if _is_loopback(host) else None
    kv_cache = open_cache(cache_dir, cache_size)
    documents = kv_cache.root / "documents"
    kv = None if no_cache else kv_cache
    app = create_app(llm, runtime, extend, api_key, limits, hosts, chosen, kv, documents, checkpoint_every, draft)
    log(f"allocated {chosen.describe()}")
    note(StepBudget().describe())
    log(f"serving {llm.path.name} on {url_for(host, port)}/v1 (queue {queue_size}, auth {'on' if api_key else 'off'})")
    log(f"the page: {url_for(host, port)}/")
    # A stop (Ctrl-C, SIGTERM) cancels every request, then waits this long for open streams to end.
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", timeout_graceful_shutdown=3)
    UvicornServer(config).run(sockets=[sock])
