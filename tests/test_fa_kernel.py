"""Flash attention on a quantized KV cache (patches/0003), in tiles of a GQA group (patches/0005) and for
short batches in those tiles (patches/0006): our
kernels against the stock per-row one on the same K and V, op by op, through ggml's own library (the one
llama-cpp-python loads), on this CPU.

GGML_CPU_FA_CONVERT=0 sends these types to the per-row kernel, as a stock build does, and
GGML_CPU_FA_KERNEL=tiled to patch 0003's kernel; the patched build reads both at every op, so one process
computes them all. The model's own outputs are no place for this
comparison: the bundled model's Q4_1 weight products quantize their activations, and any change in how
a float sum is ordered flips some of those roundings (llama.cpp's own f16 decode and prefill give the
same token's distribution a KL of 2.9e-3 apart on it: `scripts/fa_kernel_kl.py`), so the op itself is
compared here, and the model-level figures are the script's.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from selfextend_local.engine.build import GQA_SHORT_FA, GQA_TILED_FA, TILED_QUANTIZED_FA, patch_level
from selfextend_local.evaluation.fa_op import attention

pytestmark = pytest.mark.skipif(
    patch_level(llama_cpp.__version__) < TILED_QUANTIZED_FA, reason="a build without the flash-attention patch"
)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_0", "iq4_nl", "bf16"])
@pytest.mark.parametrize(("n_q", "n_kv"), [(64, 1024), (1, 1024)])  # a prefill chunk (tiles); a decode (split)
def test_the_tiled_kernel_gives_the_per_row_kernels_attention(kind, n_q, n_kv):
    stock, ours = attention(kind, n_q, n_kv, "0"), attention(kind, n_q, n_kv, "1", "tiled")
    assert 0 < relative_error(ours, stock) < 1e-5  # other sums in another order (0: the switch did nothing)


@pytest.mark.skipif(patch_level(llama_cpp.__version__) < GQA_TILED_FA, reason="a build without the GQA kernel")
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "bf16"])
@pytest.mark.parametrize("n_q", [130, 16, 5])  # blocks of the GQA tile and a part of one; batches under 64
@pytest.mark.parametrize("holes", [False, True])
def test_the_gqa_kernel_gives_the_per_row_kernels_attention(kind, n_q, holes):
    n_kv = 1000  # not a whole number of tiles
    stock = attention(kind, n_q, n_kv, "0", holes=holes)
    ours = attention(kind, n_q, n_kv, "1", "gqa", holes=holes)
    assert 0 < relative_error(ours, stock) < 1e-5


@pytest.mark.skipif(patch_level(llama_cpp.__version__) < GQA_TILED_FA, reason="a build without the GQA kernel")
@pytest.mark.parametrize("n_q", [64, 130])
def test_the_gqa_kernel_gives_the_f16_tiles_attention(n_q):
    """f16 takes the tiled kernel in every build from 64 tokens on (Q in F32, as ours)."""
    tiled, ours = attention("f16", n_q, 1000, "1", "tiled"), attention("f16", n_q, 1000, "1", "gqa")
    assert 0 < relative_error(ours, tiled) < 1e-5


short_path = pytest.mark.skipif(
    patch_level(llama_cpp.__version__) < GQA_SHORT_FA, reason="a build without the short-batch path"
)


@short_path
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("n_q", [2, 5])  # 6 and 15 rows of a KV head's 3 query heads: under 16, the short path
@pytest.mark.parametrize("holes", [False, True])
def test_the_short_batch_path_gives_the_gqa_gemms_attention_bit_for_bit(kind, n_q, holes):
    """patch 0006 against patch 0005 alone (GGML_CPU_FA_KERNEL=gqa-gemm), 1000 cells ending in a part of a
    tile: the same sums in the same order, so a token's attention does not depend on the batch it is in."""
    gemm = attention(kind, n_q, 1000, "1", "gqa-gemm", holes=holes)
    ours = attention(kind, n_q, 1000, "1", "gqa", holes=holes)
    assert np.array_equal(ours, gemm) and np.abs(ours).max() > 0


@short_path
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_a_one_token_decode_on_a_quantized_cache_takes_the_short_path(kind):
    stock = attention(kind, 1, 1000, "0")
    split = attention(kind, 1, 1000, "1", "gqa-gemm")
    ours = attention(kind, 1, 1000, "1", "gqa")
    assert 0 < relative_error(ours, stock) < 1e-5
    assert not np.array_equal(ours, split)  # another path than the split-KV one


@short_path
def test_a_one_token_decode_on_an_f16_cache_keeps_the_split_path():
    assert np.array_equal(attention("f16", 1, 1000, "1", "gqa"), attention("f16", 1, 1000, "1", "gqa-gemm"))


def test_q4_1_keeps_the_per_row_prefill():
    """q4_1 and q5_1 dot against q8_1, which has no conversion to F32: the stock kernel, bit for bit."""
    assert np.array_equal(attention("q4_1", 64, 512, "0"), attention("q4_1", 64, 512, "1"))
