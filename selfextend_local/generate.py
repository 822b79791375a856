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

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def generate_step(
    session: Session, sampler: Sampler, max_tokens: int, should_stop: Callable[[], bool] | None = None
) -> Iterator[int]:
    """Yield sampled tokens, decoding each (so the schedule keeps going) before drawing the next.

    Stops after an end-of-generation token, ``max_tokens`` tokens, or when ``should_stop()`` is true.
    """
    for i in range(max_tokens):
        if should_stop and should_stop():
            return
        token = sampler.sample(session)
        yield token
        if session.model.is_eog(token) or i + 1 == max_tokens:
            return
        session.decode_token(token)


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


def stream_generate(
    session: Session,
    prompt_tokens: Sequence[int],
    sampling: SamplingSettings,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Chunk]:
    """Ingest the prompt (reusing any cached prefix), then stream the reply as text chunks."""
    start = time.perf_counter()
    reused = session.prefill(prompt_tokens, progress, should_stop=should_stop)
    prompt_seconds = time.perf_counter() - start
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopMatcher(sampling.stop)
    sampler = Sampler(sampling)
    n = 0
    finish = "interrupted"
    gen_start = time.perf_counter()

    def chunk(text: str, token: int | None, reason: str | None = None) -> Chunk:
        return Chunk(
            text, token, reason, len(prompt_tokens), reused, n, prompt_seconds, time.perf_counter() - gen_start
        )

    try:
        for token in generate_step(session, sampler, sampling.max_tokens, should_stop):
            if session.model.is_eog(token):
                finish = "stop"
                break
            n += 1
            text, stopped = stops.feed(decoder.decode(session.model.piece(token)))
            yield chunk(text, token)
            if stopped:
                yield chunk("", None, "stop")
                return
            if n == sampling.max_tokens:
                finish = "length"
        yield chunk(stops.flush() + decoder.decode(b"", final=True), None, finish)
    finally:
        sampler.close()


def generate(session: Session, prompt_tokens: Sequence[int], sampling: SamplingSettings, **kwargs) -> tuple[str, Chunk]:
    """The whole reply as one string, with the final chunk (counts, timings, finish reason)."""
    parts: list[str] = []
    last = None
    for last in stream_generate(session, prompt_tokens, sampling, **kwargs):
        parts.append(last.text)
    return "".join(parts), last
