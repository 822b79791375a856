"""The ``selfextend-local`` command: one Click group whose commands load their modules on demand."""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from ..engine.errors import BadInputError, Interrupted, SelfExtendError

DEBUG_ENV = "SELFEXTEND_LOCAL_DEBUG"

# name -> "module:function"; a command's module is imported only when it runs, so --help is instant.
COMMANDS = {
    "info": "run:info",
    "generate": "run:generate",
    "chat": "run:chat",
    "download": "hub:download",
    "models": "hub:models",
    "qa": "docs:qa",
    "summarize": "docs:summarize",
    "cache": "docs:cache",
    "serve": "serve:serve",
    "passkey": "evals:passkey",
    "ppl": "evals:ppl",
    "validate": "evals:validate",
    "convert": "evals:convert",
    "build-llama": "run:build_llama",
}


class LazyGroup(click.Group):
    """Imports each command's module when the command is looked up, and is the one error boundary."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def invoke(self, ctx: click.Context):
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a full disk or a closed pipe shows here, not at exit as a traceback
            return result
        except OSError as exc:
            if exc.errno not in _OUTPUT_ERRNOS or _debug(ctx):
                raise
            _silence_stdout()
            where = f" {exc.filename}" if exc.filename else " the output"
            click.echo(f"Error: cannot write{where}: {exc.strerror or exc}", err=True)
            ctx.exit(1)
        except SelfExtendError as exc:
            if _debug(ctx):
                raise
            message = str(exc)
            if isinstance(exc, BadInputError):
                raise click.UsageError(message) from None
            if isinstance(exc, Interrupted):  # Ctrl-C between chunks: exit with the shell's code for SIGINT
                click.echo(f"interrupted: {message}", err=True)
                ctx.exit(130)
            raise click.ClickException(message) from None


# Writing the answer failed: the disk is full, the reader of a pipe went away, the device broke.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT, errno.EFBIG}


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.meta.get("selfextend.debug") or os.environ.get(DEBUG_ENV))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered does not fail again (with a traceback) at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


@click.group(cls=LazyGroup)
@click.version_option(package_name="selfextend-local")
def main() -> None:
    """Run GGUF models on inputs longer than their training context, with SelfExtend on llama.cpp."""
