"""Time left in a reading, from a cost model of the reading itself.

Every prompt token attends to every cell before it, so a token at position ``p`` costs about ``a + b * p``
seconds: ``a`` for the weights, ``b * p`` for attention. Reading from ``d0`` to ``d1`` then takes
``a * (d1 - d0) + b / 2 * (d1**2 - d0**2)``, and the rest of a reading takes longer per token than what
has been read so far: the average rate (tokens so far over seconds so far) says at 50% of a long reading
about a third of the time it really has left. :class:`Clock` fits ``a`` and ``b`` to the times at which
the reading reached each point (least squares over the steps between them, neither term below zero),
and starts afresh when a reading resumes from a checkpoint (its first point is where it resumed).

It says nothing until the steps can back a number: two steps fit the two terms exactly, whatever their
noise, and early in a long reading a noisy slope, carried to the end, can say several times the truth
(the 100k read's marks, replayed: +288% after two steps). So before :data:`SETTLED` of the reading
there is no estimate before :data:`CHECKED_STEPS` steps, nor while the fit's own standard error of the time
left is above :data:`TRUSTED` of it. From there on two steps are enough: a reading that short (a few
chunks) has little left for a wrong slope to multiply, and it should still say something midway.

With a ``prior`` (the ratio ``b / a`` that earlier readings of the same setup ended with, kept by
:mod:`.paces`) the clock takes the ratio from it, moved toward the reading's own as the reading goes (by
the square of the share read), and the pace ``a`` from all the time so far. The ratio is what a reading's
first quarter gets wrong (a stretch of slow chunks steepens it: +25.6% at 25% of a 32k reading whose
whole-reading fit is within 0.4% there); the pace, an average over everything read, is what moves with
the machine. Replayed on the marks of the readings stored in docs/, each primed by the ratio of another
reading of the same setup, the worst error at 25% of a reading fell from 26.1% to 11.1% (a 12k reading; 10.1%
for 32k and longer). ``scripts/bench_checkpoints.py`` prints the primed estimate beside the shown one.

One clock a reading, fed the ``(done, total)`` of its progress callback; the CLI's bar and log lines,
the page's reading events and the API's ``prompt_progress`` all ask it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MIN_STEPS = 2  # steps of the reading before any estimate: one says nothing of the slope
CHECKED_STEPS = 3  # steps before an early estimate: two fit both terms with nothing to check them
TRUSTED = 0.2  # the largest standard error of an early time left, as a share of it, that is still shown
SETTLED = 0.25  # the share of a reading from which the fit is shown without those checks


class Clock:
    """The times a reading reached each point, and the time it has left by the fitted cost model."""

    def __init__(self, now: Callable[[], float] = time.perf_counter, prior: float | None = None) -> None:
        self.now = now
        self.prior = prior  # attention's term over the weights' (b / a) from earlier readings, if known
        self.points: list[tuple[int, float]] = []  # (tokens done, seconds since the first point)
        self._start: float | None = None
        self._fit: Fit | None = None

    def __call__(self, done: int, total: int) -> None:
        """Record that the reading has ``done`` of ``total`` tokens now (a progress callback)."""
        self.mark(done, self.now())

    def mark(self, done: int, at: float) -> None:
        if self._start is None:
            self._start = at
        if self.points and done <= self.points[-1][0]:
            return  # nothing read since (a repeated call): no step to learn from
        self.points.append((done, at - self._start))
        self._fit = None

    @property
    def elapsed(self) -> float:
        return self.points[-1][1] if self.points else 0.0

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, b)``: seconds a token, and seconds a token per cell before it; None before
        :data:`MIN_STEPS` steps."""
        fit = self._fitted()
        return None if fit is None else (fit.a, fit.b)

    def ratio(self) -> float | None:
        """``b / a``, the reading's own ratio of its two terms (what :mod:`.paces` keeps); None while either
        term is not above zero."""
        fit = self._fitted()
        return fit.b / fit.a if fit is not None and fit.a > 0 and fit.b > 0 else None

    def _fitted(self) -> Fit | None:
        if len(self.points) <= MIN_STEPS:
            return None
        if self._fit is None:
            self._fit = _fit(self.points)
        return self._fit

    def seconds_left(self, done: int, total: int) -> float | None:
        """Seconds until ``total`` tokens have been read, from ``done``; None while it cannot tell."""
        if done >= total:
            return 0.0
        fit = self._fitted()
        if fit is None:
            return None
        terms = np.array([total - done, (total * total - done * done) / 2], dtype=np.float64)
        if self.prior is not None:
            return max(0.0, float(terms @ self._paced(self._ratio(done / total))))
        left = max(0.0, float(terms @ (fit.a, fit.b)))
        if done >= SETTLED * total:
            return left
        if len(self.points) <= CHECKED_STEPS:
            return None
        error = float(np.sqrt(max(terms @ fit.covariance @ terms, 0.0)))
        return left if error <= TRUSTED * left else None

    def _ratio(self, share: float) -> float:
        """The prior's ratio moved toward the reading's own by the square of the share read (geometrically:
        ratios are scales), the prior's alone while the reading's fit lacks either term."""
        own = self.ratio()
        if own is None:
            return self.prior
        weight = share * share
        return float(np.exp((1 - weight) * np.log(self.prior) + weight * np.log(own)))

    def _paced(self, ratio: float) -> tuple[float, float]:
        """``(a, b)`` with ``b = ratio * a`` and ``a`` the pace of everything read so far."""
        (first, _), (last, seconds) = self.points[0], self.points[-1]
        work = (last - first) + ratio * (last * last - first * first) / 2
        a = seconds / work if work > 0 else 0.0
        return a, ratio * a

    def rate(self) -> float:
        """Tokens a second so far (what the reading has shown, not what is left)."""
        if len(self.points) < 2 or self.elapsed <= 0:
            return 0.0
        return (self.points[-1][0] - self.points[0][0]) / self.elapsed


