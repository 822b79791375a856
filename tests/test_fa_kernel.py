"""Flash attention on a quantized KV cache (patches/0003) and in tiles of a GQA group (patches/0005): our
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

import ctypes
import os
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from selfextend_local.engine.build import GQA_TILED_FA, TILED_QUANTIZED_FA, patch_level
from selfextend_local.engine.kvtypes import KV_TYPES

pytestmark = pytest.mark.skipif(
    patch_level(llama_cpp.__version__) < TILED_QUANTIZED_FA, reason="a build without the flash-attention patch"
)
HEAD, Q_HEADS, KV_HEADS = 64, 9, 3  # the bundled model's attention


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml():
    """ggml's functions this test calls, from the libraries llama-cpp-python loaded."""
    folder = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    base, cpu = ctypes.CDLL(str(folder / "libggml-base.so")), ctypes.CDLL(str(folder / "libggml-cpu.so"))
    p, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "ggml_init": (base, p, [InitParams]),
        "ggml_free": (base, None, [p]),
        "ggml_new_tensor_4d": (base, p, [p, ctypes.c_int, i64, i64, i64, i64]),
        "ggml_get_data": (base, p, [p]),
        "ggml_nbytes": (base, ctypes.c_size_t, [p]),
        "ggml_cpy": (base, p, [p, p, p]),
        "ggml_flash_attn_ext": (base, p, [p, p, p, p, p, f, f, f]),
        "ggml_new_graph": (base, p, [p]),
        "ggml_build_forward_expand": (base, None, [p, p]),
        "ggml_graph_compute_with_ctx": (cpu, ctypes.c_int, [p, p, ctypes.c_int]),
    }
    found = {}
    for name, (lib, result, args) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, args
        found[name] = function
    return found


def tensor(g, ctx, kind: int, shape: tuple[int, ...], values: np.ndarray | None = None):
    made = g["ggml_new_tensor_4d"](ctx, kind, *shape, *([1] * (4 - len(shape))))
    if values is not None:
        ctypes.memmove(g["ggml_get_data"](made), values.ctypes.data, values.nbytes)
    return made


def compute(g, ctx, result, threads: int = 2) -> None:
    graph = g["ggml_new_graph"](ctx)
    g["ggml_build_forward_expand"](graph, result)
    assert g["ggml_graph_compute_with_ctx"](ctx, graph, threads) == 0


def attention(kind: str, n_q: int, n_kv: int, convert: str, kernel: str = "gqa", holes: bool = False) -> np.ndarray:
    """Flash attention of random Q over random K and V stored as ``kind``, causal (with ``holes``: a tenth
    of the cells and one query's every cell masked too), with GGML_CPU_FA_CONVERT=``convert`` and
    GGML_CPU_FA_KERNEL=``kernel``."""
    g = ggml()
    rng = np.random.default_rng(7)
    ctx = g["ggml_init"](InitParams(256 << 20, None, False))
    try:
        q = tensor(g, ctx, 0, (HEAD, n_q, Q_HEADS), (3 * rng.standard_normal((Q_HEADS, n_q, HEAD))).astype(np.float32))
        stored = []
        for scale in (3.0, 1.0):  # K, then V: F32 values, stored as the cache's type
            values = (scale * rng.standard_normal((KV_HEADS, n_kv, HEAD))).astype(np.float32)
            cache = tensor(g, ctx, KV_TYPES[kind].ggml, (HEAD, n_kv, KV_HEADS))
            compute(g, ctx, g["ggml_cpy"](ctx, tensor(g, ctx, 0, (HEAD, n_kv, KV_HEADS), values), cache))
            stored.append(cache)
        allowed = np.arange(n_kv)[None, :] <= (n_kv - n_q + np.arange(n_q))[:, None]
        if holes:
            allowed &= rng.random(n_kv)[None, :] > 0.1
            allowed[n_q // 2] = False
        mask = tensor(g, ctx, 1, (n_kv, n_q), np.where(allowed, 0.0, -np.inf).astype(np.float16))
        os.environ["GGML_CPU_FA_CONVERT"] = convert
        os.environ["GGML_CPU_FA_KERNEL"] = kernel
        result = g["ggml_flash_attn_ext"](ctx, q, *stored, mask, HEAD**-0.5, 0.0, 0.0)
        compute(g, ctx, result)
        out = np.empty(HEAD * Q_HEADS * n_q, dtype=np.float32)
        ctypes.memmove(out.ctypes.data, g["ggml_get_data"](result), out.nbytes)
        return out
    finally:
        os.environ.pop("GGML_CPU_FA_CONVERT", None)
        os.environ.pop("GGML_CPU_FA_KERNEL", None)
        g["ggml_free"](ctx)


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


def test_q4_1_keeps_the_per_row_prefill():
    """q4_1 and q5_1 dot against q8_1, which has no conversion to F32: the stock kernel, bit for bit."""
    assert np.array_equal(attention("q4_1", 64, 512, "0"), attention("q4_1", 64, 512, "1"))
