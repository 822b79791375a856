"""Whether llama.cpp's K-shift is right for a quantized K cache, as :mod:`.division` asks of ``seq_div``.

SelfExtend moves cached keys; each move of a quantized K makes llama.cpp dequantize it, undo the Hadamard
rotation it was stored with (``attn_rot_k``), rotate it by the shift, rotate and quantize it again. In the
llama.cpp that llama-cpp-python 0.3.36 vendors that path has defects that our second patch fixes
(``patches/0002-kshift-quantized-k.patch``, ``docs/UPSTREAM_KSHIFT_QUANT.md``): with the rotation off
(``LLAMA_ATTN_ROT_DISABLE``, or a head size that is not a multiple of 64) it dereferences a null matrix and
the process dies; with partial rotary dimensions (or MLA) the CPU backend aborts. A crash cannot be
probed, so on a build without the patch those cases are refused by rule; every other case is probed: a
cache shifted several times is compared with one decoded directly at the final positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import llama_cpp
import numpy as np

from . import arena
from .build import patch_level
from .kvtypes import KV_TYPES
from .metrics import kl_divergence

_PROBE_TEXT = (  # plain prose, not repeated: what comes next depends on what came long before
    "When the ferry from Harwich was cancelled for the third time that week, Margaret Ellison packed two suitcases, "
    "left a note for the landlord about the broken boiler, and took the night train north to Aberdeen, where her "
    "brother kept a small bookshop near the harbour. He had written in March to say that the shop was failing, that "
    "the roof leaked over the poetry shelves, and that he could not afford to replace the heating before winter. She "
    "arrived at six in the morning with a plan, a ledger and forty pounds, and by the end of the month the shop "
    "belonged to both of them."
)
_BODY = 96  # tokens decoded and then shifted; the rest of the text is read after, and compared token by token
_SHIFTS = (700, -250, 333, -180, 91, 306)  # each cell moves six times, as a tail cell of a long ingestion may
# A defect is a KL above both of these: a floor, and a multiple of what quantizing the cache costs at all.
# Measured on the bundled model (mean over the compared tokens): shifted against direct f16 0.003, q8_0
# 0.003, q5_0 0.028, q4_0 0.061, iq4_nl 0.068, where quantizing costs 0.003, 0.012, 0.035, 0.024; keys
# lost to a wrong shift (half of them dropped) 0.76-0.81.
MIN_KL = 0.1
NOISE_FACTOR = 5
# What to do about a build that would crash: a template over ``kv_type``, the setting's name where it is shown.
CRASH_FIX = "build llama.cpp with our fix (`selfextend-local build-llama`) or use {kv_type} f16"


@dataclass(frozen=True)
class KShiftVerdict:
    """Whether shifting this K cache type is safe here, the probe's KL, and why not."""

    safe: bool
    kl: float | None
    reason: str
    crash: bool = False  # refused by rule: this build would crash (see CRASH_FIX)

    def describe(self) -> str:
        return self.reason


def rotation_disabled() -> bool:
    """llama.cpp's own reading of LLAMA_ATTN_ROT_DISABLE: atoi() of it, so "1" disables and "yes" does not."""
    text = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "").strip()
    digits = text[1:] if text[:1] in "+-" else text
    number = digits[: len(digits) - len(digits.lstrip("0123456789"))] if digits else ""
    return bool(number) and int(number) != 0


def crash_reason(info, kv_type: str, version: str) -> str | None:
    """Why shifting a K cache of ``kv_type`` would crash this build (None: it would not); what to do about
    it is :data:`CRASH_FIX`."""
    if patch_level(version) >= 2 or not (KV_TYPES[kv_type].quantized or kv_type == "bf16"):
        return None
    if kv_type == "bf16":  # ggml-cpu's RoPE takes f16 and f32 only, and the shift ropes K in place
        return "this llama.cpp aborts shifting a bf16 K cache on the CPU"
    if info.mla or (info.n_rot and info.head_k and info.n_rot != info.head_k):
        return "this llama.cpp aborts shifting a quantized K of a model with partial rotary dimensions"
    if rotation_disabled():
        return "with LLAMA_ATTN_ROT_DISABLE set this llama.cpp crashes shifting a quantized K"
    if info.head_k % 64:
        return f"this llama.cpp crashes shifting a quantized K with a head size of {info.head_k} (not a multiple of 64)"
    return None


