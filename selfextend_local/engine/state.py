"""Saving and restoring a sequence's cells: to a file (llama.cpp's own format, a layer at a time) or to
bytes in memory; each restore comes with the schedule state that goes with the cells."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence as Seq

import llama_cpp

from . import llama_log
from .errors import EngineError
from .sequence import Sequence


def save_file(sequence: Sequence, path) -> None:
    """Write the sequence's tokens and KV cells to ``path`` (no copy of the state in memory). Raises OSError."""
    tokens = (llama_cpp.llama_token * max(len(sequence.tokens), 1))(*sequence.tokens)
    llama_log.clear_errors()
    written = llama_cpp.llama_state_seq_save_file(
        sequence.ctx, str(path).encode(), sequence.seq_id, tokens, len(sequence.tokens)
    )
    if not written:
        raise OSError(f"llama.cpp could not write {path}: {llama_log.last_error() or 'unknown error'}")


def load_file(sequence: Sequence, path: str, schedule_state: dict[str, int]) -> None:
    """Restore what :func:`save_file` wrote, with its schedule state (read a layer at a time). Raises
    EngineError when llama.cpp or the schedule will not take it."""
    sequence.reset()
    capacity = sequence.n_ctx
    tokens = (llama_cpp.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    llama_log.clear_errors()
    read = llama_cpp.llama_state_seq_load_file(
        sequence.ctx, str(path).encode(), sequence.seq_id, tokens, capacity, ctypes.byref(count)
    )
    if not read:
        sequence.reset()
        raise EngineError(
            "llama.cpp rejected the saved state: {detail}", detail=llama_log.last_error() or "unknown error"
        )
    sequence.adopt(list(tokens[: count.value]), schedule_state)


def state_size(sequence: Sequence) -> int:
    """Bytes :func:`state_bytes` would take (no copy made)."""
    return llama_cpp.llama_state_seq_get_size(sequence.ctx, sequence.seq_id)


def state_bytes(sequence: Sequence) -> bytearray:
    """The sequence's KV cells (positions included) as llama.cpp serialises them (one copy, no more)."""
    size = llama_cpp.llama_state_seq_get_size(sequence.ctx, sequence.seq_id)
    data = bytearray(size)
    view = (ctypes.c_uint8 * size).from_buffer(data)
    written = llama_cpp.llama_state_seq_get_data(sequence.ctx, view, size, sequence.seq_id)
    del view  # release the export, so the bytearray may be resized
    del data[written:]
    return data


def load_bytes(sequence: Sequence, data, tokens: Seq[int], schedule_state: dict[str, int]) -> None:
    """Restore what :func:`state_bytes` saved, with the tokens and schedule state that go with it."""
    sequence.reset()
    if isinstance(data, bytearray):
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
    else:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if llama_cpp.llama_state_seq_set_data(sequence.ctx, buf, len(data), sequence.seq_id) != len(data):
        sequence.reset()
        raise EngineError("llama.cpp rejected the saved state")
    sequence.adopt(list(tokens), schedule_state)
