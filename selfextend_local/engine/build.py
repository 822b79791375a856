"""Which llama-cpp-python build is loaded: ours (built from the sdist with the patches in ``patches/``)
or a stock one. Standard library only: :mod:`selfextend_local.llama_build` uses it before anything else
is installed."""

from __future__ import annotations

LABEL = "selfextend.7"  # the local version label of our builds; bump when the patches change
TILED_QUANTIZED_FA = 3  # the level whose flash attention reads a quantized KV cache in tiles
KSHIFT_MOVED_CELLS = 4  # the level whose K-shift rotates only the cells that moved
GQA_TILED_FA = 5  # the level whose flash attention reads a GQA group's query heads in one tile
GQA_SHORT_FA = 7  # the level whose GQA tiles score a short batch with the cells as vector lanes


def patch_level(version: str) -> int:
    """Which of our patch sets a build carries: 0 for a stock build, 1 for the seq_div fix alone, 2 with the
    quantized K-shift fix too, 3 with flash attention on a quantized KV cache at F16's speed too, 4 with a
    K-shift that rotates only the cells that moved too, 5 with flash attention in tiles of a GQA group's
    query heads too, 6 with those tiles' GEMMs blocked for AVX-512 (the same output, faster at depth), 7 with
    short batches (drafted tokens; a one-token decode on a quantized cache) scored with the cells as vector
    lanes."""
    _, _, label = version.partition("+selfextend.")
    return int(label) if label.isdigit() else 0


def fa_kernel(version: str) -> str:
    """How this build's CPU flash attention reads a quantized or bf16 KV cache (q4_1 and q5_1 stay row by
    row: their dot type has no conversion to F32)."""
    if patch_level(version) >= GQA_TILED_FA:
        return "tiled by KV head, any batch (our fix): every KV type reads prompts at about 2x the f16 tiles' speed"
    if patch_level(version) >= TILED_QUANTIZED_FA:
        return "tiled, as f16 (our fix): quantized KV caches read prompts at f16's speed"
    return "row by row (stock): a quantized KV cache reads prompts at 0.2-0.45x of f16's speed"


def kshift_kind(version: str) -> str:
    """Which cells one K-shift (at each SelfExtend grouping step) rotates with this build."""
    if patch_level(version) >= KSHIFT_MOVED_CELLS:
        return "the cells that moved (our fix)"
    return "every cell of every sequence's cache (stock): a server's grouping steps cost more the more slots it has"
