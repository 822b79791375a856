"""The engine's thread allocates from glibc's main heap, as a single-threaded program's does.

glibc gives each new thread that allocates its own malloc arena (heaps it maps apart from the main one),
so an engine made and stepped on a thread of its own (the server's) puts llama.cpp's per-decode buffers
somewhere else than ``qa`` does on the main thread. Measured on the bundled model reading a 10,130-token
document on two cores (docs/RESULTS.md, scripts/bench_page.py): the same llama_decode calls ran at
110-121 tok/s from a thread arena and at 131-142 with ``MALLOC_ARENA_MAX=1``, while ``qa`` read at 129-135;
generating one token at a time was the same either way. Capping the arenas at one before the engine's
thread starts gives that thread the main heap. Other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_ARENA_MAX = -8  # glibc's malloc.h


def share_main_arena() -> bool:
    """Let threads started from now on allocate from the main arena (glibc only); True when it was set.

    A user's own ``MALLOC_ARENA_MAX`` (or a glibc tunable naming arenas) is left to rule."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_ARENA_MAX, 1) == 1
