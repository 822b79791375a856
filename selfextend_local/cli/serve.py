"""``serve``: the OpenAI-compatible server."""

from __future__ import annotations

import ipaddress
import os

import click

from .display import log
from .options import extend_options, log_options, model_option, runtime_options
from .run import load_for_cli

API_KEY_ENV = "SELFEXTEND_LOCAL_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, help=f"Require 'Authorization: Bearer KEY' (or set {API_KEY_ENV}).")
@click.option(
    "--queue-size",
    default=8,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Requests that may wait behind the running one; more get 429.",
)
@click.option(
    "--max-body",
    default=8.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest request body in MiB.",
)
@click.option(
    "--max-tokens-limit",
    default=4096,
    show_default=True,
    type=click.IntRange(1),
    help="Largest max_tokens a request may ask for.",
)
@model_option
@runtime_options
@extend_options
@log_options
def serve(host, port, api_key, queue_size, max_body, max_tokens_limit, model, runtime, extend, verbose) -> None:
    """Serve the model over an OpenAI-compatible API with SelfExtend.

    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Settings are
    planned per request unless -g/-w are given; a request may pass its own in the extra body field
    "selfextend": {"group": G, "window": W, "schedule": "neighbor"}.
    """
    import uvicorn

    from ..server import ServerLimits, create_app

    api_key = api_key or os.environ.get(API_KEY_ENV)
    if not _is_loopback(host) and not api_key:
        log(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    llm = load_for_cli(model, runtime, verbose)
    limits = ServerLimits(queue_size, int(max_body * (1 << 20)), max_tokens_limit)
    app = create_app(llm, runtime, extend, api_key, limits)
    log(f"serving {llm.path.name} on http://{host}:{port}/v1 (queue {queue_size}, auth {'on' if api_key else 'off'})")
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
