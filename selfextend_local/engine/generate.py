"""Generation in layers: a request served by a slot (:mod:`.slots`), a stream of text chunks with timings,
and plain text. Chat, question answering, summaries and the evaluations use :func:`stream_generate`; the
server and batched runs put the same requests into a many-slot engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .checkpoint import Checkpoints
from .sampling import Chunk
from .session import Session, run
from .settings import SamplingSettings
from .slots import Progress, Request


def stream_generate(
    session: Session,
    prompt_tokens: Sequence[int],
    sampling: SamplingSettings,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_logits: Callable[[np.ndarray], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> Iterator[Chunk]:
    """Ingest the prompt (reusing any cached prefix), then stream the reply as text chunks.

    ``on_logits`` receives the logits each token is sampled from (for evaluations). Generated tokens do
    not move the cache when the reply fits the trained positions (:meth:`Session.hold`): no K-shift is
    paid per token, and the next prompt that extends this one reuses all of it. ``checkpoints``: the
    prompt's reading is checkpointed and resumed (:mod:`.checkpoint`).
    """
    request = Request(list(prompt_tokens), sampling, progress=progress, on_logits=on_logits, checkpoints=checkpoints)
    yield from run(session, request, should_stop)


def generate(session: Session, prompt_tokens: Sequence[int], sampling: SamplingSettings, **kwargs) -> tuple[str, Chunk]:
    """The whole reply as one string, with the final chunk (counts, timings, finish reason)."""
    parts: list[str] = []
    last = None
    for last in stream_generate(session, prompt_tokens, sampling, **kwargs):
        parts.append(last.text)
    return "".join(parts), last
