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
costs a share of a step (measured: :class:`StepCosts`, one per model and band of depth), and is kept with a probability
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
RATIO_TRUST = 8.0  # measured spread (in tokens^2) that counts as much as the prior's slope
STEP_FORGET = 0.97  # weight left to older steps at each new one


@dataclass
class StepCosts:
    """What a step that only generates costs, by its tokens, fitted from the steps as they come (older steps
    forgotten): a one-token step's mean time, and a line ``a + b * tokens`` through the steps of several.
    Two models, because a step of several tokens takes another path than a one-token decode (llama.cpp's
    one-token flash attention splits the cache across the threads; a batch goes to the tiled kernels): on
    this project's 2 cores at 10k cells of an f16 cache two tokens cost 1.3-1.6x one and nine 2.8-3.7x with
    patch 0006 (2.1-2.3x and 3.1-3.4x without; scripts/step_cost.py), so a short draft can lose where a long
    one pays, which one line through all the steps cannot say. Until steps of several tokens are measured,
    the line is the prior: each token costs :data:`RATIO_PRIOR` of a one-token step's fixed part. ``fixed``
    replaces it all by ``1 + fixed * tokens`` (0: drafting costs nothing)."""

    fixed: float | None = None
    one: list[float] = field(default_factory=lambda: [0.0, 0.0])  # one-token steps: weights, seconds
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # steps of several: weights, n, n^2, t, n*t

    def took(self, seconds: float, tokens: int) -> None:
        """A step of ``tokens`` tokens, all generating, took ``seconds``."""
        self.one = [s * STEP_FORGET for s in self.one]
        self.sums = [s * STEP_FORGET for s in self.sums]
        if tokens == 1:
            self.one = [self.one[0] + 1, self.one[1] + seconds]
        else:
            w, n, nn, t, nt = self.sums
            self.sums = [w + 1, n + tokens, nn + tokens * tokens, t + seconds, nt + tokens * seconds]

    def cost(self, tokens: int) -> float:
        """A step of ``tokens`` tokens' time, over a one-token step's."""
        if self.fixed is not None:
            return (1 + self.fixed * tokens) / (1 + self.fixed)
        weight, seconds = self.one
        if tokens <= 1 or weight <= 0:
            return 1.0 if tokens <= 1 else (1 + RATIO_PRIOR * tokens) / (1 + RATIO_PRIOR)
        single = seconds / weight
        slope0, level0 = single * RATIO_PRIOR / (1 + RATIO_PRIOR), single / (1 + RATIO_PRIOR)  # the prior line
        w, n, nn, t, nt = self.sums
        if w <= 1e-9:
            return (level0 + slope0 * tokens) / single
        spread = nn - n * n / w
        slope = max((nt - n * t / w) / spread, 0.0) if spread > 1e-9 else slope0
        slope = (spread * slope + RATIO_TRUST * slope0) / (spread + RATIO_TRUST)
        at = n / w  # the line passes through the steps' mean, pulled toward the prior's by one step's weight
        mean = (t + level0 + slope0 * at) / (w + 1)
        return max(mean + slope * (tokens - at), 1e-9) / single

    def worth(self, kept: float, most: int, step: int) -> int:
        """How many tokens to draft, at most ``most``, into a step of ``step`` tokens so far, when each
        drafted token is kept with probability ``kept`` after the one before it was: the length that makes
        the step's tokens a second the most, ``(step + kept + kept^2 + ...) / cost(step + length)``
        (beside other slots' tokens a draft slows them all: it pays less)."""
        best, best_rate, expected, gain = 0, step / self.cost(step), float(step), 1.0
        for length in range(1, most + 1):
            gain *= kept
            expected += gain
            rate = expected / self.cost(step + length)
            if rate > best_rate:
                best, best_rate = length, rate
        return best

    def at(self, depth: int) -> StepCosts:
        """These costs, whatever the depth (a caller that measures one depth)."""
        return self


@dataclass
class CostsByDepth:
    """A :class:`StepCosts` for each band of depth (the cells before a step, by powers of two): what a
    drafted token costs moves with the depth, for attention's share of a step grows with it and a step of
    several tokens takes another kernel than a one-token step. On 2 cores, f16 cache: nine tokens cost about
    4x one after 300 cells and 2.8-3.7x after 10,000 (scripts/step_cost.py); one set of costs for both drafted
    in free writing near the start what only a quote deep in a document pays for (bench_drafts: 0.87x). ``fixed`` as
    :class:`StepCosts`' for every band."""

    fixed: float | None = None
    bands: dict[int, StepCosts] = field(default_factory=dict)

    def at(self, depth: int) -> StepCosts:
        costs = self.bands.setdefault(max(depth, 1).bit_length(), StepCosts())
        costs.fixed = self.fixed
        return costs

    def took(self, seconds: float, tokens: int, depth: int) -> None:
        self.at(depth).took(seconds, tokens)


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def costs_for(model) -> CostsByDepth:
    """The model's :class:`CostsByDepth`, shared by all its contexts (made on first use)."""
    if model not in _COSTS:
        _COSTS[model] = CostsByDepth()
    return _COSTS[model]


class Drafter:
    """The drafts of one request, of at most ``most`` tokens, from ``tokens`` (its prompt) and the tokens
    it generates (:meth:`add`)."""

    def __init__(self, tokens: Sequence[int], most: int, costs: StepCosts | CostsByDepth) -> None:
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
        costs = self.costs.at(len(self.tokens))  # the cells before this step, about
        length = costs.worth(kept / (kept + rejected), min(limit, len(follow)), step)
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
