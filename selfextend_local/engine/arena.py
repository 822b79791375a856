"""The engine's thread allocates from glibc's main heap, as a single-threaded program's does.

glibc gives each new thread that allocates its own malloc arena (heaps it maps apart from the main one),
so an engine made and stepped on a thread of its own (the server's) puts llama.cpp's per-decode buffers
somewhere else than ``qa`` does on the main thread. Measured on the bundled model reading a 10,130-token
document on two cores: the server's llama_decode calls ran at 110-121 tok/s from a thread arena and at
131-142 with ``MALLOC_ARENA_MAX=1`` in its environment, ``qa`` at 129-135 the same hour; one-token
decodes were the same either way. Why the placement matters so much is not settled (this machine has no
hardware counters); with the cap, ``scripts/bench_page.py`` gives the page 0.85-1.10 of qa a round
(docs/page.json). Capping the arenas at one before the engine's thread starts gives that thread the main
heap. Other C libraries are left as they are.
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
