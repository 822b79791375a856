"""Route llama.cpp's own log: silent by default, to stderr with ``--llama-log``, recent errors kept for
messages (a model that fails to load says why, in llama.cpp's words, without any flag)."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import sys
import tempfile
import threading

import llama_cpp

# ggml.h: enum ggml_log_level
GGML_LOG_WARN = 3
GGML_LOG_ERROR = 4
GGML_LOG_CONT = 5

_state = {"echo": False, "last_level": 0}
_recent_errors: collections.deque[str] = collections.deque(maxlen=20)


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    if level == GGML_LOG_CONT:
        level = _state["last_level"]
        if level == GGML_LOG_ERROR and _recent_errors:  # the rest of the previous error line
            _recent_errors[-1] = (_recent_errors[-1] + message).strip()
    elif level == GGML_LOG_ERROR and message.strip():
        _recent_errors.append(message.strip())
    _state["last_level"] = level
    if _state["echo"]:
        sys.stderr.write(message)


def set_echo(echo: bool) -> None:
    """Show llama.cpp's log on stderr (True) or keep it quiet (False)."""
    _state["echo"] = echo


def last_error() -> str:
    """The first error llama.cpp logged since :func:`clear_errors` (the cause; later lines are its
    consequences), without the function names it starts with, or an empty string."""
    if not _recent_errors:
        return ""
    return re.sub(r"^(?:[A-Za-z_][\w:]*: )+(?:error loading model: )?", "", _recent_errors[0])


def clear_errors() -> None:
    """Forget earlier errors, so that a message quotes only what the next call logs."""
    _recent_errors.clear()


def install() -> None:
    """Take over llama.cpp's log (llama-cpp-python installs its own printing callback on import)."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


class _Said:
    text = ""


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def captured_stderr():
    """What native code writes to file descriptor 2 meanwhile, in ``.text`` afterwards (not shown).

    llama.cpp's grammar parser prints a failed grammar whole with ``fprintf(stderr)``, past the log
    callback: one bad request must not put megabytes of a client's text into the server's log."""
    said = _Said()
    with _stderr_lock, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.text = sink.read(1 << 16).decode("utf-8", errors="replace")