_verdicts: dict[tuple, KShiftVerdict] = {}


def check(model, runtime) -> KShiftVerdict:
    """The verdict for ``runtime.kv_type`` on ``model`` with the loaded build (probed once a process)."""
    version = llama_cpp.__version__
    key = (str(model.path), runtime.kv_type, runtime.flash_attn, rotation_disabled(), version)
    if key not in _verdicts:
        _verdicts[key] = _decide(model, runtime, version)
    return _verdicts[key]


def _decide(model, runtime, version: str) -> KShiftVerdict:
    reason = crash_reason(model.info, runtime.kv_type, version)
    if reason is not None:
        return KShiftVerdict(False, None, reason, crash=True)
    if runtime.kv_type in ("f16", "f32"):
        return KShiftVerdict(True, None, f"{runtime.kv_type} keys are shifted in place")
    kl, noise = probe(model, runtime)
    arena.give_back()  # the probe's caches and logits came from the heap: not kept beside the context that asked
    limit = max(MIN_KL, NOISE_FACTOR * noise)
    if kl > limit:
        return KShiftVerdict(
            False,
            kl,
            f"a {runtime.kv_type} K cache shifted six times differs from one decoded in place by KL {kl:.3g}, "
            f"above {limit:.3g} (quantizing alone costs {noise:.3g}): llama.cpp's K-shift is wrong here",
        )
    return KShiftVerdict(True, kl, f"{runtime.kv_type} K-shift probe KL {kl:.3g} (limit {limit:.3g})")


def probe(model, runtime, shift=None) -> tuple[float, float]:
    """(shift KL, quantization KL): the mean KL, over the tokens after it, between a cache moved by each of
    ``_SHIFTS`` in turn (by ``shift``; a test gives a wrong one) and a cache of the same type decoded
    directly at the final positions; and between that direct cache and an f16 one."""
    tokens = model.tokenize(_PROBE_TEXT, add_special=False)
    body, tail = tokens[:_BODY], tokens[_BODY:]
    net = sum(_SHIFTS)
    shifted = _tail_logits(model, runtime, body, tail, net, shift or _shift_in_steps)
    direct = _tail_logits(model, runtime, body, tail, net, None)
    f16 = _tail_logits(model, replace(runtime, kv_type="f16"), body, tail, net, None)
    return float(kl_divergence(direct, shifted).mean()), float(kl_divergence(f16, direct).mean())


def _tail_logits(model, runtime, body: list[int], tail: list[int], net: int, shift) -> np.ndarray:
    """Logits of every tail token after ``body``: decoded at 0 and shifted by ``net`` (with ``shift``), or
    decoded directly at ``net`` (``shift`` None)."""
    from .context import Context

    context = Context(model, 2048, runtime)
    try:
        context.decode_at(body, range(0 if shift else net, (0 if shift else net) + len(body)), logits="none")
        if shift:
            shift(context, tail[0], len(body))
        context.decode_at(tail, range(net + len(body), net + len(body) + len(tail)), logits="all")
        return context.logits(-len(tail), len(tail))
    finally:
        context.close()


def _shift_in_steps(context, token: int, n: int) -> None:
    """Move the ``n`` cells by each of ``_SHIFTS`` in turn, each at a decode of its own (as the schedule's
    edits are: llama.cpp applies the sum of a cell's pending moves at the next decode). A throwaway token
    right after the last makes each decode, and is removed again."""
    at = 0
    for delta in _SHIFTS:
        llama_cpp.llama_memory_seq_add(context.mem, 0, 0, -1, delta)
        at += delta
        context.decode_at([token], [at + n], logits="none")
        llama_cpp.llama_memory_seq_rm(context.mem, 0, at + n, -1)
