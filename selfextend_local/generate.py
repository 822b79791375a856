"""Generation in three layers: token steps, a stream of text chunks with timings, and plain text.

Chat, question answering, the server and the evaluations all use :func:`stream_generate`, so stop
handling and speed figures exist once.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .session import Progress, Session
from .settings import SamplingSettings

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


class Sampler:
    """llama.cpp's sampler chain: greedy, or top-k, top-p, temperature and a seeded draw."""

    def __init__(self, settings: SamplingSettings) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        chain = llama_cpp.llama_sampler_chain_init(params)
        if settings.greedy:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if settings.top_k:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(settings.top_k))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(settings.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(settings.temperature))
            seed = LLAMA_DEFAULT_SEED if settings.seed is None else settings.seed & 0xFFFFFFFF
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        self.chain = chain

    def sample(self, session: Session) -> int:
        """Draw the next token from the logits of the session's latest decode."""
        return llama_cpp.llama_sampler_sample(self.chain, session.ctx, -1)

    def sample_at(self, ctx, index: int) -> int:
        """Draw the next token from output ``index`` of the latest decode (a batch of many sequences)."""
        return llama_cpp.llama_sampler_sample(self.chain, ctx, index)

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output with running counts and timings; the last one has finish_reason."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop", "length" or "interrupted"
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        done = self.prompt_tokens - self.reused_tokens
        return done / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


class _StopAutomaton:
    """Knuth-Morris-Pratt over one stop string: ``state`` is the length of the longest prefix of the stop
    that the text seen so far ends with. Each character costs O(1) amortised."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.state = 0

    def step(self, char: str) -> bool:
        """Advance by one character; True when the stop string has just been completed."""
        k = self.state
        if k == len(self.stop):
            k = self.fail[k - 1]
        while k and char != self.stop[k]:
            k = self.fail[k - 1]
        if char == self.stop[k]:
            k += 1
        self.state = k
        return k == len(self.stop)


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts at the first full match.

    Linear in the text: each character advances one automaton per stop string, and the held-back
    text is never longer than the longest stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.automata = [_StopAutomaton(s) for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was met."""
        if not self.automata:
            return text, False
        pending = self.pending + text
        start = len(self.pending)
        for i, char in enumerate(text):
            done = [len(a.stop) for a in self.automata if a.step(char)]
            if done:  # the first stop string completed; of several at once, the one that began first
                self.pending = ""
                return pending[: start + i + 1 - max(done)], True
        hold = max(a.state for a in self.automata)
        self.pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class TextStream:
    """Turns one sequence's sampled tokens into :class:`Chunk` s: UTF-8 pieces, stop strings, counts and
    timings, and the finish reason. Shared by :func:`stream_generate` and the batch scheduler."""

    def __init__(self, model, sampling: SamplingSettings, n_prompt: int, reused: int, prompt_seconds: float) -> None:
        self.model = model
        self.max_tokens = sampling.max_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(sampling.stop)
        self.n_prompt, self.reused, self.prompt_seconds = n_prompt, reused, prompt_seconds
        self.generated = 0
        self.start = time.perf_counter()
        self.finish: str | None = None

    def chunk(self, text: str, token: int | None, reason: str | None = None) -> Chunk:
        seconds = time.perf_counter() - self.start
        return Chunk(text, token, reason, self.n_prompt, self.reused, self.generated, self.prompt_seconds, seconds)

    def push(self, token: int) -> list[Chunk]:
        """The chunks for a sampled token; when they end the reply, :attr:`finish` says why."""
        if self.model.is_eog(token):
            return [self.end("stop")]
        self.generated += 1
        text, stopped = self.stops.feed(self.decoder.decode(self.model.piece(token)))
        chunks = [self.chunk(text, token)]
        if stopped:
            self.finish = "stop"
            chunks.append(self.chunk("", None, "stop"))
        elif self.generated == self.max_tokens:
            chunks.append(self.end("length"))
        return chunks

    def end(self, reason: str) -> Chunk:
        """The last chunk: what was held back, and the finish reason (``interrupted`` when cut short)."""
        self.finish = reason
        return self.chunk(self.stops.flush() + self.decoder.decode(b"", final=True), None, reason)


def stream_generate(
    session: Session,
    prompt_tokens: Sequence[int],
    sampling: SamplingSettings,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_logits: Callable[[np.ndarray], None] | None = None,
) -> Iterator[Chunk]:
    """Ingest the prompt (reusing any cached prefix), then stream the reply as text chunks.

    ``on_logits`` receives the logits each token is sampled from (for evaluations).

    Generated tokens do not move the cache (:meth:`Session.hold`) when the reply fits the trained
    positions: no K-shift is paid per token, and the next prompt that extends this one reuses all of it.
    """
    start = time.perf_counter()
    reused = session.prefill(prompt_tokens, progress, should_stop=should_stop)
    if session.held is None:
        session.hold(sampling.max_tokens)
    stream = TextStream(session.model, sampling, len(prompt_tokens), reused, time.perf_counter() - start)
    sampler = Sampler(sampling)
    try:
        while stream.finish is None:
            if should_stop and should_stop():
                yield stream.end("interrupted")
                return
            if on_logits:
                on_logits(session.last_logits())
            chunks = stream.push(sampler.sample(session))
            yield from chunks
            if stream.finish is None:
                session.decode_token(chunks[-1].token)
    finally:
        sampler.close()


def generate(session: Session, prompt_tokens: Sequence[int], sampling: SamplingSettings, **kwargs) -> tuple[str, Chunk]:
    """The whole reply as one string, with the final chunk (counts, timings, finish reason)."""
    parts: list[str] = []
    last = None
    for last in stream_generate(session, prompt_tokens, sampling, **kwargs):
        parts.append(last.text)
    return "".join(parts), last
