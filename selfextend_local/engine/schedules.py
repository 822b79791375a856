"""Position schedules for SelfExtend on llama.cpp's shifting KV cache.

Pure integer logic, no model: a schedule says which position edits to make to the cache before each
decode and at which position the next token goes. The engine carries the edits out with
``llama_memory_seq_add`` / ``llama_memory_seq_div``; the tests replay them on plain lists with
:func:`apply_ops`. See METHOD.md section 3 for the two schedules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from .errors import BadInputError

FOLD_GROUPS = 4  # groups folded in one run: measured best of 1, 4, 16, 64 (see division_as_shifts)


@dataclass(frozen=True)
class Add:
    """Positions in ``[p0, p1)`` move by ``delta`` (``p1 < 0``: no upper bound)."""

    p0: int
    p1: int
    delta: int


@dataclass(frozen=True)
class Div:
    """Positions in ``[p0, p1)`` become ``p // d``."""

    p0: int
    p1: int
    d: int


Op = Add | Div


def _in_range(p: int, p0: int, p1: int) -> bool:
    return p >= max(p0, 0) and (p1 < 0 or p < p1)


def apply_ops(positions: list[int], ops: list[Op]) -> list[int]:
    """Replay cache edits on a list of cell positions, with llama.cpp's semantics."""
    out = list(positions)
    for op in ops:
        for i, p in enumerate(out):
            if not _in_range(p, op.p0, op.p1):
                continue
            out[i] = p + op.delta if isinstance(op, Add) else p // op.d
            if out[i] < 0:
                raise ValueError(f"{op} moved a cell to a negative position (llama.cpp would drop it)")
    return out


def division_as_shifts(p0: int, p1: int, d: int, fold: int = FOLD_GROUPS) -> list[Add]:
    """Shifts that move every position ``p`` of ``[p0, p1)`` to ``p // d`` and leave all others alone.

    llama.cpp's ``seq_add`` scans every cache cell per call and re-indexes every cell it moves, so
    both the calls and the cells they move cost. One shift per position takes ``p1 - p0`` calls.
    Here each group is folded onto itself: shifting its upper half, and the rest of its run of
    ``fold`` groups, down by ``h`` lands ``h`` of its positions on the lower half, where cells simply
    share a position; ``ceil(log2 d)`` shifts a group. Then one shift moves each run, its groups now
    one position apart, to ``p // d``. Runs go lowest first so that no run lands on one not yet
    moved. Every edit is a ``seq_add``, so each cell's K-shift is its net move, exactly as with one
    shift per position.
    """
    p0 = max(p0, 0)
    if d <= 1 or p1 <= p0:
        return []
    ops: list[Add] = []
    first, last = p0 // d, (p1 - 1) // d
    for run in range(first, last + 1, fold):
        groups = range(run, min(run + fold, last + 1))
        start = max(p0, run * d)
        end = min(p1, (groups[-1] + 1) * d)  # this run's cells sit in [start, end), and ranges stop there
        at = start
        for q in groups:
            size = min(p1, q * d + d) - max(p0, q * d)
            while size > 1:
                half = size // 2
                ops.append(Add(at + size - half, end, -half))
                end -= half
                size -= half
            at += 1
        if run != start:
            ops.append(Add(start, end, run - start))
    return ops


def paper_relative_position(i: int, j: int, group: int, window: int) -> int:
    """The relative position the SelfExtend paper gives query ``i`` and key ``j <= i``."""
    if i - j < window:
        return i - j
    return i // group - j // group + window - window // group


class Schedule(ABC):
    """Where tokens sit in the cache, and the edits that keep them there.

    Use: ``ops = s.prepare()`` before each decode, apply ``ops``, decode ``n`` tokens at positions
    ``s.next_pos ..``, then ``s.advance(n)``.
    """

    name: ClassVar[str]

    def __init__(self, group: int, window: int) -> None:
        if group < 1 or window < 1:
            raise BadInputError("group and window must be positive", param="group")
        if window % group:
            raise BadInputError(
                "window {window} is not a multiple of group {group}", param="window", window=window, group=group
            )
        self.group = group
        self.window = window
        self.n_tokens = 0

    @property
    @abstractmethod
    def next_pos(self) -> int:
        """Position of the next token to decode."""

    @property
    def max_chunk(self) -> int | None:
        """Largest number of tokens one decode may hold, or None for no limit."""
        return None

    @abstractmethod
    def prepare(self) -> list[Op]:
        """Cache edits to make before the next decode; updates the schedule's state."""

    def advance(self, n: int) -> None:
        """Record that ``n`` tokens were decoded at ``next_pos, next_pos + 1, ...``."""
        self.n_tokens += n

    @abstractmethod
    def cut_position(self, n: int) -> int | None:
        """Position from which to drop cells to keep only the first ``n`` tokens, or None if the
        schedule cannot return to the state a fresh ingestion of those tokens would have."""

    def truncate(self, n: int) -> None:
        """Forget every token from the ``n``-th on (after the cells at ``cut_position(n)`` are gone)."""
        self.n_tokens = n

    @abstractmethod
    def state(self) -> dict[str, int]:
        """The integers that, with group and window, restore this schedule exactly."""

    @classmethod
    def restore(cls, group: int, window: int, state: dict[str, int]) -> Schedule:
        """The schedule that :meth:`state` described; ValueError for a state of another shape."""
        schedule = cls(group, window)
        if set(state) != set(schedule.state()):
            raise ValueError(f"expected the keys {sorted(schedule.state())}, got {sorted(state)}")
        for key, value in state.items():
            if int(value) < 0:
                raise ValueError(f"{key} is negative")
            setattr(schedule, key, int(value))
        return schedule


