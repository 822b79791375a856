"""Turning logits into text: llama.cpp's sampler chain, stop strings, and the chunks a reply streams as."""

from __future__ import annotations

import codecs
import ctypes
import math
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import llama_log
from .errors import BadInputError
from .grammar import GrammarDeadEnd, check_gbnf, check_reply
from .settings import SamplingSettings

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


class Sampler:
    """llama.cpp's sampler chain: greedy, or top-k, top-p, min-p, temperature and a seeded draw; and, for
    structured output, a grammar. One per request, so each sequence of a batch samples (and parses) alone.

    The grammar is applied as llama.cpp's own common sampler applies it: the chain picks a token first, and
    only when the grammar rejects that token is the pick made again among the tokens it allows (checking
    every token of a 49k vocabulary at every step made generation 30 times slower). That second pick looks
    at the likeliest candidates first (:meth:`Candidates.pick_allowed`): the whole vocabulary cost 6-14 ms
    a rejected token, on the engine's thread, so every other sequence of the batch waited for it."""

    def __init__(self, settings: SamplingSettings, model=None) -> None:
        self.chain = self.grammar = None
        self.model = model
        self._candidates: Candidates | None = None
        self._rows: dict[int, np.ndarray] = {}  # logits rows as arrays, by address (see _row)
        self.settings = settings
        self.accepted = 0
        # a plain argmax of the logits is the greedy chain's pick only without penalties
        self.argmax = settings.greedy and not settings.penalised and model is not None
        try:
            self.grammar = grammar_sampler(model.vocab, settings.grammar) if settings.grammar is not None else None
            self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            self._build(settings)
        except BaseException:  # nothing of a sampler that failed half-way is left allocated
            self.close()
            raise

    def _build(self, settings: SamplingSettings) -> None:
        if settings.penalised:  # first, as llama.cpp's common sampler puts them: over the raw logits
            last_n = settings.max_tokens if settings.repeat_last_n < 0 else settings.repeat_last_n
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    self.model.n_vocab,
                    min(last_n, settings.max_tokens),  # the reply's tokens are all it remembers
                    settings.repeat_penalty,
                    settings.frequency_penalty,
                    settings.presence_penalty,
                )
            )
        if settings.greedy:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if settings.top_k:
            self._add(llama_cpp.llama_sampler_init_top_k(settings.top_k))
        self._add(llama_cpp.llama_sampler_init_top_p(settings.top_p, 1))
        if settings.min_p:
            self._add(llama_cpp.llama_sampler_init_min_p(settings.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(settings.temperature))
        seed = LLAMA_DEFAULT_SEED if settings.seed is None else settings.seed & 0xFFFFFFFF
        self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler) -> None:
        llama_cpp.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, ctx, index: int = -1) -> int:
        """Draw the next token from the logits of batch index ``index`` of the latest decode (-1: the last).
        Raises GrammarDeadEnd when the grammar allows no token: accepting one it rejects would abort llama.cpp."""
        if self.grammar is not None:
            return self._sample_in_grammar(llama_cpp.llama_get_logits_ith(ctx, index))
        if self.argmax:
            return self._argmax(llama_cpp.llama_get_logits_ith(ctx, index))
        return llama_cpp.llama_sampler_sample(self.chain, ctx, index)

    def _argmax(self, logits) -> int:
        """The greedy chain's pick (the first of equal maxima, as llama.cpp's greedy sampler's) without copying
        the vocabulary into candidates as llama_sampler_sample does."""
        return int(self._row(logits).argmax())

    def _row(self, logits) -> np.ndarray:
        """The logits row at ``logits`` as an array, made once for each address llama.cpp gives (the same
        from one token to the next): np.ctypeslib.as_array builds a ctypes array type on every call, 30-40
        us of each generated token on the engine's thread."""
        address = ctypes.addressof(logits.contents)
        row = self._rows.get(address)
        if row is None:
            if len(self._rows) >= 64:  # llama.cpp moved its outputs many times: forget the old rows
                self._rows.clear()
            row = self._rows[address] = np.ctypeslib.as_array(logits, shape=(self.model.n_vocab,))
        return row

    def _sample_in_grammar(self, logits) -> int:
        if self._candidates is None:
            self._candidates = Candidates(self.model.n_vocab)
            self._candidates.first_bytes = first_bytes(self.model)
        token = self._argmax(logits) if self.argmax else self._candidates.pick(self.chain, logits)
        if not self._candidates.allowed(self.grammar, token):
            token = self._candidates.pick_allowed(self.chain, self.grammar, logits, self.settings)
            if token is None or not self._candidates.allowed(self.grammar, token):
                raise GrammarDeadEnd(
                    "the grammar allows no token after {n} tokens of reply: no text satisfies it from there "
                    "(check its patterns and bounds)",
                    param="grammar",
                    n=self.accepted,
                )
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        self.accepted += 1
        return token

    def close(self) -> None:
        for name in ("chain", "grammar"):
            sampler = getattr(self, name, None)
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
                setattr(self, name, None)


