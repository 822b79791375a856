"""``info``, ``generate`` and ``chat``: parse, call the engine, render."""

from __future__ import annotations

import sys

import click

from ..errors import BadInputError
from .display import log, note, render_stream, stats_line
from .options import extend_options, log_options, model_option, runtime_options, sampling_options


def load_for_cli(model_spec, runtime, verbose_flag: bool):
    from .. import llama_log
    from ..engine import load_model

    llama_log.set_verbose(verbose_flag)
    model = load_model(model_spec, runtime)
    note(f"model: {model.path} ({model.info.architecture}, trained on {model.info.n_ctx_train} tokens)")
    return model


def describe_session(session) -> None:
    note(f"plan: {session.plan.describe()}")
    if session.divider:
        note(f"division: {session.divider.name} ({session.divider.reason})")


@click.command()
@click.argument("model_arg", metavar="[MODEL]", required=False)
@runtime_options
@log_options
def info(model_arg: str | None, runtime, verbose: bool) -> None:
    """Show a model's architecture, training context, quantization, size, and what SelfExtend reaches."""
    from ..info import describe

    model = load_for_cli(model_arg, runtime, verbose)
    click.echo(describe(model))


def _read_prompt(prompt: str | None, file) -> str:
    if prompt is not None and file is not None:
        raise BadInputError("give the prompt as an argument or with --file, not both")
    if file is not None:
        text = file.read()
    elif prompt is not None and prompt != "-":
        text = prompt
    elif prompt == "-" or not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise BadInputError("no prompt: pass it as an argument, with --file FILE, or on stdin")
    if not text.strip():
        raise BadInputError("the prompt is empty; give some text")
    return text


@click.command()
@click.argument("prompt", required=False)
@click.option("--file", "-f", type=click.File("r", encoding="utf-8"), help="Read the prompt from a file.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--system", default=None, help="A system message (with the chat template).")
@model_option
@runtime_options
@extend_options
@sampling_options
@log_options
def generate(prompt, file, raw, system, model, runtime, extend, sampling, verbose) -> None:
    """Answer PROMPT (an argument, --file, or stdin), streamed to stdout."""
    from ..engine import open_session
    from ..generate import stream_generate

    text = _read_prompt(prompt, file)
    llm = load_for_cli(model, runtime, verbose)
    if raw:
        tokens = llm.tokenize(text)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        tokens = llm.chat_tokens(messages) if llm.info.chat_template else llm.tokenize(text)
    with open_session(llm, len(tokens) + sampling.max_tokens, extend, runtime) as session:
        describe_session(session)
        last = render_stream(lambda progress, stop: stream_generate(session, tokens, sampling, progress, stop))
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
    from ..chat import Conversation

    llm = load_for_cli(model, runtime, verbose)
    conversation = Conversation(llm, extend, runtime, sampling, system)
    log(f"Chatting with {llm.info.name}. /reset starts over, /exit leaves, Ctrl-C stops a reply.")
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                click.echo()
                continue
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                conversation.reset()
                log("(conversation reset)")
                continue
            _chat_turn(conversation, command)
    finally:
        conversation.close()


def _chat_turn(conversation, text: str) -> None:
    from ..errors import Interrupted, SelfExtendError

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
