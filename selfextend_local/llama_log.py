"""Route llama.cpp's own log: silent by default, to stderr with verbose, recent errors kept for messages."""

from __future__ import annotations

import collections
import ctypes
import sys

import llama_cpp

_GGML_LOG_ERROR = 3
_GGML_LOG_CONT = 5

_state = {"verbose": False, "last_level": 0}
_recent_errors: collections.deque[str] = collections.deque(maxlen=20)


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_CONT:
        level = _state["last_level"]
    _state["last_level"] = level
    message = text.decode("utf-8", errors="replace")
    if level == _GGML_LOG_ERROR and message.strip():
        _recent_errors.append(message.strip())
    if _state["verbose"]:
        sys.stderr.write(message)


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's log on stderr (True) or keep it quiet (False)."""
    _state["verbose"] = verbose


def last_error() -> str:
    """The most recent error line llama.cpp logged, or an empty string."""
    return _recent_errors[-1] if _recent_errors else ""


def install() -> None:
    """Take over llama.cpp's log (llama-cpp-python installs its own printing callback on import)."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
