"""One flash-attention op, through ggml's own library (the one llama-cpp-python loads): the kernel tests
compare our kernels with the stock one on it, and scripts/bench_fa_op.py times them.

The op has the bundled model's attention (9 query heads on 3 KV heads of 64) over a cache of ``n_kv`` cells
stored as a KV type, for ``n_q`` tokens at its end, causal. The builds read GGML_CPU_FA_CONVERT (0: the
stock per-row kernel for quantized K/V) and GGML_CPU_FA_KERNEL (tiled: patch 0003's kernel; else patch
0005's) at every op, so one process runs each kernel on the same K and V.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np

from ..engine.kvtypes import KV_TYPES

HEAD, Q_HEADS, KV_HEADS = 64, 9, 3


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml() -> dict:
    """ggml's functions used here, from the libraries llama-cpp-python loaded."""
    folder = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    base, cpu = ctypes.CDLL(str(folder / "libggml-base.so")), ctypes.CDLL(str(folder / "libggml-cpu.so"))
    p, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "ggml_init": (base, p, [InitParams]),
        "ggml_free": (base, None, [p]),
        "ggml_new_tensor_4d": (base, p, [p, ctypes.c_int, i64, i64, i64, i64]),
        "ggml_get_data": (base, p, [p]),
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


class FlashAttention:
    """The op over random Q, K and V (K and V stored as ``kind``), built once, run as often as asked. With
    ``holes`` a tenth of the cells, and every cell for one query, are masked too."""

    def __init__(self, kind: str, n_q: int, n_kv: int, holes: bool = False, threads: int = 2) -> None:
        self.g, self.n_q, self.threads = ggml(), n_q, threads
        rng = np.random.default_rng(7)
        staging = 2 * n_kv * HEAD * KV_HEADS * 4 + n_q * n_kv * 2 + 2 * n_q * HEAD * Q_HEADS * 4
        self.ctx = self.g["ggml_init"](InitParams(3 * staging + (64 << 20), None, False))
        q = self._tensor(0, (HEAD, n_q, Q_HEADS), (3 * rng.standard_normal((Q_HEADS, n_q, HEAD))).astype(np.float32))
        stored = []
        for scale in (3.0, 1.0):  # K, then V: F32 values, stored as the cache's type
            values = (scale * rng.standard_normal((KV_HEADS, n_kv, HEAD))).astype(np.float32)
            cache = self._tensor(KV_TYPES[kind].ggml, (HEAD, n_kv, KV_HEADS))
            self._compute(self.g["ggml_cpy"](self.ctx, self._tensor(0, (HEAD, n_kv, KV_HEADS), values), cache))
            stored.append(cache)
        allowed = np.arange(n_kv)[None, :] <= (n_kv - n_q + np.arange(n_q))[:, None]
        if holes:
            allowed &= rng.random(n_kv)[None, :] > 0.1
            allowed[n_q // 2] = False
        mask = self._tensor(1, (n_kv, n_q), np.where(allowed, 0.0, -np.inf).astype(np.float16))
        self.result = self.g["ggml_flash_attn_ext"](self.ctx, q, *stored, mask, HEAD**-0.5, 0.0, 0.0)
        self.graph = self.g["ggml_new_graph"](self.ctx)
        self.g["ggml_build_forward_expand"](self.graph, self.result)

    def _tensor(self, kind: int, shape: tuple[int, ...], values: np.ndarray | None = None):
        made = self.g["ggml_new_tensor_4d"](self.ctx, kind, *shape, *([1] * (4 - len(shape))))
        if values is not None:
            ctypes.memmove(self.g["ggml_get_data"](made), values.ctypes.data, values.nbytes)
        return made

    def _compute(self, result) -> None:
        graph = self.g["ggml_new_graph"](self.ctx)
        self.g["ggml_build_forward_expand"](graph, result)
        assert self.g["ggml_graph_compute_with_ctx"](self.ctx, graph, self.threads) == 0

    def run(self, convert: str = "1", kernel: str = "gqa") -> np.ndarray:
        """The op's output with GGML_CPU_FA_CONVERT=``convert`` and GGML_CPU_FA_KERNEL=``kernel``."""
        self.seconds(convert, kernel, 1)
        out = np.empty(HEAD * Q_HEADS * self.n_q, dtype=np.float32)
        ctypes.memmove(out.ctypes.data, self.g["ggml_get_data"](self.result), out.nbytes)
        return out

    def seconds(self, convert: str, kernel: str, repeats: int) -> float:
        """The median time of ``repeats`` runs with these kernel switches."""
        times = []
        try:
            os.environ["GGML_CPU_FA_CONVERT"], os.environ["GGML_CPU_FA_KERNEL"] = convert, kernel
            for _ in range(repeats):
                start = time.perf_counter()
                assert self.g["ggml_graph_compute_with_ctx"](self.ctx, self.graph, self.threads) == 0
                times.append(time.perf_counter() - start)
        finally:
            os.environ.pop("GGML_CPU_FA_CONVERT", None)
            os.environ.pop("GGML_CPU_FA_KERNEL", None)
        return statistics.median(times)

    def flops(self, n_kv: int) -> float:
        """Multiply-adds (as two flops) of Q*K and softmax*V over the cells each query sees."""
        seen = self.n_q * (n_kv - self.n_q) + self.n_q * (self.n_q + 1) / 2
        return 4.0 * HEAD * Q_HEADS * seen

    def close(self) -> None:
        if self.ctx:
            self.g["ggml_free"](self.ctx)
            self.ctx = None

    def __enter__(self) -> FlashAttention:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attention(kind: str, n_q: int, n_kv: int, convert: str, kernel: str = "gqa", holes: bool = False) -> np.ndarray:
    """The op's output once, with these kernel switches."""
    with FlashAttention(kind, n_q, n_kv, holes) as op:
        return op.run(convert, kernel)
