"""Token sequences in a llama.cpp context, each kept in place by its own SelfExtend schedule.

A :class:`Context` is one llama.cpp context with room for one or more sequences; with several, each has its
own cache stream (``kv_unified = false``), so one sequence's position edits scan and move only its own
cells. A :class:`Sequence` owns its cells: it ingests tokens in chunks, applies its schedule's position
edits before each decode (dividing natively or by emulation, see :mod:`selfextend_local.division`), can
reuse a cached prefix, hold its grouping, and save and restore its state. :class:`Session` is the common
case: a context holding one sequence. The batch scheduler (:mod:`selfextend_local.batching`) puts many
sequences of one context into each decode.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from collections.abc import Sequence as Seq
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
MIN_BATCH = 64


@dataclass(frozen=True)
class RopeOverride:
    """llama.cpp's own context-extension baselines: linear RoPE scaling or YaRN."""

    kind: str  # "linear" or "yarn"
    factor: float


@dataclass(frozen=True)
class Entry:
    """One token of a decode: what, where, for which sequence, and whether its logits are wanted."""

    token: int
    pos: int
    seq: int
    logits: bool = False


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
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._dividers: dict[str, Divider] = {}

    def _new_context(self, cells: int):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells * self.n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_seq_max = self.n_seq
        params.kv_unified = False  # one stream a sequence: edits stay within it
        params.n_threads = params.n_threads_batch = self.runtime.threads
        params.type_k = params.type_v = _KV_TYPES[self.runtime.kv_type]
        if self.rope:
            params.rope_freq_scale = 1.0 / self.rope.factor
            if self.rope.kind == "linear":
                params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR
            else:
                params.rope_scaling_type = llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN
                params.yarn_orig_ctx = self.model.info.n_ctx_train
        llama_log.clear_errors()
        ctx = llama_cpp.llama_init_from_model(self.model.handle, params)
        if not ctx:
            detail = llama_log.last_error()
            raise EngineError(
                f"llama.cpp could not create a context of {cells * self.n_seq} tokens"
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

    @property
    def cells(self) -> int:
        """KV cells each sequence may use."""
        return llama_cpp.llama_n_ctx_seq(self.ctx)

    def divider(self, mode: str) -> Divider:
        """The division for ``mode`` (the probe runs on sequence 0, which must be empty the first time)."""
        if mode not in self._dividers:
            self._dividers[mode] = choose_divider(self, mode)
        return self._dividers[mode]

    def decode(self, entries: Seq[Entry]) -> None:
        """One ``llama_decode`` of ``entries``; output ``i`` of :meth:`logits_row` is the i-th entry."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, e in enumerate(entries):
            batch.token[i] = e.token
            batch.pos[i] = e.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = e.seq
            batch.logits[i] = e.logits
        llama_log.clear_errors()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            detail = llama_log.last_error()
            if rc == 1:
                raise EngineError("the context is full; pass a larger --ctx")
            raise EngineError(f"llama_decode failed with code {rc}" + (f": {detail}" if detail else ""))

    def decode_at(self, tokens: Seq[int], positions: Seq[int], logits: str = "last", seq: int = 0) -> None:
        """Decode ``tokens`` of one sequence at explicit ``positions`` (``logits``: none, last, all)."""
        n = len(tokens)
        self.decode(
            [
                Entry(t, p, seq, logits == "all" or (logits == "last" and i == n - 1))
                for i, (t, p) in enumerate(zip(tokens, positions))
            ]
        )

    def logits(self, index: int, n: int = 1) -> np.ndarray:
        """Logits of the latest decode, a copy: of the token at batch position ``index``, or (``index``
        negative) of the last ``-index`` outputs, ``n`` rows from there."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(n, self.model.n_vocab)).copy()

    def last_logits(self) -> np.ndarray:
        return self.logits(-1)[0]


class Sequence:
    """One token sequence of a :class:`Context`, with its plan, schedule and division."""

    def __init__(self, context: Context, seq_id: int, plan: Plan) -> None:
        model = context.model
        self.context = context
        self.model = model
        self.seq_id = seq_id
        self.plan = plan
        self.runtime = context.runtime
        if plan.extended and (reason := model.info.extendable_reason):
            raise ModelError(f"cannot self-extend {model.path.name}: {reason}")
        if plan.n_ctx > context.cells:
            raise EngineError(f"a sequence of {plan.n_ctx} cells does not fit the context's {context.cells}")
        self.schedule: Schedule = make_schedule(plan.schedule, plan.group, plan.window)
        limit = self.schedule.max_chunk or self.runtime.batch
        self.chunk = max(1, min(self.runtime.batch, limit, plan.n_ctx, context.n_batch))
        self.tokens: list[int] = []
        self._held: tuple[int, dict[str, int], int, int] | None = None  # tokens, schedule state, position, room
        self.divider: Divider | None = None
        if plan.extended:
            if not llama_cpp.llama_memory_can_shift(context.mem):
                raise ModelError(f"cannot self-extend {model.path.name}: its KV cache does not support position shifts")
            self.divider = context.divider(plan.division)

    @property
    def ctx(self):
        return self.context.ctx

    @property
    def mem(self):
        return self.context.mem

    @property
    def n_ctx(self) -> int:
        """Cells this sequence may fill."""
        return self.context.cells

    # -- decoding -------------------------------------------------------------------------------

    def apply(self, ops: Seq[Op]) -> None:
        """Carry out the schedule's position edits on this sequence's cells."""
        for op in ops:
            if isinstance(op, Add):
                if op.delta:
                    llama_cpp.llama_memory_seq_add(self.mem, self.seq_id, op.p0, op.p1, op.delta)
            else:
                self.divider.divide(self.mem, self.seq_id, op.p0, op.p1, op.d)

    def stage(self, n: int) -> int:
        """Make room for ``n`` more tokens: the schedule's edits (unless held), then their first position."""
        if len(self.tokens) + n > self.n_ctx:
            raise EngineError(
                f"{len(self.tokens) + n} tokens do not fit the context of {self.n_ctx}; pass a larger --ctx"
            )
        if self._held is not None and len(self.tokens) + n - self._held[0] > self._held[3]:
            self._held = None  # past the room it was held for: grouping resumes
        if self._held is None:
            self.apply(self.schedule.prepare())
        return self.schedule.next_pos

    def commit(self, tokens: Seq[int]) -> None:
        """Record that ``tokens`` were decoded at the positions :meth:`stage` gave."""
        self.schedule.advance(len(tokens))
        self.tokens.extend(tokens)

    def _decode_chunk(self, tokens: Seq[int], logits: str) -> None:
        start = self.stage(len(tokens))
        self.context.decode_at(tokens, range(start, start + len(tokens)), logits, self.seq_id)
        self.commit(tokens)

    def decode_at(self, tokens: Seq[int], positions: Seq[int], logits: str = "last") -> None:
        """Decode ``tokens`` at explicit ``positions`` with no schedule (the probe, tests)."""
        self.context.decode_at(tokens, positions, logits, self.seq_id)

    def ingest(
        self,
        tokens: Seq[int],
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
        """Append one generated token (the schedule groups every G tokens as they come, unless held)."""
        self._decode_chunk([token], "last")

    def logits(self, n: int = 1) -> np.ndarray:
        """Logits of the last ``n`` outputs of the latest decode, shape ``(n, n_vocab)`` (a copy)."""
        return self.context.logits(-n, n)

    def last_logits(self) -> np.ndarray:
        return self.logits(1)[0]

    # -- reuse ----------------------------------------------------------------------------------

    def reset(self) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, self.seq_id, -1, -1)
        self.schedule = make_schedule(self.plan.schedule, self.plan.group, self.plan.window)
        self.tokens = []
        self._held = None

    def hold(self, room: int) -> bool:
        """Stop grouping for the next ``room`` tokens and remember this point, to come back to it exactly.

        While held, tokens are appended at consecutive positions and no cell is moved, so dropping them
        later restores this state bit for bit, with no copy of it kept, and no K-shift is paid while
        generating. False (and nothing held) when ``room`` tokens would reach past the training context.
        """
        if self.schedule.next_pos + room > self.model.info.n_ctx_train:
            return False
        self._held = (len(self.tokens), self.schedule.state(), self.schedule.next_pos, room)
        return True

    @property
    def held(self) -> int | None:
        """How many tokens the held point has, or None."""
        return self._held[0] if self._held else None

    def rewind(self) -> None:
        """Drop every token after the held point."""
        self._cut_after_hold(self._held[0])

    def _cut_after_hold(self, n: int) -> None:
        """Keep the first ``n`` tokens, ``n`` at least the held point: those after it sit one a position."""
        held, state, pos, _ = self._held
        if len(self.tokens) > n:
            llama_cpp.llama_memory_seq_rm(self.mem, self.seq_id, pos + (n - held), -1)
            del self.tokens[n:]
            self.schedule = type(self.schedule).restore(self.plan.group, self.plan.window, state)
            self.schedule.advance(n - held)

    def truncate(self, n: int) -> bool:
        """Keep only the first ``n`` tokens; False when the schedule cannot do it (then reset)."""
        if n >= len(self.tokens):
            return True
        if self._held is not None and n >= self._held[0]:
            self._cut_after_hold(n)
            return True
        self._held = None
        pos = self.schedule.cut_position(n)
        if pos is None or not llama_cpp.llama_memory_seq_rm(self.mem, self.seq_id, pos, -1):
            return False
        self.schedule.truncate(n)
        del self.tokens[n:]
        return True

    def reuse(self, tokens: Seq[int]) -> int:
        """Keep the longest cached prefix of ``tokens`` that can be kept exactly (at least the last token
        is left to decode, so its logits are fresh); returns its length."""
        common = 0
        for a, b in zip(self.tokens, tokens[:-1]):
            if a != b:
                break
            common += 1
        if not self.truncate(common):
            self.reset()
            common = 0
        return common

    def prefill(self, tokens: Seq[int], progress: Progress | None = None, **kwargs) -> int:
        """Make the sequence equal ``tokens``, reusing the longest cached prefix; returns tokens reused."""
        tokens = list(tokens)
        if not tokens:
            raise EngineError("nothing to ingest: the prompt is empty")
        common = self.reuse(tokens)
        rest = tokens[common:]
        self.ingest(rest, (lambda done, total: progress(common + done, common + total)) if progress else None, **kwargs)
        return common

    # -- state ----------------------------------------------------------------------------------

    def save_file(self, path) -> None:
        """Write the sequence's tokens and KV cells to ``path`` in llama.cpp's own format, a layer at a
        time (no copy of the state in memory). Raises OSError."""
        tokens = (llama_cpp.llama_token * max(len(self.tokens), 1))(*self.tokens)
        llama_log.clear_errors()
        if not llama_cpp.llama_state_seq_save_file(self.ctx, str(path).encode(), self.seq_id, tokens, len(self.tokens)):
            raise OSError(f"llama.cpp could not write {path}: {llama_log.last_error() or 'unknown error'}")

    def load_file(self, path: str, schedule_state: dict[str, int]) -> None:
        """Restore what :meth:`save_file` wrote, with the schedule state that goes with it (read a layer at
        a time). Raises EngineError when llama.cpp or the schedule will not take it."""
        self.reset()
        capacity = self.n_ctx
        tokens = (llama_cpp.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        llama_log.clear_errors()
        read = llama_cpp.llama_state_seq_load_file(
            self.ctx, str(path).encode(), self.seq_id, tokens, capacity, ctypes.byref(count)
        )
        if not read:
            self.reset()
            raise EngineError(f"llama.cpp rejected the saved state: {llama_log.last_error() or 'unknown error'}")
        self._adopt(list(tokens[: count.value]), schedule_state)

    def _adopt(self, tokens: list[int], schedule_state: dict[str, int]) -> None:
        """Take ``tokens`` and the schedule state for the cells just restored, if they agree with them."""
        try:
            schedule = type(self.schedule).restore(self.plan.group, self.plan.window, schedule_state)
        except (TypeError, ValueError, AttributeError) as exc:
            self.reset()
            raise EngineError(f"the saved schedule state is not usable: {exc}") from None
        last = llama_cpp.llama_memory_seq_pos_max(self.mem, self.seq_id)
        if schedule.n_tokens != len(tokens) or last != schedule.next_pos - 1:
            self.reset()
            raise EngineError("the saved state does not match its schedule state")
        self.schedule = schedule
        self.tokens = tokens

    def state_bytes(self) -> bytearray:
        """The sequence's KV cells (positions included) as llama.cpp serialises them (one copy, no more)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, self.seq_id)
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, view, size, self.seq_id)
        del view  # release the export, so the bytearray may be resized
        del data[written:]
        return data

    def load_state(self, data, tokens: Seq[int], schedule_state: dict[str, int]) -> None:
        """Restore what :meth:`state_bytes` saved, with the tokens and schedule state that go with it."""
        self.reset()
        if isinstance(data, bytearray):
            buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        else:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), self.seq_id) != len(data):
            self.reset()
            raise EngineError("llama.cpp rejected the saved state")
        self._adopt(list(tokens), schedule_state)


class Session(Sequence):
    """The common case: a context of its own holding one sequence."""

    def __init__(
        self, model: Model, plan: Plan, runtime: RuntimeSettings | None = None, rope: RopeOverride | None = None
    ) -> None:
        runtime = runtime or RuntimeSettings()
        if plan.extended and (reason := model.info.extendable_reason):
            raise ModelError(f"cannot self-extend {model.path.name}: {reason}")
        limit = make_schedule(plan.schedule, plan.group, plan.window).max_chunk or runtime.batch
        context = Context(model, plan.n_ctx, runtime, 1, rope, batch=min(runtime.batch, limit, plan.n_ctx))
        try:
            super().__init__(context, 0, plan)
        except BaseException:
            context.close()
            raise
        self.rope = rope

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
