"""Each setting's default and bound is written once, in the settings dataclasses: the command line's
options, the server's request fields and `Llama`'s arguments take theirs from there (these fail on drift)."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest

from selfextend_local import Llama
from selfextend_local.cli import COMMANDS, main
from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from selfextend_local.serving import openai_api
from selfextend_local.serving.limits import ServerLimits

SETTINGS = (RuntimeSettings, ExtendSettings, SamplingSettings)
# a dataclass field whose default is made per call (threads: the cores) shows as no default on the command line
DEFAULTS = {
    f.name: (None if f.default is dataclasses.MISSING else f.default)
    for cls in SETTINGS
    for f in dataclasses.fields(cls)
}


def options_of_every_command():
    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        commands = command.commands.values() if isinstance(command, click.Group) else [command]
        for cmd in commands:
            for param in cmd.params:
                yield f"{name} {param.opts[0]}", param


NOT_THE_SETTING = {"convert --threads"}  # the quantizer's threads (0: llama.cpp's choice), not RuntimeSettings'


def test_command_line_defaults_are_the_settings_defaults():
    checked = 0
    for where, param in options_of_every_command():
        if param.name in DEFAULTS and param.name not in ("stop", "grammar", "schema") and where not in NOT_THE_SETTING:
            assert param.default == DEFAULTS[param.name], where
            checked += 1
    assert checked > 30  # every command with model options has a dozen of them


def test_serve_limits_are_the_servers_own():
    serve = main.get_command(click.Context(main), "serve")
    given = {p.name: p.default for p in serve.params}
    limits = ServerLimits()
    assert given["queue_size"] == limits.queue_size and given["max_tokens_limit"] == limits.max_tokens
    assert given["max_body"] * (1 << 20) == limits.max_body_bytes


@pytest.mark.parametrize("model", [openai_api.CommonRequest, openai_api.ChatRequest, openai_api.SelfExtendOptions])
def test_request_fields_have_no_defaults_of_their_own(model):
    """None means "the server's setting"; only the switches of the response's form default to off."""
    switches = {"stream": False, "return_progress": False}
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        assert field.default == switches.get(name), name
        assert not field.metadata, f"{name} has a bound of its own: {field.metadata}"


def test_llama_defaults_are_the_settings_defaults():
    """Except where llama-cpp-python's own differ (its n_ctx, sampling and seed), which Llama keeps."""
    params = inspect.signature(Llama.__init__).parameters
    ours = {"n_gpu_layers": "gpu_layers", "n_batch": "batch", "kv_type": "kv_type"}
    ours.update({k: k for k in ("group", "window", "schedule", "division")})
    for arg, key in ours.items():
        assert params[arg].default == DEFAULTS[key], arg
