"""Prompts kept in memory when their slot moves on, as llama.cpp's server keeps them (``--cache-ram``).

A slot that takes a request whose prompt its own cells do not begin keeps their state here first (one copy
of the cells, in host memory); a later request that begins like a kept prompt, in whichever slot it lands,
starts from that state instead of reading the shared part again. Four clients asking at once after one
client's run found one slot with the shared start and three without; with the kept state their first
tokens came as soon as one client's alone. Entries are kept least recently used first out, within a byte
limit; a sequence too large for a quarter of it is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import state
from .sequence import Sequence


@dataclass(frozen=True)
class Kept:
    key: tuple  # the plan the cells were made under: only a sequence of the same plan can take them
    tokens: np.ndarray
    data: bytearray
    schedule: dict[str, int]


def shared(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PromptCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.kept: OrderedDict[tuple, Kept] = OrderedDict()
        self.size = 0

    def keep(self, sequence: Sequence, key: tuple) -> None:
        """Keep the state of ``sequence`` (about to be overwritten), if it fits."""
        if not sequence.tokens or self.limit <= 0:
            return
        if state.state_size(sequence) > self.limit // 4:
            return
        ident = (key, tuple(sequence.tokens))
        if ident in self.kept:
            self.kept.move_to_end(ident)
            return
        data = state.state_bytes(sequence)
        self.kept[ident] = Kept(key, np.asarray(sequence.tokens, dtype=np.int32), data, sequence.schedule.state())
        self.size += len(data)
        while self.size > self.limit:
            _, dropped = self.kept.popitem(last=False)
            self.size -= len(dropped.data)

    def best(self, key: tuple, prompt: list[int], beyond: int) -> Kept | None:
        """The kept prompt of the same plan sharing the longest start with ``prompt``, if longer than
        ``beyond`` tokens (all but the last token of ``prompt`` at most: its logits must be computed)."""
        wanted = np.asarray(prompt[:-1], dtype=np.int32)
        found, length = None, beyond
        for kept in self.kept.values():
            if kept.key == key and (n := shared(kept.tokens, wanted)) > length:
                found, length = kept, n
        return found

    def restore(self, sequence: Sequence, kept: Kept) -> None:
        """Put a kept state into ``sequence`` (raises EngineError if llama.cpp will not take it)."""
        state.load_bytes(sequence, kept.data, kept.tokens.tolist(), kept.schedule)
        for ident, entry in self.kept.items():
            if entry is kept:
                self.kept.move_to_end(ident)
                break
