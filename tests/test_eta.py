"""The time left in a reading, from its cost model (pure: no model loaded)."""

from __future__ import annotations

import random

import pytest

from selfextend_local.engine.eta import Clock


def reading(a: float, b: float, total: int, chunk: int = 512, noise: float = 0.0, start: int = 0):
    """(done, seconds) at each chunk boundary of a reading whose token at position p costs a + b * p."""
    rng = random.Random(1)
    t, done, out = 0.0, start, [(start, 0.0)]
    while done < total:
        n = min(chunk, total - done)
        t += (a * n + b * (done * n + n * n / 2)) * (1 + rng.uniform(-noise, noise))
        done += n
        out.append((done, t))
    return out


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_time_left_is_right_at_length_where_the_average_rate_is_not(noise):
    total = 32768
    points = reading(a=2e-3, b=2e-7, total=total, noise=noise)
    clock = Clock()
    for done, at in points:
        clock.mark(done, at)
        if done < total / 4 or done >= total:
            continue
        truth = points[-1][1] - at
        left = clock.seconds_left(done, total)
        assert abs(left - truth) <= 0.1 * truth, (done, left, truth)
    # at half way the average rate says far less than what is left
    half = next(i for i, (d, _) in enumerate(points) if d >= total // 2)
    done, at = points[half]
    linear = (total - done) / (done / at)
    assert linear < 0.8 * (points[-1][1] - at)


def test_no_early_estimate_before_three_steps_and_none_needed_at_the_end():
    clock = Clock()
    assert clock.seconds_left(0, 1000) is None
    clock.mark(0, 0.0)
    clock.mark(10, 1.0)
    assert clock.seconds_left(10, 1000) is None  # one step says nothing of the slope
    clock.mark(20, 2.0)
    assert clock.seconds_left(20, 1000) is None  # two steps fit both terms exactly, whatever their noise
    clock.mark(30, 3.0)
    assert clock.seconds_left(30, 1000) == pytest.approx(97.0, rel=1e-6)
    assert clock.seconds_left(1000, 1000) == 0.0


def test_a_short_reading_says_its_time_left_midway():
    """A reading of a few chunks reaches a quarter in two steps: from there the fit is shown as it is (the
    page's ~1,600-token document in 512-token chunks has only its last step after a third)."""
    clock = Clock()
    for done, at in [(0, 0.0), (512, 1.0), (1024, 2.5)]:
        clock.mark(done, at)
    b = 0.5 / ((1024**2 - 512**2) / 2 - 512**2 / 2)  # the two steps' exact fit
    a = (1.0 - b * 512**2 / 2) / 512
    assert clock.seconds_left(1024, 1600) == pytest.approx(a * 576 + b / 2 * (1600**2 - 1024**2), rel=1e-9)
    assert clock.seconds_left(1024, 100_000) is None  # the same steps early in a long reading


def test_no_estimate_while_the_steps_cannot_back_it():
    """Early steps of a long reading whose times jump: a slope carried to 100k tokens from them could say
    anything, so nothing is said; steady steps after them give a number again."""
    clock = Clock()
    for done, at in [(0, 0.0), (512, 2.0), (1024, 3.0), (1536, 5.5)]:
        clock.mark(done, at)
    assert clock.coefficients() is not None and clock.seconds_left(1536, 100_000) is None
    steady = reading(a=2e-3, b=2e-8, total=16384, start=1536)
    for done, at in steady[1:]:
        clock.mark(done, 5.5 + at)
    assert clock.seconds_left(16384, 100_000) is not None


def test_a_resumed_reading_starts_its_clock_where_it_resumed():
    total = 32768
    points = reading(a=2e-3, b=2e-7, total=total, start=16384)
    clock = Clock()
    for done, at in points[:4]:
        clock.mark(done, at)
    done, at = points[3]
    truth = points[-1][1] - at
    assert abs(clock.seconds_left(done, total) - truth) <= 0.1 * truth


def test_repeated_and_backward_points_are_ignored():
    clock = Clock()
    for done, at in [(0, 0.0), (10, 1.0), (10, 5.0), (5, 6.0), (20, 2.0), (30, 3.0)]:
        clock.mark(done, at)
    assert [p[0] for p in clock.points] == [0, 10, 20, 30]
    assert clock.seconds_left(30, 40) == pytest.approx(1.0, rel=1e-6)
