"""What a context costs in memory, and whether this machine has it: checked before llama.cpp allocates.

llama.cpp allocates the whole KV cache when a context is made. A context too large for the machine
would otherwise run it out of memory (or, offloaded, fail deep inside a GPU allocation), so every
context is sized against the memory that is available now, with the estimate in the message.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EngineError, Name
from .kvtypes import KV_TYPES


class ContextTooLargeError(EngineError):
    """A context would need more memory than this machine has available."""


HEADROOM = 0.8  # of the available memory a context may take; the rest is the model, buffers, the OS


def kv_bytes_per_cell(info, kv_type: str = "f16") -> int:
    """Bytes one cached token takes in the KV cache: K and V for every layer, in the type's real size."""
    kind = KV_TYPES[kv_type]
    return info.n_layers * (kind.bytes_for(info.n_embd_k) + kind.bytes_for(info.n_embd_v))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None if unknown."""
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def max_cells(info, kv_type: str = "f16", on_gpu: bool = False) -> int | None:
    """The most KV cells a context may have on this machine now, or None when unknown (or on a GPU)."""
    have = None if on_gpu else available_memory()
    return None if have is None else int(HEADROOM * have) // max(kv_bytes_per_cell(info, kv_type), 1)


def check_context_fits(info, n_cells: int, kv_type: str, on_gpu: bool = False) -> int:
    """The KV cache's size in bytes for ``n_cells``; raises EngineError when this machine cannot hold it.

    Offloaded caches live in GPU memory, which llama.cpp checks itself (and fails cleanly), so only
    host caches are checked here.
    """
    need = kv_bytes_per_cell(info, kv_type) * n_cells
    fits = max_cells(info, kv_type, on_gpu)
    if fits is not None and n_cells > fits:
        have = available_memory() or 0
        raise ContextTooLargeError(
            "a context of {cells:,} tokens needs a {need} KV cache but {have} of memory is available; "
            "at most about {fits:,} tokens fit here: use a shorter input, a smaller {ctx} or {max_tokens}",
            param="ctx",
            suggested={"ctx": fits},
            cells=n_cells,
            need=gib(need),
            have=gib(have),
            fits=fits,
            ctx=Name("ctx"),
            max_tokens=Name("max_tokens"),
        )
    return need
