"""One llama.cpp context holding one token sequence, kept in place by a SelfExtend schedule.

The session owns the KV cache: it ingests tokens in chunks, applies the schedule's position edits
before each decode (dividing natively or by emulation, see :mod:`selfextend_local.division`), and
can reuse a cached prefix, save and restore its state.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import llama_log
from .division import Divider, choose_divider
from .errors import EngineError, Interrupted, ModelError
from .memory import check_context_fits
from .model import Model
from .planning import Plan
from .schedules import Add, Op, Schedule, make_schedule
from .settings import RuntimeSettings

Progress = Callable[[int, int], None]
LogitsSink = Callable[[int, np.ndarray], None]

_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}


@dataclass(frozen=True)
class RopeOverride:
    """llama.cpp's own context-extension baselines: linear RoPE scaling or YaRN."""

    kind: str  # "linear" or "yarn"
    factor: float


class Session:
    """A context over a loaded :class:`Model` with one sequence and its schedule."""

    def __init__(
        self, model: Model, plan: Plan, runtime: RuntimeSettings | None = None, rope: RopeOverride | None = None
    ) -> None:
        self.model = model
        self.plan = plan
        self.rope = rope
        self.runtime = runtime or RuntimeSettings()
        if plan.extended and (reason := model.info.extendable_reason):
            raise ModelError(f"cannot self-extend {model.path.name}: {reason}")
        self.schedule: Schedule = make_schedule(plan.schedule, plan.group, plan.window)
        limit = self.schedule.max_chunk or self.runtime.batch
        self.chunk = max(1, min(self.runtime.batch, limit, plan.n_ctx))
        self.ctx = self._new_context()
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(max(self.chunk, 64), 0, 1)
        self.tokens: list[int] = []
        self.divider: Divider | None = None
        if plan.extended:
            if not llama_cpp.llama_memory_can_shift(self.mem):
                self.close()
                raise ModelError(f"cannot self-extend {model.path.name}: its KV cache does not support position shifts")
            self.divider = choose_divider(self, plan.division)

    # -- set-up ---------------------------------------------------------------------------------

    def _new_context(self):
        check_context_fits(self.model.info, self.plan.n_ctx, self.runtime.kv_type, self.runtime.gpu_layers > 0)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.plan.n_ctx
        params.n_batch = max(self.chunk, 64)
        params.n_ubatch = min(params.n_batch, 512)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.runtime.threads
        params.type_k = params.type_v = _KV_TYPES[self.runtime.kv_type]
        rope = self.rope
        if rope:
            train = self.model.info.n_ctx_train
            params.rope_freq_scale = 1.0 / rope.factor
            if rope.kind == "linear":
                params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR
            else:
                params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN
                params.yarn_orig_ctx = train
        llama_log.clear_errors()
        ctx = llama_cpp.llama_init_from_model(self.model.handle, params)
        if not ctx:
            detail = llama_log.last_error()
            raise EngineError(
                f"llama.cpp could not create a context of {self.plan.n_ctx} tokens"
                + (f": {detail}" if detail else "")
                + "; try a smaller --ctx or fewer --gpu-layers"
            )
        return ctx

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return llama_cpp.llama_n_ctx(self.ctx)

    # -- decoding -------------------------------------------------------------------------------

    def apply(self, ops: Sequence[Op]) -> None:
        """Carry out the schedule's position edits on sequence 0 of the cache."""
        for op in ops:
            if isinstance(op, Add):
                if op.delta:
                    llama_cpp.llama_memory_seq_add(self.mem, 0, op.p0, op.p1, op.delta)
            else:
                self.divider.divide(self.mem, 0, op.p0, op.p1, op.d)

    def decode_at(self, tokens: Sequence[int], positions: Sequence[int], logits: str = "last") -> None:
        """Decode ``tokens`` at explicit ``positions`` with no schedule (``logits``: none, last, all)."""
        batch = self.batch
        n = len(tokens)
        batch.n_tokens = n
        for i, (token, pos) in enumerate(zip(tokens, positions)):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = logits == "all"
        if logits == "last":
            batch.logits[n - 1] = True
        llama_log.clear_errors()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            detail = llama_log.last_error()
            if rc == 1:
                raise EngineError(f"the context of {self.n_ctx} tokens is full; pass a larger --ctx")
            raise EngineError(f"llama_decode failed with code {rc}" + (f": {detail}" if detail else ""))

    def _decode_chunk(self, tokens: Sequence[int], logits: str) -> None:
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EngineError(
                f"{len(self.tokens) + len(tokens)} tokens do not fit the context of {self.n_ctx}; pass a larger --ctx"
            )
        self.apply(self.schedule.prepare())
        start = self.schedule.next_pos
        self.decode_at(tokens, range(start, start + len(tokens)), logits)
        self.schedule.advance(len(tokens))
        self.tokens.extend(tokens)

    def ingest(
        self,
        tokens: Sequence[int],
        progress: Progress | None = None,
        on_logits: LogitsSink | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Append ``tokens`` to the sequence in chunks.

        ``progress(done, total)`` is called after each chunk. With ``on_logits``, every token's
        logits are computed and passed on chunk by chunk as ``on_logits(offset, array)``, where
        ``offset`` indexes ``tokens``. ``should_stop`` is polled between chunks (raises Interrupted).
        """
        total = len(tokens)
        for start in range(0, total, self.chunk):
            if should_stop and should_stop():
                raise Interrupted(f"stopped after {start} of {total} tokens")
            part = tokens[start : start + self.chunk]
            self._decode_chunk(part, "all" if on_logits else "last" if start + self.chunk >= total else "none")
            if on_logits:
                on_logits(start, self.logits(len(part)))
            if progress:
                progress(min(start + self.chunk, total), total)

    def decode_token(self, token: int) -> None:
        """Append one generated token (the schedule groups every G tokens as they come)."""
        self._decode_chunk([token], "last")

    def logits(self, n: int = 1) -> np.ndarray:
        """Logits of the last ``n`` outputs of the latest decode, shape ``(n, n_vocab)`` (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -n)
        return np.ctypeslib.as_array(ptr, shape=(n, self.model.n_vocab)).copy()

    def last_logits(self) -> np.ndarray:
        return self.logits(1)[0]

    # -- reuse ----------------------------------------------------------------------------------

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)
        self.schedule = make_schedule(self.plan.schedule, self.plan.group, self.plan.window)
        self.tokens = []

    def truncate(self, n: int) -> bool:
        """Keep only the first ``n`` tokens; False when the schedule cannot do it (then reset)."""
        if n >= len(self.tokens):
            return True
        pos = self.schedule.cut_position(n)
        if pos is None or not llama_cpp.llama_memory_seq_rm(self.mem, 0, pos, -1):
            return False
        self.schedule.truncate(n)
        del self.tokens[n:]
        return True

    def prefill(self, tokens: Sequence[int], progress: Progress | None = None, **kwargs) -> int:
        """Make the sequence equal ``tokens``, reusing the longest cached prefix; returns tokens reused.

        At least the last token is decoded again, so its logits are fresh for sampling.
        """
        tokens = list(tokens)
        if not tokens:
            raise EngineError("nothing to ingest: the prompt is empty")
        common = 0
        for a, b in zip(self.tokens, tokens[:-1]):
            if a != b:
                break
            common += 1
        if not self.truncate(common):
            self.reset()
            common = 0
        rest = tokens[common:]
        self.ingest(rest, (lambda done, total: progress(common + done, common + total)) if progress else None, **kwargs)
        return common

    # -- state ----------------------------------------------------------------------------------

    def state_bytes(self) -> bytearray:
        """The sequence's KV cells (positions included) as llama.cpp serialises them (one copy, no more)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, view, size, 0)
        del view  # release the export, so the bytearray may be resized
        del data[written:]
        return data

    def load_state(self, data, tokens: Sequence[int], schedule_state: dict[str, int]) -> None:
        """Restore what :meth:`state_bytes` saved, with the tokens and schedule state that go with it."""
        self.reset()
        if isinstance(data, bytearray):
            buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        else:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), 0) != len(data):
            self.reset()
            raise EngineError("llama.cpp rejected the saved state")
        try:
            schedule = type(self.schedule).restore(self.plan.group, self.plan.window, schedule_state)
        except (TypeError, ValueError, AttributeError) as exc:
            self.reset()
            raise EngineError(f"the saved schedule state is not usable: {exc}") from None
        last = llama_cpp.llama_memory_seq_pos_max(self.mem, 0)
        if schedule.n_tokens != len(tokens) or last != schedule.next_pos - 1:
            self.reset()
            raise EngineError("the saved state does not match its schedule state")
        self.schedule = schedule
        self.tokens = list(tokens)
