"""Reading an upload's text in a child process, bounded in time and memory.

A PDF or HTML parser is pure Python: on one of the server's threads it holds the interpreter's lock for as
long as it runs, and every other request (the event loop, the engine's thread between decodes) waits for
it. A 20k-page PDF, 100k nested ``div`` s or a cyclic page tree keep it for tens of seconds, and a
parser's memory grows with what it is given. So the parse runs in a Python process of its own (a fresh
interpreter, not a fork of this one and its threads), at a lower priority than the engine, with its
address space limited (``RLIMIT_AS``), and killed when it takes longer than the limit. Text and Markdown
need no parser (a UTF-8 decode) and are read in place.

The child reads a JSON line (suffix, name, memory) and the document's bytes on its standard input, and
writes a pickle of ``("text", text)`` or ``("error", error)`` on its standard output.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys

from ..engine.errors import BadInputError, SelfExtendError
from ..tasks.documents import HTML, PDF, document_text

NICE = 10  # below the engine's threads: a parse takes the CPU they leave


def read_text(data: bytes, suffix: str, name: str, seconds: float, memory: int) -> str:
    """The text of an upload (see :func:`~..tasks.documents.document_text`): a PDF or HTML parsed in a
    child process of at most ``memory`` bytes of address space, refused after ``seconds``."""
    if suffix not in PDF | HTML:
        return document_text(data, suffix, name)
    header = json.dumps({"suffix": suffix, "name": name, "memory": memory}).encode() + b"\n"
    child = subprocess.Popen(
        [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        said, _ = child.communicate(header + data, timeout=seconds)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise BadInputError(
            "{name} took over {seconds:g} s to read and was given up; send its text instead",
            param="body",
            name=name,
            seconds=seconds,
        ) from None
    try:
        outcome, value = pickle.loads(said)
    except Exception:  # nothing, or half of it: the child died (past its memory, or a crash)
        raise _failed(name, memory) from None
    if outcome == "error":
        raise value
    return value


def _failed(name: str, memory: int) -> BadInputError:
    return BadInputError(
        "{name} could not be read within the reader's {mib} MiB of memory (or the reader failed on it); "
        "send its text instead",
        param="body",
        name=name,
        mib=memory >> 20,
    )


def _outcome(data: bytes, suffix: str, name: str, memory: int) -> tuple[str, object]:
    try:
        return "text", document_text(data, suffix, name)
    except SelfExtendError as exc:
        return "error", exc
    except RecursionError:
        return "error", BadInputError("{name} is nested too deeply to read", param="body", name=name)
    except Exception:  # MemoryError, or a parser's own failure on a strange file
        return "error", _failed(name, memory)


def main() -> None:
    """The child: bound itself, read, and answer (see the module's text)."""
    stdin = sys.stdin.buffer
    asked = json.loads(stdin.readline())
    os.nice(NICE)
    resource.setrlimit(resource.RLIMIT_AS, (asked["memory"], asked["memory"]))
    outcome = _outcome(stdin.read(), asked["suffix"], asked["name"], asked["memory"])
    sys.stdout.buffer.write(pickle.dumps(outcome))


if __name__ == "__main__":
    main()
