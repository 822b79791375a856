"""Planning: limits of a setting, the settings chosen for an input, and refusals that name a fix."""

from __future__ import annotations

import pytest

from selfextend_local.engine.errors import BadInputError, InputTooLongError
from selfextend_local.engine.planning import max_input, plan
from selfextend_local.engine.schedules import make_schedule
from selfextend_local.engine.settings import ExtendSettings

L = 8192


def test_max_input_formula():
    assert max_input(L, 4, 2048) == (L - 2048) * 4 + 2048 == 26624
    assert max_input(L, 1, 2048) == L


def test_short_input_needs_no_extension():
    chosen = plan(L, 3000, ExtendSettings())
    assert chosen.group == 1 and chosen.n_ctx == 3072


def test_context_is_sized_to_the_input_not_g_times_l():
    chosen = plan(L, 12_000, ExtendSettings())
    assert chosen.extended and chosen.n_ctx == 12_032
    assert chosen.n_ctx < chosen.group * L


def test_planned_group_keeps_positions_within_the_rule_of_thumb():
    """Checked by running the schedule the plan chose over the input (not by the planner's own formula):
    no position the model sees is beyond 2/3 of its training context."""
    for n in (9_000, 20_000, 60_000, 200_000):
        chosen = plan(L, n, ExtendSettings())
        schedule = make_schedule("neighbor", chosen.group, chosen.window)
        for _ in range(0, n, 512):
            schedule.prepare()
            schedule.advance(512)
        schedule.prepare()
        assert schedule.next_pos <= 2 / 3 * L, (n, chosen)


def test_family_setting_used_when_it_fits():
    chosen = plan(L, 12_000, ExtendSettings(), recommended=(4, 2048))
    assert (chosen.group, chosen.window) == (4, 2048)
    bigger = plan(L, 40_000, ExtendSettings(), recommended=(4, 2048))
    assert bigger.window == 2048 and bigger.group == 8


def test_too_long_names_a_setting_that_fits():
    with pytest.raises(InputTooLongError) as err:
        plan(L, 30_000, ExtendSettings(group=4, window=2048))
    message = str(err.value)
    assert "26624" in message and "--group 8 --window 2048" in message
    assert plan(L, 30_000, ExtendSettings(group=8, window=2048)).n_ctx >= 30_000  # the suggestion serves it


def test_beyond_every_setting_is_refused():
    with pytest.raises(InputTooLongError, match="shorten the input"):
        plan(L, 10_000_000, ExtendSettings())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group": 3, "window": 1024}, "not a multiple"),
        ({"group": 0}, "between 1 and 256"),
        ({"window": -5}, "between 1 and"),
        ({"schedule": "nope"}, "unknown --schedule 'nope'"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        ExtendSettings(**kwargs)


def test_window_must_be_below_training_context():
    with pytest.raises(BadInputError, match="smaller than the training context"):
        plan(L, 10_000, ExtendSettings(group=4, window=8192))


def test_ctx_smaller_than_input_is_refused():
    with pytest.raises(InputTooLongError, match="--ctx"):
        plan(L, 5000, ExtendSettings(), ctx=4096)


def test_errors_carry_the_setting_and_each_front_end_words_it():
    from selfextend_local.engine.errors import PYTHON
    from selfextend_local.serving.http import http_naming

    with pytest.raises(InputTooLongError) as err:
        plan(L, 30_000, ExtendSettings(group=4, window=2048))
    exc = err.value
    assert exc.param == "group" and exc.suggested == {"group": 8, "window": 2048}
    assert str(exc) == (
        "the input needs 30000 tokens but --group 4 --window 2048 reaches 26624 (training context 8192); "
        "use --group 8 --window 2048"
    )
    http = exc.render(http_naming("messages"))
    assert http.endswith(
        "but selfextend.group=4, selfextend.window=2048 reaches 26624 (training context 8192); "
        "use selfextend.group=8, selfextend.window=2048"
    )
    assert exc.render(PYTHON).endswith("use group=8, window=2048")
    with pytest.raises(BadInputError) as err:
        ExtendSettings(group=3, window=1024)
    assert err.value.param == "window" and err.value.suggested == {"window": 1023}
    assert err.value.render(http_naming("prompt")) == (
        "selfextend.window 1024 is not a multiple of selfextend.group 3; try selfextend.window=1023"
    )
