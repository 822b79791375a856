"""One llama.cpp context with room for one or more sequences, and the decode of a batch of spans.

With several sequences each has its own cache stream (``kv_unified = false``), so one sequence's position
edits scan and move only its own cells.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import llama_log
from .division import Divider, choose_divider
from .errors import EngineError, Name
from .kvtypes import KV_TYPES
from .memory import check_context_fits
from .model import Model
from .settings import RuntimeSettings

MIN_BATCH = 64
_FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass(frozen=True)
class RopeOverride:
    """llama.cpp's own context-extension baselines: linear RoPE scaling or YaRN."""

    kind: str  # "linear" or "yarn"
    factor: float


@dataclass(frozen=True)
class Span:
    """Tokens of one sequence at consecutive positions from ``start``, decoded together; ``logits`` says
    which of them give logits: ``none``, ``last`` or ``all``."""

    tokens: Seq[int]
    start: int
    seq: int = 0
    logits: str = "last"


class Context:
    """One llama.cpp context with ``n_seq`` sequences of ``cells`` KV cells each."""

    def __init__(
        self,
        model: Model,
        cells: int,
        runtime: RuntimeSettings | None = None,
        n_seq: int = 1,
        rope: RopeOverride | None = None,
        batch: int | None = None,
    ) -> None:
        self.model = model
        self.runtime = runtime or RuntimeSettings()
        self.n_seq = n_seq
        self.rope = rope
        self.n_batch = max(MIN_BATCH, min(batch or self.runtime.batch, cells * n_seq))
        check_context_fits(model.info, cells * n_seq, self.runtime.kv_type, self.runtime.gpu_layers > 0)
        self.ctx = self._new_context(cells)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.cells = llama_cpp.llama_n_ctx_seq(self.ctx)  # KV cells each sequence may use
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        batch = self.batch  # its arrays, fetched once: each ctypes field read makes a new pointer object
        self._fields = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        self._dividers: dict[str, Divider] = {}

    def _params(self, cells: int):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells * self.n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_seq_max = self.n_seq
        params.kv_unified = False  # one stream a sequence: edits stay within it
        params.n_threads = params.n_threads_batch = self.runtime.threads
        params.type_k = params.type_v = KV_TYPES[self.runtime.kv_type].ggml
        params.flash_attn_type = _FLASH_ATTN[self.runtime.flash_attn]
        if self.rope:
            params.rope_freq_scale = 1.0 / self.rope.factor
            if self.rope.kind == "linear":
                params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR
            else:
                params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN
                params.yarn_orig_ctx = self.model.info.n_ctx_train
        return params

    def _new_context(self, cells: int):
        llama_log.clear_errors()
        ctx = llama_cpp.llama_init_from_model(self.model.handle, self._params(cells))
        if not ctx:
            detail = llama_log.last_error()
            raise EngineError(
                "llama.cpp could not create a context of {n} tokens"
                + (": {detail}" if detail else "")
                + "; try a smaller {ctx} or fewer {gpu_layers}",
                param="ctx",
                n=cells * self.n_seq,
                detail=detail,
                ctx=Name("ctx"),
                gpu_layers=Name("gpu_layers"),
            )
        return ctx

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def divider(self, mode: str) -> Divider:
        """The division for ``mode`` (the probe runs on sequence 0, which must be empty the first time)."""
        if mode not in self._dividers:
            self._dividers[mode] = choose_divider(self, mode)
        return self._dividers[mode]

    def decode(self, spans: Seq[Span]) -> None:
        """One ``llama_decode`` of ``spans``, in order; a span's logits are read with :meth:`logits` at the
        batch index of its tokens (the first span's tokens are indices 0.., the next span's follow)."""
        token, pos, n_seq_id, seq_id, logits = self._fields
        i = 0
        for span in spans:
            last = len(span.tokens) - 1
            for j, t in enumerate(span.tokens):
                token[i] = t
                pos[i] = span.start + j
                n_seq_id[i] = 1
                seq_id[i][0] = span.seq
                logits[i] = span.logits == "all" or (span.logits == "last" and j == last)
                i += 1
        batch = self.batch
        batch.n_tokens = i
        llama_log.clear_errors()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            detail = llama_log.last_error()
            if rc == 1:
                raise EngineError("the context is full; pass a larger {ctx}", param="ctx", ctx=Name("ctx"))
            raise EngineError(
                "llama_decode failed with code {rc}" + (": {detail}" if detail else ""), rc=rc, detail=detail
            )

    def decode_at(self, tokens: Seq[int], positions: Seq[int], logits: str = "last", seq: int = 0) -> None:
        """Decode ``tokens`` of one sequence at explicit ``positions`` (each its own span: the probe, tests)."""
        n = len(tokens)
        self.decode(
            [
                Span([t], p, seq, "last" if logits == "all" or (logits == "last" and i == n - 1) else "none")
                for i, (t, p) in enumerate(zip(tokens, positions))
            ]
        )

    def logits(self, index: int, n: int = 1) -> np.ndarray:
        """Logits of the latest decode, a copy: ``n`` rows from the token at batch index ``index`` (negative:
        counted from the last output)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(n, self.model.n_vocab)).copy()

    def last_logits(self) -> np.ndarray:
        return self.logits(-1)[0]
