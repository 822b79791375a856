"""The K-shift of the moved cells only (patches/0004) against llama.cpp's own of every cell, on the real model.

Both are in the patched build: LLAMA_KV_SHIFT_ALL_CELLS=1, read at every K-shift, rotates every cell of
every stream as the stock build does. A cell that did not move is rotated by 0 there, which leaves it as it
was; so the next token's logits after the same position edits must be the same bit for bit, whichever
streams hold the moved cells.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from selfextend_local.engine.build import KSHIFT_MOVED_CELLS, patch_level
from selfextend_local.engine.context import Context, Span
from selfextend_local.engine.settings import RuntimeSettings

pytestmark = pytest.mark.skipif(
    patch_level(llama_cpp.__version__) < KSHIFT_MOVED_CELLS, reason="a build without the moved-cells K-shift"
)
ALL_CELLS = "LLAMA_KV_SHIFT_ALL_CELLS"
PROMPT = [(7 * i + 3) % 2000 + 100 for i in range(240)]


def logits_after_edits(model, kv_type: str, seqs: tuple[int, ...]) -> np.ndarray:
    """Three sequences read the same prompt; those in ``seqs`` get SelfExtend's edits (a group divided, the
    cells after it moved up to it); then each sequence decodes one token: their logits, stacked."""
    context = Context(model, 512, RuntimeSettings(kv_type=kv_type), n_seq=3)
    try:
        for seq in range(3):
            context.decode([Span(PROMPT, 0, seq, "none")])
        for seq in seqs:
            llama_cpp.llama_memory_seq_div(context.mem, seq, 32, 160, 4)
            llama_cpp.llama_memory_seq_add(context.mem, seq, 160, 240, -96)
        rows = []
        for seq in range(3):
            next_pos = llama_cpp.llama_memory_seq_pos_max(context.mem, seq) + 1
            context.decode([Span([PROMPT[0]], next_pos, seq, "last")])
            rows.append(context.logits(-1)[0])
        return np.stack(rows)
    finally:
        context.close()


@pytest.mark.parametrize("kv_type", [pytest.param("f16", marks=pytest.mark.slow), "q8_0"])
def test_moved_cells_only_equals_every_cell(model, monkeypatch, kv_type):
    seqs = (0, 2)  # the first and the last stream moved, the one between them not
    monkeypatch.setenv(ALL_CELLS, "1")
    every = logits_after_edits(model, kv_type, seqs)
    monkeypatch.delenv(ALL_CELLS)
    moved = logits_after_edits(model, kv_type, seqs)
    assert np.array_equal(moved, every)
    # the edits changed what the edited sequences see (the one between them read the same prompt unedited)
    assert np.array_equal(moved[0], moved[2]) and not np.array_equal(moved[0], moved[1])