class PlainSchedule(Schedule):
    """No extension: token ``j`` sits at position ``j``."""

    name = "plain"

    def __init__(self, group: int = 1, window: int = 1) -> None:
        super().__init__(1, 1)

    @property
    def next_pos(self) -> int:
        return self.n_tokens

    def prepare(self) -> list[Op]:
        return []

    def cut_position(self, n: int) -> int | None:
        return n

    def state(self) -> dict[str, int]:
        return {"n_tokens": self.n_tokens}


class NeighborSchedule(Schedule):
    """The last W..W+c tokens stay exact, every older token is grouped (METHOD.md section 3).

    With ``t`` tokens cached and the oldest ``g`` grouped (``g % G == 0``): token ``j < g`` sits at
    ``j // G`` and token ``j >= g`` at ``g/G + (j - g)``.
    """

    name = "neighbor"

    def __init__(self, group: int, window: int) -> None:
        super().__init__(group, window)
        self.n_grouped = 0

    @property
    def next_pos(self) -> int:
        return self.n_grouped // self.group + (self.n_tokens - self.n_grouped)

    def prepare(self) -> list[Op]:
        """Group the oldest ``k`` tail tokens when the tail exceeds W.

        The block sits at ``[base, base + k)`` (``base = g/G``) and must be divided from its original
        indices ``[g, g + k)``, so it moves up there, is divided, and the rest of the tail moves down by
        ``k - k/G``. Each edit scans every cell and each moved cell costs an index update, so only the
        tail cells that would sit inside the division's range are parked out of its way (none once
        ``g`` is large: then 3 edits and ``2k + tail`` moved cells a step; the first step needs 2).
        """
        G, g, t = self.group, self.n_grouped, self.n_tokens
        k = ((t - g - self.window) // G) * G
        if k <= 0:
            return []
        base, top = g // G, g // G + (t - g)  # the tail is at [base, top); the block is its first k
        shrink = k - k // G
        ops: list[Op] = []
        clash = (max(g, base + k), min(g + k, top))  # tail cells the division's range would catch
        parked = g and clash[0] < clash[1]
        if parked:
            ops.append(Add(clash[0], clash[1], top))  # top: above every position in use
        if g:
            ops.append(Add(base, base + k, g - base))
        ops.append(Div(g, g + k, G))
        ops.append(Add(base + k, -1, -shrink))
        if parked:
            ops.append(Add(clash[0] + top - shrink, -1, -top))
        self.n_grouped = g + k
        return ops

    def cut_position(self, n: int) -> int | None:
        g = self.n_grouped
        if g and n - g < self.window:
            return None  # a fresh ingestion would have fewer tokens grouped
        return g // self.group + (n - g)

    def state(self) -> dict[str, int]:
        return {"n_tokens": self.n_tokens, "n_grouped": self.n_grouped}


class LlamaCppSchedule(Schedule):
    """The loop of llama.cpp's completion tool with ``--grp-attn-n G --grp-attn-w W``."""

    name = "llamacpp"

    def __init__(self, group: int, window: int) -> None:
        super().__init__(group, window)
        self.n_past = 0
        self.ga_i = 0

    @property
    def next_pos(self) -> int:
        return self.n_past

    @property
    def max_chunk(self) -> int | None:
        return self.window

    def prepare(self) -> list[Op]:
        G, W = self.group, self.window
        ops: list[Op] = []
        while self.n_past >= self.ga_i + W:
            ib = (G * self.ga_i) // W
            bd = (W // G) * (G - 1)
            dd = (W // G) - ib * bd - W
            ops.append(Add(self.ga_i, self.n_past, ib * bd))
            ops.append(Div(self.ga_i + ib * bd, self.ga_i + ib * bd + W, G))
            ops.append(Add(self.ga_i + ib * bd + W, self.n_past + ib * bd, dd))
            self.n_past -= bd
            self.ga_i += W // G
        return ops

    def advance(self, n: int) -> None:
        super().advance(n)
        self.n_past += n

    def cut_position(self, n: int) -> int | None:
        return n if self.ga_i == 0 else None

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.n_past = n

    def state(self) -> dict[str, int]:
        return {"n_tokens": self.n_tokens, "n_past": self.n_past, "ga_i": self.ga_i}


SCHEDULES: dict[str, type[Schedule]] = {
    NeighborSchedule.name: NeighborSchedule,
    LlamaCppSchedule.name: LlamaCppSchedule,
}


def make_schedule(name: str, group: int, window: int) -> Schedule:
    """The named schedule, or the plain one when ``group`` is 1."""
    if group == 1:
        return PlainSchedule()
    try:
        return SCHEDULES[name](group, window)
    except KeyError:
        raise BadInputError(
            "unknown schedule {name!r}; choose one of: {choices}",
            param="schedule",
            name=name,
            choices=", ".join(SCHEDULES),
        ) from None
