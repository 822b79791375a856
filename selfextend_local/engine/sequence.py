"""One token sequence of a context, kept in place by its own SelfExtend schedule.

A :class:`Sequence` owns its cells: before each decode it applies its schedule's position edits (dividing
natively or by emulation, see :mod:`.division`), tells the first position of what comes next, and records
what was decoded. It can keep the longest cached prefix of a new prompt, *hold* its grouping so that what
follows can be dropped again exactly, and be cut back. Decoding itself is the slot loop's job
(:mod:`.slots`); saving and restoring cells is :mod:`.state`'s.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import llama_cpp

from . import kshift
from .context import Context
from .division import Divider
from .errors import EngineError, ModelError, Name
from .planning import Plan
from .schedules import Add, Op, Schedule, make_schedule


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
            raise ModelError("cannot self-extend {name}: {reason}", name=model.path.name, reason=reason)
        if plan.n_ctx > context.cells:
            raise EngineError(
                "a sequence of {n} cells does not fit the context's {cells}", n=plan.n_ctx, cells=context.cells
            )
        self.schedule: Schedule = make_schedule(plan.schedule, plan.group, plan.window)
        self.chunk = chunk_size(plan, self.runtime.batch, context.n_batch)
        self.tokens: list[int] = []
        self._held: tuple[int, dict[str, int], int, int] | None = None  # tokens, schedule state, position, room
        self.divider: Divider | None = None
        if plan.extended:
            if not llama_cpp.llama_memory_can_shift(context.mem):
                raise ModelError(
                    "cannot self-extend {name}: its KV cache does not support position shifts", name=model.path.name
                )
            check_kshift(model, self.runtime)  # before the division probe, which shifts keys too
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

    # -- positions ------------------------------------------------------------------------------

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
                "{n} tokens do not fit the context of {cells}; pass a larger {ctx}",
                param="ctx",
                n=len(self.tokens) + n,
                cells=self.n_ctx,
                ctx=Name("ctx"),
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

    def in_one_step(self, n: int) -> int:
        """How many of ``n`` tokens (at least one) one decode can append now at the positions, and with
        the cells around them, that decoding them one at a time would give: none of the schedule's edits
        may fall between them (held: within the room held; else before the schedule's next grouping)."""
        n = max(1, min(n, self.n_ctx - len(self.tokens)))
        if self._held is not None:
            room = self._held[0] + self._held[3] - len(self.tokens)
            if room >= 1:
                return min(n, room)
        schedule = type(self.schedule).restore(self.plan.group, self.plan.window, self.schedule.state())
        schedule.prepare()  # what staging the first token does
        for i in range(1, n):
            schedule.advance(1)
            if schedule.prepare():
                return i
        return n

    def drop_uncommitted(self) -> None:
        """Remove the cells of tokens decoded but not committed (a draft's rejected tokens): within one
        step nothing moved, so they sit at the next position and after it."""
        llama_cpp.llama_memory_seq_rm(self.mem, self.seq_id, self.schedule.next_pos, -1)

    def logits(self, n: int = 1):
        """Logits of the last ``n`` outputs of the latest decode, shape ``(n, n_vocab)`` (a copy)."""
        return self.context.logits(-n, n)

    def last_logits(self):
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

    def shared_prefix(self, tokens: Seq[int]) -> int:
        """How many of ``tokens`` this sequence holds already, at most all but the last (whose logits the
        next decode must give)."""
        common = 0
        for a, b in zip(self.tokens, tokens[:-1]):
            if a != b:
                break
            common += 1
        return common

    def reuse(self, tokens: Seq[int]) -> int:
        """Keep the longest cached prefix of ``tokens`` that can be kept exactly; returns its length."""
        common = self.shared_prefix(tokens)
        if not self.truncate(common):
            self.reset()
            common = 0
        return common

    def adopt(self, tokens: list[int], schedule_state: dict[str, int]) -> None:
        """Take ``tokens`` and the schedule state for cells just restored into this sequence, if they agree
        with the cells (else the sequence is emptied and EngineError raised)."""
        try:
            schedule = type(self.schedule).restore(self.plan.group, self.plan.window, schedule_state)
        except (TypeError, ValueError, AttributeError) as exc:
            self.reset()
            raise EngineError("the saved schedule state is not usable: {exc}", exc=exc) from None
        last = llama_cpp.llama_memory_seq_pos_max(self.mem, self.seq_id)
        if schedule.n_tokens != len(tokens) or last != schedule.next_pos - 1:
            self.reset()
            raise EngineError("the saved state does not match its schedule state")
        self.schedule = schedule
        self.tokens = tokens


def chunk_size(plan: Plan, batch: int, n_batch: int) -> int:
    """Prompt tokens a sequence decodes at a time: ``--batch``, within its schedule's limit, its cells and
    the context's batch."""
    limit = make_schedule(plan.schedule, plan.group, plan.window).max_chunk or batch
    return max(1, min(batch, limit, plan.n_ctx, n_batch))


def check_kshift(model, runtime) -> None:
    """A quantized K cache is self-extended only where its K-shift is safe (:mod:`.kshift`). Called before a
    context is made too: the first check probes in contexts of its own, which would otherwise exist beside
    the new context's whole KV cache and raise the process's peak memory by their compute buffers."""
    verdict = kshift.check(model, runtime)
    if not verdict.safe:
        fix = "; " + kshift.CRASH_FIX if verdict.crash else ""  # a build that would crash: say what to do
        raise ModelError(
            "cannot self-extend with {kv_type} {kv}: {reason}" + fix,
            param="kv_type",
            suggested={"kv_type": "f16"} if verdict.crash else None,
            kv_type=Name("kv_type"),
            kv=runtime.kv_type,
            reason=verdict.reason,
        )
