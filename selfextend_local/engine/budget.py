"""The step budget: how much of a long reading a step may hold while other slots generate.

A step decodes one token for each generating slot and then prompt work; at depth one prompt token costs
milliseconds (every cell before it is attended), so a reading that took whole chunks would make a chat
beside it wait seconds a token (measured: a chat at 1 tok/s beside a 9k-token reading, 0.01 of its speed
alone). And llama.cpp decodes each sequence of a step in a batch of its own here (one cache stream a
sequence), so nothing is shared between the chat's token and the reading's: their costs add, and the
machine's time has to be split between them.

:class:`StepBudget` splits it. While any slot generates, a long reading goes in pieces of at most
:data:`STALL` seconds (as many tokens as its measured cost a token at its depth allows, at least one), and
after a piece the generating slots have the machine to themselves until they have had :data:`SHARE` of
the time since. Without a generating slot, a reading goes in whole chunks, as alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHARE = 0.6  # of the time, for the generating slots while a reading goes on beside them
STALL = 0.05  # seconds: the longest piece of a reading a generating slot's next token waits for
SMOOTHING = 0.3  # weight of the newest timing in the running estimates


@dataclass
class StepBudget:
    """Pieces of readings beside generating slots, and the time they owe the generating slots."""

    share: float = SHARE
    stall: float = STALL
    owed: float = 0.0  # seconds the generating slots are still owed since the last piece
    token_seconds: float | None = None  # a step of generating tokens alone
    piece_cost: dict[int, float] = field(default_factory=dict)  # seconds a reading token, by slot

    def describe(self) -> str:
        return (
            f"step budget: beside a reading, generating slots keep {self.share:.0%} of the time; a reading "
            f"goes in pieces of at most {self.stall * 1000:.0f} ms"
        )

    def piece(self, slot: int) -> int:
        """Tokens the reading in ``slot`` may decode this step beside generating slots (0: none now)."""
        if self.owed > 0:
            return 0
        cost = self.piece_cost.get(slot)
        return 1 if cost is None else max(1, int(self.stall / cost))

    def started(self, slot: int) -> None:
        """A new request in ``slot``: its reading's cost is unknown again."""
        self.piece_cost.pop(slot, None)

    def took(self, seconds: float, generating: int, pieces: dict[int, int]) -> None:
        """A step with ``generating`` tokens and ``pieces`` (tokens by slot) of budgeted readings took
        ``seconds``."""
        if not generating:
            return
        if not pieces:
            self.token_seconds = _blend(self.token_seconds, seconds)
            self.owed -= seconds
            return
        reading = max(seconds - (self.token_seconds or 0.0), 0.0)
        self.owed = max(self.owed, 0.0) + reading * self.share / (1 - self.share)
        tokens = sum(pieces.values())
        for slot in pieces:
            self.piece_cost[slot] = _blend(self.piece_cost.get(slot), reading / tokens)


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
