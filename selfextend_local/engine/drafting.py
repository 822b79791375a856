"""Drafts from the request's own text (prompt-lookup decoding), a layer beside the slot loop.

An answer about a document often quotes it: a name, a clause, a table row. A :class:`Drafter` belongs to
one generating request and indexes its tokens (the prompt, a long document included, then the reply as it
grows) by their n-grams of :data:`NGRAMS` tokens, each at the latest place it occurred. Before each step the
slot asks it for a draft (:meth:`Drafter.propose`): the tokens that followed the longest n-gram the sequence
now ends with, at that n-gram's latest earlier place. The slot decodes them after its next token in the
step's one ``llama_decode``, then samples the rows in turn with the request's own sampler and keeps a
drafted token only where the token sampled before it equals it (:mod:`.slots`); the cells of the rest are
removed. Every token of the reply is so the sampler's own pick from the model's distribution after the
tokens before it: the reply is the one a token at a time gives (the same draws of the same seeded sampler
at temperature > 0; greedy, the same tokens up to the kernels' rounding, which differs a little between a
decode of one token and of several, as between one sequence and several in a step).

This is llama.cpp's ``--spec-type ngram-simple`` and llama-cpp-python's ``LlamaPromptLookupDecoding``, with
the n-gram found by a dict lookup instead of a scan of the whole history each step: indexing a prompt is
linear (one dict, filled in C loops), a step costs a lookup per n-gram size.

How many tokens to draft is what makes the most tokens a second (:meth:`StepCosts.worth`): a drafted token
costs a share of a step (measured: :class:`StepCosts`, one per model), and is kept with a probability
learned from this request's own drafts, by the length of the n-gram they came from. A match that is not
drafted is still scored against the tokens that come, so the estimate follows the reply (free writing, then
a quote). No match, no draft: writing with nothing to copy decodes one token a step, as without drafts.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

NGRAMS = (4, 3, 2)  # n-gram sizes looked up, longest first: a single token matches almost anywhere
PRIOR = {4: (2.0, 1.0), 3: (1.5, 1.0), 2: (1.0, 1.0)}  # kept and rejected drafted tokens assumed at first
FORGET = 0.9  # weight left to the older outcomes at each new one
RATIO_PRIOR = 0.25  # a drafted token's cost, as a share of a one-token step, until steps have been measured
RATIO_TRUST = 8.0  # measured spread (in tokens^2) that counts as much as the prior ratio
STEP_FORGET = 0.97  # weight left to older steps at each new one


@dataclass
class StepCosts:
    """The time of a step that only generates, as ``a + b * tokens``, fitted from the steps as they come
    (least squares with older steps forgotten): a drafted token costs ``b / a`` of a step's fixed part.
    Large where a decode is bound by arithmetic (a CPU with a small model: llama-batched-bench on this
    project's 2 cores made 1.31x the tokens a second with 4 sequences as with 1, METHOD.md section 6),
    small where it waits on memory (a large model, a GPU). ``fixed`` replaces the measured ratio (0:
    drafting costs nothing)."""

    fixed: float | None = None
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # weights, n, n^2, t, n*t

    def took(self, seconds: float, tokens: int) -> None:
        """A step of ``tokens`` tokens, all generating, took ``seconds``."""
        w, n, nn, t, nt = (s * STEP_FORGET for s in self.sums)
        self.sums = [w + 1, n + tokens, nn + tokens * tokens, t + seconds, nt + tokens * seconds]

    @property
    def ratio(self) -> float:
        """The cost of one token more in a step, over that of a step's fixed part (``b / a``)."""
        if self.fixed is not None:
            return self.fixed
        w, n, nn, t, nt = self.sums
        if w == 0:
            return RATIO_PRIOR
        spread = nn - n * n / w
        if spread <= 1e-9:
            return RATIO_PRIOR
        b = (nt - n * t / w) / spread
        a = (t - b * n) / w
        measured = min(max(b / a, 0.0), 10.0) if a > 0 else 10.0
        return (spread * measured + RATIO_TRUST * RATIO_PRIOR) / (spread + RATIO_TRUST)

    def worth(self, kept: float, most: int, step: int) -> int:
        """How many tokens to draft, at most ``most``, into a step of ``step`` tokens so far, when each
        drafted token is kept with probability ``kept`` after the one before it was: the length that makes
        the step's tokens a second the most, ``(step + kept + kept^2 + ...) / (1 + ratio * (step + length))``
        (beside other slots' tokens a draft slows them all: it pays less)."""
        ratio = self.ratio
        best, best_rate, expected, gain = 0, step / (1 + ratio * step), float(step), 1.0
        for length in range(1, most + 1):
            gain *= kept
            expected += gain
            rate = expected / (1 + ratio * (step + length))
            if rate > best_rate:
                best, best_rate = length, rate
        return best


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def costs_for(model) -> StepCosts:
    """The model's :class:`StepCosts`, shared by all its contexts (made on first use)."""
    if model not in _COSTS:
        _COSTS[model] = StepCosts()
    return _COSTS[model]


class Drafter:
    """The drafts of one request, of at most ``most`` tokens, from ``tokens`` (its prompt) and the tokens
    it generates (:meth:`add`)."""

    def __init__(self, tokens: Sequence[int], most: int, costs: StepCosts) -> None:
        self.tokens = list(tokens)
        self.most = most
        self.costs = costs
        self.after: dict[tuple[int, ...], int] = {}  # an n-gram -> where the token after its latest place is
        length = len(self.tokens)
        for n in NGRAMS:  # later places overwrite earlier ones
            grams = zip(*(self.tokens[j : length - n + j] for j in range(n)))
            self.after.update(zip(grams, range(n, length)))
        self.outcomes = {n: list(PRIOR[n]) for n in NGRAMS}  # kept and rejected drafted tokens, by n
        self.drafting: int | None = None  # the n of the draft being verified
        self.watched: tuple[int, list[int], int] | None = None  # a match not drafted: n, tokens, how far seen

    def add(self, token: int) -> None:
        """A token of the reply: index the n-grams it ends, score the match being watched."""
        tokens = self.tokens
        tokens.append(token)
        last = len(tokens) - 1
        for n in NGRAMS:
            if last >= n:
                self.after[tuple(tokens[last - n : last])] = last
        if self.watched is not None:
            n, expected, seen = self.watched
            if token != expected[seen]:
                self._outcome(n, seen, 1)
                self.watched = None
            elif seen + 1 == len(expected):
                self._outcome(n, seen + 1, 0)
                self.watched = None
            else:
                self.watched = (n, expected, seen + 1)

    def propose(self, limit: int, step: int) -> list[int]:
        """The draft to decode after the last token added, at most ``limit`` tokens, in a step of ``step``
        tokens so far: empty when nothing matches or drafting would not pay."""
        found = self._lookup()
        if found is None or limit <= 0:
            return []
        n, follow = found
        kept, rejected = self.outcomes[n]
        length = self.costs.worth(kept / (kept + rejected), min(limit, len(follow)), step)
        if length == 0:
            if self.watched is None:
                self.watched = (n, follow, 0)
            return []
        self.drafting = n
        self.watched = None  # the draft itself scores this match
        return follow[:length]

    def verified(self, drafted: int, kept: int) -> None:
        """``kept`` of the ``drafted`` tokens proposed last were kept."""
        if self.drafting is not None:
            self._outcome(self.drafting, kept, int(kept < drafted))
            self.drafting = None

    def _lookup(self) -> tuple[int, list[int]] | None:
        tokens = self.tokens
        for n in NGRAMS:
            if len(tokens) > n:
                at = self.after.get(tuple(tokens[-n:]))
                if at is not None:
                    return n, tokens[at : at + self.most]
        return None

    def _outcome(self, n: int, kept: int, rejected: int) -> None:
        counts = self.outcomes[n]
        counts[0] = counts[0] * FORGET + kept
        counts[1] = counts[1] * FORGET + rejected
