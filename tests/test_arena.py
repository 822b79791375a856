"""The server's engine thread allocates from glibc's main heap (engine/arena.py), in a fresh process each."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's arenas only"
)

# Prints 1 when a 1 MiB block malloc'd on a new thread lies in the main heap (below the program break),
# 0 when it comes from an arena of the thread's own or a mapping of its own (above it).
CHILD = """
import ctypes, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
placed = []

def allocate():
    placed.append(libc.malloc(1 << 20) < libc.sbrk(0))

if sys.argv[1] == "serving":
    from selfextend_local.engine.scheduler import ServingThread

    def make():
        allocate()
        raise RuntimeError("no engine needed")

    try:
        ServingThread(make, queue_size=1)
    except RuntimeError:
        pass
else:
    if sys.argv[1] == "shared":
        from selfextend_local.engine.arena import share_main_arena
        assert share_main_arena()
    thread = threading.Thread(target=allocate)
    thread.start()
    thread.join()
print(int(placed[0]))
"""


def main_heap(how: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", CHILD, how], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip() == "1"


def test_a_new_thread_has_an_arena_of_its_own_by_default():
    assert not main_heap("default")


def test_sharing_the_main_arena_puts_a_new_threads_blocks_in_the_main_heap():
    assert main_heap("shared")


def test_the_serving_threads_engine_is_made_on_the_main_heap():
    assert main_heap("serving")


def test_a_users_own_arena_setting_rules():
    env = {**os.environ, "MALLOC_ARENA_MAX": "4"}
    code = "from selfextend_local.engine.arena import share_main_arena; print(share_main_arena())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
