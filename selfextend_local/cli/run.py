"""``info``, ``generate`` and ``chat``: parse, call the engine, render."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..engine.errors import BadInputError
from .display import (
    is_verbose,
    line_editing,
    log,
    note,
    read_line,
    render_stream,
    say_resuming,
    stats_line,
    stopped_reading,
)
from .options import (
    checkpointing_options,
    extend_options,
    log_options,
    model_option,
    runtime_options,
    sampling_options,
)


def load_for_cli(model_spec, runtime, verbose_flag: bool):
    from ..engine import llama_log
    from ..locate import load_model

    ctx = click.get_current_context(silent=True)
    llama_log.set_echo(bool(ctx and ctx.meta.get("selfextend.llama_log")))
    model = load_model(model_spec, runtime)
    note(f"model: {model.path} ({model.info.architecture}, trained on {model.info.n_ctx_train} tokens)")
    if is_verbose():
        from ..engine.division import build_description

        note(f"llama.cpp: {build_description()}")
    return model


def describe_session(session) -> None:
    import llama_cpp

    from ..engine.build import fa_kernel, kshift_kind
    from ..engine.kvtypes import KV_TYPES

    note(f"plan: {session.plan.describe()}")
    if session.divider:
        note(f"division: {session.divider.name} ({session.divider.reason})")
        note(f"K-shift: rotates {kshift_kind(llama_cpp.__version__)}")
    kind = session.runtime.kv_type
    if KV_TYPES[kind].quantized or kind == "bf16":
        note(f"{kind} KV cache: flash attention {fa_kernel(llama_cpp.__version__)}")


@click.command()
@click.argument("model_arg", metavar="[MODEL]", required=False)
@runtime_options
@log_options
def info(model_arg: str | None, runtime, verbose: bool) -> None:
    """Show a model's architecture, training context, quantization, size, and what SelfExtend reaches,
    and which llama.cpp build is loaded with the division it gives."""
    from ..tasks.info import describe

    model = load_for_cli(model_arg, runtime, verbose)
    click.echo(describe(model, runtime))


@click.command("build-llama")
@click.option("--version", "llama_version", default=None, help="llama-cpp-python release. Default: the newest.")
@click.option("--no-cache", is_flag=True, help="Build again even if a wheel is cached.")
def build_llama(llama_version: str | None, no_cache: bool) -> None:
    """Rebuild llama-cpp-python from its sdist with our llama.cpp fix, in this environment.

    Native division then replaces the emulation. CMAKE_ARGS is honoured (e.g. -DGGML_CUDA=on); the wheel
    is cached, so doing it again costs seconds. Restart running servers afterwards.
    """
    from .. import llama_build

    args = (["--version", llama_version] if llama_version else []) + (["--no-cache"] if no_cache else [])
    sys.exit(llama_build.main(args))


def _read_prompt(prompt: str | None, file) -> str:
    from ..tasks.documents import MAX_TEXT_BYTES, decode_text, read_bounded, read_text_file

    if prompt is not None and file is not None:
        raise BadInputError("give the prompt as an argument or with --file, not both")
    if file is not None:
        text = read_text_file(file)
    elif prompt is not None and prompt != "-":
        text = prompt
    elif prompt == "-" or not sys.stdin.isatty():
        stream = getattr(sys.stdin, "buffer", None)
        data = read_bounded(stream, MAX_TEXT_BYTES, "stdin") if stream else sys.stdin.read().encode()
        text = decode_text(data, "stdin")
    else:
        raise BadInputError("no prompt: pass it as an argument, with --file FILE, or on stdin")
    if not text.strip():
        raise BadInputError("the prompt is empty; give some text")
    return text


@click.command()
@click.argument("prompt", required=False)
@click.option("--file", "-f", type=click.Path(path_type=Path), help="Read the prompt from a file.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--system", default=None, help="A system message (with the chat template).")
@checkpointing_options
@model_option
@runtime_options
@extend_options
@sampling_options
@log_options
def generate(prompt, file, raw, system, checkpointing, model, runtime, extend, sampling, verbose) -> None:
    """Answer PROMPT (an argument, --file, or stdin), streamed to stdout. A long prompt's reading is
    checkpointed as it goes: interrupted (Ctrl-C, a crash), the same command resumes it."""
    from ..engine.errors import Interrupted
    from ..engine.generate import stream_generate
    from ..engine.paces import pace_of
    from ..engine.session import open_session

    text = _read_prompt(prompt, file)
    llm = load_for_cli(model, runtime, verbose)
    if raw:
        tokens = llm.tokenize(text)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        tokens = llm.chat_tokens(messages) if llm.info.chat_template else llm.tokenize(text)
    checkpoints = checkpointing(tokens, on_restore=say_resuming)
    with open_session(llm, len(tokens) + sampling.max_tokens, extend, runtime, generate=sampling.max_tokens) as session:
        describe_session(session)
        try:
            last = render_stream(
                lambda progress, stop: stream_generate(
                    session, tokens, sampling, progress, stop, checkpoints=checkpoints
                ),
                pace=pace_of(session),
            )
        except Interrupted as exc:
            if checkpoints is None:
                raise
            raise Interrupted(stopped_reading(exc.fields.get("done", 0), len(tokens), checkpoints.written)) from None
        finally:
            for warning in checkpoints.warnings if checkpoints else ():
                log(f"warning: {warning}")
        if last is not None:
            note(stats_line(last, session.plan.describe()))


@click.command()
@click.option("--system", default=None, help="A system message for the conversation.")
@model_option
@runtime_options
@extend_options
@sampling_options
@log_options
def chat(system, model, runtime, extend, sampling, verbose) -> None:
    """Talk with the model. /reset starts over, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply."""
    from ..tasks.chat import Conversation

    llm = load_for_cli(model, runtime, verbose)
    conversation = Conversation(llm, extend, runtime, sampling, system)
    log(f"Chatting with {llm.info.name}. /help lists the commands, /exit leaves, Ctrl-C stops a reply.")
    try:
        with line_editing("chat"):
            _chat_loop(conversation)
    finally:
        conversation.close()


CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "start the conversation over",
    "/exit": "leave (also /quit, or Ctrl-D)",
}


def _chat_loop(conversation) -> None:
    while True:
        try:
            line = read_line(">>> ")
        except EOFError:
            break
        except KeyboardInterrupt:
            log("")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            conversation.reset()
            log("(conversation reset)")
        elif command == "/help" or (command.startswith("/") and " " not in command):
            if command != "/help":
                log(f"unknown command {command}")
            log("\n".join(f"  {name:8s} {what}" for name, what in CHAT_COMMANDS.items()))
        else:
            _chat_turn(conversation, command)


def _chat_turn(conversation, text: str) -> None:
    from ..engine.errors import Interrupted, SelfExtendError

    try:
        last = render_stream(lambda progress, stop: conversation.reply(text, progress, stop))
    except Interrupted:
        log("\n(interrupted while reading the prompt)")
        return
    except SelfExtendError as exc:  # e.g. a message beyond the extended limit: say so, keep chatting
        log(f"Error: {exc}")
        return
    if last is not None and last.finish_reason == "interrupted":
        log("(reply stopped)")
    if last is not None and conversation.session:
        note(stats_line(last, conversation.session.plan.describe()))
