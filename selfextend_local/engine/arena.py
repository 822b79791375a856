"""The engine's thread allocates from glibc's main heap, as a single-threaded program's does.

glibc gives each new thread that allocates its own malloc arena (heaps it maps apart from the main one),
so an engine made and stepped on a thread of its own (the server's) puts llama.cpp's per-decode buffers
somewhere else than ``qa`` does on the main thread. Measured on the bundled model reading a 10,130-token
document on two cores: the server's llama_decode calls ran at 110-121 tok/s from a thread arena and at
131-142 with ``MALLOC_ARENA_MAX=1`` in its environment, ``qa`` at 129-135 the same hour; one-token
decodes were the same either way. With the arenas capped the page still read at 115-140 tok/s, and
glibc maps a block afresh whenever it is above its moving mmap threshold; pinning that threshold at its
largest as well put the page at 0.96, 1.00 and 1.04 of qa (scripts/bench_page.py, docs/page.json). Why the
placement matters so much is not settled (this machine has no hardware counters). Other C libraries are
left as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_ARENA_MAX = -8  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest; blocks below it come from the heap


def share_main_arena() -> bool:
    """Let threads started from now on allocate from the main arena (glibc only), and blocks under 32 MiB
    from its heap rather than fresh mappings; True when it was set.

    A user's own ``MALLOC_ARENA_MAX`` (or a glibc tunable naming arenas) is left to rule."""
    if not _glibc():
        return False
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return mallopt(M_ARENA_MAX, 1) == 1


def give_back() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Blocks under the mmap threshold come from the heap and, freed, stay in the process: the K-shift probe's
    three small contexts and their logits left about 60 MiB resident beside a 32k-cell q8_0 reading's cache."""
    if not _glibc():
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