class Candidates:
    """A reusable candidate array over the whole vocabulary, for sampling by hand (with a grammar)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.view = np.frombuffer(self.data, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.one = (llama_cpp.llama_token_data * 1)()
        self.part_data = (llama_cpp.llama_token_data * n_vocab)()
        self.part = np.frombuffer(self.part_data, dtype=self.view.dtype)
        self.first_bytes: FirstBytes | None = None

    @staticmethod
    def _array(data, size: int):
        pointer = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_token_data))
        return llama_cpp.llama_token_data_array(pointer, size, -1, False)

    def pick(self, chain, logits, first=None) -> int | None:
        """The chain's choice from ``logits`` (a C float pointer), after ``first`` (the grammar) if given;
        None when ``first`` leaves no candidate."""
        view = self.view
        view["id"] = self.ids
        view["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        view["p"] = 0.0
        array = self._array(self.data, self.n_vocab)
        if first is not None:
            llama_cpp.llama_sampler_apply(first, ctypes.byref(array))
            if not np.isfinite(view["logit"][: array.size]).any():
                return None
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def allowed(self, grammar, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (it sets a rejected token's logit to -inf)."""
        self.one[0].id, self.one[0].logit, self.one[0].p = token, 1.0, 0.0
        array = self._array(self.one, 1)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return self.one[0].logit != float("-inf")

    def pick_allowed(self, chain, grammar, logits, settings: SamplingSettings) -> int | None:
        """The chain's choice among the tokens ``grammar`` allows, as :meth:`pick` with ``first=grammar``
        makes it, at a fraction of the cost. Only tokens whose first byte the grammar can take now are
        looked at (:class:`FirstBytes`), the likeliest first: those of them it allows settle the choice when
        greedy (the likeliest allowed token), when they hold ``top_k`` allowed tokens (the chain keeps no
        others), or when every token left unchecked has under 1e-6 of the probability of the best allowed
        one; else all of them are checked. None when the grammar allows nothing."""
        values = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        pool = self.first_bytes.possible(self, grammar)
        for size in SCAN:
            if size >= pool.size:
                break
            top = pool[np.argpartition(values[pool], -size)[-size:]]
            top = top[np.argsort(-values[top], kind="stable")]
            allowed = self._allowed_among(grammar, top, values)
            if allowed.size and _settled(allowed, top, values, settings, pool.size):
                return self._choose(chain, allowed, values)
        allowed = self._allowed_among(grammar, pool, values)
        return self._choose(chain, allowed, values) if allowed.size else None

    def _allowed_among(self, grammar, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Those of ``ids`` the grammar accepts next, in the order given (one grammar pass over them)."""
        part = self.part[: len(ids)]
        part["id"], part["logit"], part["p"] = ids, values[ids], 0.0
        array = self._array(self.part_data, len(ids))
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return ids[np.isfinite(part["logit"])]

    def _choose(self, chain, ids: np.ndarray, values: np.ndarray) -> int:
        part = self.part[: len(ids)]
        part["id"], part["logit"], part["p"] = ids, values[ids], 0.0
        array = self._array(self.part_data, len(ids))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        return int(array.data[array.selected].id)


class FirstBytes:
    """The vocabulary by the first byte of each token's text, and a one-byte token for each byte value:
    asking the grammar about those (256 tokens at most) tells which first bytes it can take now, and so
    which tokens can be allowed at all (a token the grammar accepts begins with a byte it accepts). Tokens
    with no text (end of generation, control tokens) or whose first byte has no one-byte token are always
    candidates. Made once a vocabulary."""

    def __init__(self, model) -> None:
        n_vocab = model.n_vocab
        firsts = np.full(n_vocab, -1, dtype=np.int16)
        probes: dict[int, int] = {}
        for token in range(n_vocab):
            piece = model.piece(token)
            if piece:
                firsts[token] = piece[0]
                if len(piece) == 1:
                    probes.setdefault(piece[0], token)
        self.firsts = firsts
        self.probe_bytes = np.array(sorted(probes), dtype=np.int16)
        self.probe_tokens = np.array([probes[b] for b in sorted(probes)], dtype=np.int32)
        self.always = (firsts < 0) | ~np.isin(firsts, self.probe_bytes)
        self.level = np.zeros(n_vocab, dtype=np.float32)  # logits to probe with: only their finiteness counts

    def possible(self, candidates: Candidates, grammar) -> np.ndarray:
        """The tokens whose first byte the grammar can take next (and those always candidates)."""
        taken = np.isin(self.probe_tokens, candidates._allowed_among(grammar, self.probe_tokens, self.level))
        return np.flatnonzero(self.always | np.isin(self.firsts, self.probe_bytes[taken])).astype(np.int32)


_FIRST_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def first_bytes(model) -> FirstBytes:
    """The model's :class:`FirstBytes`, made on first use."""
    if model not in _FIRST_BYTES:
        _FIRST_BYTES[model] = FirstBytes(model)
    return _FIRST_BYTES[model]


SCAN = (256, 4096)  # candidates checked against a grammar, likeliest first, before all that may be allowed
_NEGLIGIBLE = math.log(1e-6)


def _settled(allowed: np.ndarray, top: np.ndarray, values: np.ndarray, settings: SamplingSettings, n_vocab: int):
    """Whether the allowed tokens among the likeliest ``top`` are all the chain could pick from (never with
    penalties: they move tokens of the reply down, or up, from where the raw logits put them)."""
    if settings.penalised:
        return False
    if settings.greedy or (settings.top_k and allowed.size >= settings.top_k):
        return True
    gap = float(values[top[-1]] - values[allowed[0]]) / settings.temperature  # every other token is below
    return math.log(n_vocab - top.size) + gap < _NEGLIGIBLE


def grammar_sampler(vocab, grammar: str):
    """llama.cpp's grammar sampler for GBNF text (root rule ``root``); a one-line error if it does not parse.

    The text is bounded first (:func:`.grammar.check_gbnf`: llama.cpp's parser recurses once per nesting
    level), and llama.cpp's parse runs with its stderr captured: on an error it prints the whole grammar."""
    check_gbnf(grammar)
    llama_log.clear_errors()
    with llama_log.captured_stderr() as said:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        found = re.search(r"error parsing grammar: ([^\n]{0,200})", said.text)
        detail = found.group(1) if found else llama_log.last_error() or "no detail"
        raise BadInputError("the grammar does not parse: {detail}", param="grammar", detail=detail)
    return sampler


def check_grammar(vocab, grammar: str) -> None:
    """Raise BadInputError now, rather than when a request starts, if ``grammar`` does not parse."""
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, grammar))


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
    drafted: int = 0  # tokens drafted from the request's own text so far (:mod:`.drafting`)
    accepted: int = 0  # of them, those kept

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
    timings, and the finish reason (one per busy slot, :mod:`.slots`)."""

    def __init__(self, model, sampling: SamplingSettings, n_prompt: int, reused: int, prompt_seconds: float) -> None:
        self.model = model
        self.max_tokens = sampling.max_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(sampling.stop)
        self.n_prompt, self.reused, self.prompt_seconds = n_prompt, reused, prompt_seconds
        self.generated = 0
        self.drafted = self.accepted = 0  # counted by the slot that drafts (:mod:`.drafting`)
        self.start = time.perf_counter()
        self.finish: str | None = None
        self.schema = sampling.schema
        self.text: list[str] | None = [] if self.schema is not None else None  # the reply, to check at the end

    def chunk(self, text: str, token: int | None, reason: str | None = None) -> Chunk:
        seconds = time.perf_counter() - self.start
        if self.text is not None:
            self.text.append(text)
        return Chunk(
            text,
            token,
            reason,
            self.n_prompt,
            self.reused,
            self.generated,
            self.prompt_seconds,
            seconds,
            self.drafted,
            self.accepted,
        )

    def push(self, token: int) -> list[Chunk]:
        """The chunks for a sampled token; when they end the reply, :attr:`finish` says why. A reply held to
        a schema that stops without matching it raises ReplyError (see :func:`.grammar.check_reply`)."""
        if self.model.is_eog(token):
            return [self.end("stop")]
        self.generated += 1
        text, stopped = self.stops.feed(self.decoder.decode(self.model.piece(token)))
        chunks = [self.chunk(text, token)]
        if stopped:
            self.finish = "stop"
            chunks.append(self.chunk("", None, "stop"))
            self._check()
        elif self.generated == self.max_tokens:
            chunks.append(self.end("length"))
        return chunks

    def end(self, reason: str) -> Chunk:
        """The last chunk: what was held back, and the finish reason (``interrupted`` when cut short)."""
        self.finish = reason
        last = self.chunk(self.stops.flush() + self.decoder.decode(b"", final=True), None, reason)
        if reason == "stop":
            self._check()
        return last

    def _check(self) -> None:
        if self.text is not None:
            check_reply("".join(self.text), self.schema)
