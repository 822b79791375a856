"""The common case: a context of its own holding one sequence, served by a one-slot scheduler.

Everything a :class:`Session` decodes is a request to :mod:`.scheduler` (one busy slot), as every batched
request is: :func:`run` serves a request and yields its chunks; ``ingest`` and ``prefill`` read tokens into
the session without generating.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

from .checkpoint import Checkpoints
from .context import Context, RopeOverride
from .errors import ModelError
from .model import Model
from .planning import Plan, plan_for
from .sampling import Chunk
from .scheduler import Scheduler
from .sequence import Sequence, check_kshift, chunk_size
from .settings import ExtendSettings, RuntimeSettings
from .slots import LogitsSink, Progress, Request


class Session(Sequence):
    """A context of its own holding one sequence (sequence 0)."""

    def __init__(
        self, model: Model, plan: Plan, runtime: RuntimeSettings | None = None, rope: RopeOverride | None = None
    ) -> None:
        runtime = runtime or RuntimeSettings()
        if plan.extended and (reason := model.info.extendable_reason):
            raise ModelError("cannot self-extend {name}: {reason}", name=model.path.name, reason=reason)
        if plan.extended:
            check_kshift(model, runtime)  # its first probe comes and goes before this context's cache exists
        batch = chunk_size(plan, runtime.batch, runtime.batch)
        context = Context(model, plan.n_ctx, runtime, 1, rope, batch=batch)
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

    def ingest(
        self,
        tokens: Seq[int],
        progress: Progress | None = None,
        on_logits: LogitsSink | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        """Append ``tokens`` in chunks. ``progress(done, total)`` after each chunk; with ``on_logits``,
        every token's logits as ``on_logits(offset, rows)`` (``offset`` indexes ``tokens``); ``should_stop``
        is polled between chunks (raises Interrupted); ``checkpoints`` of the whole reading (the session's
        tokens and ``tokens``) resume it and keep it (:mod:`.checkpoint`)."""
        if not tokens:
            return
        base = len(self.tokens)
        shifted = (lambda done, total: progress(done - base, total - base)) if progress else None
        request = Request(list(self.tokens) + list(tokens), generate=False, prompt_logits=on_logits, progress=shifted)
        request.checkpoints = checkpoints
        for _ in run(self, request, should_stop):
            pass

    def prefill(
        self, tokens: Seq[int], progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
    ) -> int:
        """Make the sequence equal ``tokens``, reusing the longest cached prefix; returns tokens reused."""
        request = Request(list(tokens), generate=False, progress=progress)
        for _ in run(self, request, should_stop):
            pass
        return request.reused


def run(session: Session, request: Request, should_stop: Callable[[], bool] | None = None) -> Iterator[Chunk]:
    """Serve ``request`` in the session (its one slot) and yield its chunks; errors are raised, and a stop
    while the prompt is read raises Interrupted."""
    request.plan = session.plan
    with Scheduler.over(session) as scheduler:
        yield from scheduler.stream(request, should_stop)


def open_session(
    model: Model,
    n_tokens: int,
    extend: ExtendSettings | None = None,
    runtime: RuntimeSettings | None = None,
    rope: RopeOverride | None = None,
    generate: int = 0,
) -> Session:
    """A session sized and planned for ``n_tokens`` (the prompt plus the ``generate`` tokens to generate)."""
    runtime = runtime or RuntimeSettings()
    chosen = plan_for(model, n_tokens, extend or ExtendSettings(), runtime, generate)
    return Session(model, chosen, runtime, rope)
