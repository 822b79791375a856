"""The KV cache types llama.cpp offers, their real size, and what each needs of flash attention.

A quantized cache stores blocks of 32 values in fewer bytes (q8_0: 34 bytes, about 0.53 of f16; q4_0: 18,
about 0.28), so the same memory holds 2-3.5 times the tokens. llama.cpp quantizes V only with flash
attention; K needs it only for its own kernels. Whether a quantized K survives SelfExtend's K-shifts is
:mod:`.kshift`'s question.
"""

from __future__ import annotations

from dataclasses import dataclass

FLASH_ATTN = ("auto", "on", "off")


@dataclass(frozen=True)
class KVType:
    """A ggml type a KV cache can use: its id, and ``block_bytes`` per ``block`` values."""

    name: str
    ggml: int  # ggml.h: enum ggml_type
    block: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def bytes_for(self, values: int) -> int:
        """Bytes ``values`` values of this type take (whole blocks)."""
        return -(-values // self.block) * self.block_bytes


KV_TYPES = {
    t.name: t
    for t in (
        KVType("f16", 1, 1, 2),
        KVType("f32", 0, 1, 4),
        KVType("bf16", 30, 1, 2),
        KVType("q8_0", 8, 32, 34),
        KVType("q5_1", 7, 32, 24),
        KVType("q5_0", 6, 32, 22),
        KVType("q4_1", 3, 32, 20),
        KVType("q4_0", 2, 32, 18),
        KVType("iq4_nl", 20, 32, 18),
    )
}


@dataclass(frozen=True)
class Cost:
    """What a cache type cost on the bundled model (SmolLM2-135M-Instruct Q4_1, two CPU threads): perplexity
    above f16's (a fraction) at 4k tokens without extension (the type's own cost) and at 12k under G4 W2048
    (`scripts/kv_quality.py`); prompt speed against f16's at 12k under G4 with llama.cpp's stock kernel and
    with ours (`scripts/bench_fa_kernel.py`). Other models and machines differ; these say which way and how
    far, so the choice is made knowing."""

    ppl_4k: float
    ppl_12k: float
    speed_stock: float
    speed_ours: float


COSTS = {  # measured 2026-12-05; see docs/RESULTS.md
    "f16": Cost(0.0, 0.0, 1.0, 1.0),
    "q8_0": Cost(0.0005, 0.0013, 0.36, 1.16),
    "q4_0": Cost(0.0727, 0.1056, 0.19, 1.07),
}
