"""Grouped-position division on the KV cache: llama.cpp's native call, or an emulation by shifts.

``llama_memory_seq_div`` in the llama.cpp that llama-cpp-python 0.3.36 vendors records the K-shift of
a divided cell as ``old - new`` instead of ``new - old``, so grouped keys end up rotated to about
``2*old - new``. ``seq_add`` is correct. Our install step builds llama.cpp with the one-line fix
(:mod:`selfextend_local.llama_build`); a cheap probe on the loaded model tells whether the division
of the build in use is correct, whichever build it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import llama_cpp
import numpy as np

from .errors import BadInputError
from .metrics import kl_divergence
from .schedules import division_as_shifts


class Decoder(Protocol):
    """What the probe needs of a context (:class:`selfextend_local.engine.context.Context`)."""

    model: object
    mem: object

    def decode_at(
        self, tokens: Sequence[int], positions: Sequence[int], logits: str = "last", seq: int = 0
    ) -> None: ...

    def last_logits(self) -> np.ndarray: ...


Divide = Callable[[object, int, int, int, int], None]  # (memory, seq_id, p0, p1, d)

_PROBE_TEXT = (
    "The committee met on a grey morning to read the letters again, one by one, "
    "while the rain kept falling on the old library roof and nobody spoke."
)
_PROBE_GROUP = 4
_PROBE_TOKENS = 32
_PROBE_MAX_KL = 1e-3


def divide_native(mem, seq: int, p0: int, p1: int, d: int) -> None:
    llama_cpp.llama_memory_seq_div(mem, seq, p0, p1, d)


def divide_emulated(mem, seq: int, p0: int, p1: int, d: int) -> None:
    """Move each position ``p`` of ``[p0, p1)`` to ``p // d`` with ``seq_add`` alone (see
    :func:`division_as_shifts`: about ``log2(d) / d`` calls a position)."""
    seq_add = llama_cpp.llama_memory_seq_add
    for op in division_as_shifts(p0, p1, d):
        seq_add(mem, seq, op.p0, op.p1, op.delta)


def build_description() -> str:
    """Which llama-cpp-python is loaded: ours (and with which of our fixes) or a stock one."""
    from .build import patch_level

    version = llama_cpp.__version__
    fixes = {
        1: "the seq_div fix",
        2: "the seq_div and K-shift fixes",
        3: "the seq_div, K-shift and flash-attention fixes",
        4: "the seq_div, K-shift, flash-attention and moved-cells K-shift fixes",
    }
    level = patch_level(version)
    if level:
        return f"llama-cpp-python {version} (built by selfextend-local with {fixes.get(level, 'its fixes')})"
    return f"llama-cpp-python {version} (not built by selfextend-local)"


HOW_TO_FIX = "for native division, run `selfextend-local build-llama` (README: the llama.cpp build)"


@dataclass(frozen=True)
class ProbeResult:
    """Whether native division gave the same next-token distribution as the emulation."""

    native_correct: bool
    kl: float

    def describe(self) -> str:
        verdict = "correct" if self.native_correct else "DEFECTIVE (wrong K-shift sign)"
        return f"native llama_memory_seq_div is {verdict} in this llama.cpp (probe KL {self.kl:.3g})"


@dataclass(frozen=True)
class Divider:
    """The division in use, and why."""

    name: str
    reason: str
    probe: ProbeResult | None = None
    native: Divide = divide_native

    def divide(self, mem, seq: int, p0: int, p1: int, d: int) -> None:
        (self.native if self.name == "native" else divide_emulated)(mem, seq, p0, p1, d)


_probe_cache: dict[Divide, ProbeResult] = {}


def probe(context: Decoder, native: Divide = divide_native) -> ProbeResult:
    """Decode a few tokens, divide their positions with ``native`` and by emulation, compare the next logits.

    Runs on sequence 0 of the context while it is empty, and leaves it empty. The result is a property of
    the llama.cpp build, so it is cached for the process.
    """
    if native in _probe_cache:
        return _probe_cache[native]
    tokens = context.model.tokenize(_PROBE_TEXT, add_special=False)
    tokens = (tokens * (_PROBE_TOKENS // max(len(tokens), 1) + 2))[: _PROBE_TOKENS + 1]
    query_pos = (_PROBE_TOKENS - 1) // _PROBE_GROUP + 1
    logits = []
    for divide in (native, divide_emulated):
        llama_cpp.llama_memory_seq_rm(context.mem, 0, -1, -1)
        context.decode_at(tokens[:-1], range(_PROBE_TOKENS), logits="none")
        divide(context.mem, 0, 0, _PROBE_TOKENS, _PROBE_GROUP)
        context.decode_at(tokens[-1:], [query_pos])
        logits.append(context.last_logits())
    llama_cpp.llama_memory_seq_rm(context.mem, 0, -1, -1)
    kl = float(kl_divergence(logits[1], logits[0]))
    result = _probe_cache[native] = ProbeResult(kl < _PROBE_MAX_KL, kl)
    return result


def choose_divider(context: Decoder, mode: str, native: Divide = divide_native) -> Divider:
    """``auto``: native when the probe finds it correct, else emulated; or force one of the two."""
    if mode == "emulated":
        return Divider("emulated", "forced (division emulated)", native=native)
    if mode not in ("auto", "native"):
        raise BadInputError(
            "unknown division {mode!r}; choose one of: auto, native, emulated", param="division", mode=mode
        )
    result = probe(context, native)
    if mode == "native":
        return Divider("native", "forced (division native); " + result.describe(), result, native)
    if result.native_correct:
        return Divider("native", result.describe(), result, native)
    reason = f"{result.describe()}; emulating division with seq_add; {HOW_TO_FIX}"
    return Divider("emulated", reason, result, native)