@dataclass(frozen=True)
class Fit:
    """The cost model's two terms and their covariance (from the steps' residuals)."""

    a: float
    b: float
    covariance: np.ndarray


def _fit(points: list[tuple[int, float]]) -> Fit:
    """Least squares of each step's seconds on its tokens and its tokens' summed positions; a term that
    comes out below zero (noise, or a reading too short to show the slope) is dropped and the other refit."""
    done = np.array([p[0] for p in points], dtype=np.float64)
    seconds = np.array([p[1] for p in points], dtype=np.float64)
    tokens = np.diff(done)
    span = np.diff(done * done) / 2  # sum of the positions of a step's tokens, in the continuous limit
    took = np.diff(seconds)
    design = np.stack([tokens, span], axis=1)
    try:
        (a, b), *_ = np.linalg.lstsq(design, took, rcond=None)
    except np.linalg.LinAlgError:
        a, b = -1.0, -1.0
    if a >= 0 and b >= 0:
        free = [0, 1]
    elif b > 0 and a < 0:  # attention alone
        a, b, free = 0.0, max(0.0, (took @ span) / max(span @ span, 1e-30)), [1]
    else:
        a, b, free = max(0.0, took.sum() / max(tokens.sum(), 1.0)), 0.0, [0]
    return Fit(float(a), float(b), _covariance(design, took - design @ (a, b), free))


def _covariance(design: np.ndarray, residuals: np.ndarray, free: list[int]) -> np.ndarray:
    """The fitted terms' covariance, ordinary least squares' (residual variance times the inverse normal
    matrix) over the ``free`` terms; a term held at zero has none."""
    used = design[:, free]
    spare = len(residuals) - len(free)
    variance = float(residuals @ residuals) / spare if spare > 0 else np.inf
    covariance = np.zeros((2, 2))
    covariance[np.ix_(free, free)] = variance * np.linalg.pinv(used.T @ used)
    return covariance
