"""Errors as data: a front end words them; moving one across a process or naming where it happened keeps
its class, its setting and its fields."""

from __future__ import annotations

import pickle

from selfextend_local.engine.errors import PYTHON, InputTooLongError, ModelError, Setting


def test_an_error_said_of_a_place_keeps_its_class_setting_and_fields():
    error = InputTooLongError(
        "{n} tokens; use {fix}", param="group", suggested={"group": 4}, n=5, fix=Setting({"group": 4})
    )
    moved = pickle.loads(pickle.dumps(error.located("on Ray node {node}", node="ab12")))  # as Ray carries it
    assert type(moved) is InputTooLongError and moved.param == "group" and moved.suggested == {"group": 4}
    assert str(moved) == "on Ray node ab12: 5 tokens; use --group 4"
    assert moved.render(PYTHON) == "on Ray node ab12: 5 tokens; use group=4"


def test_a_message_without_fields_keeps_its_braces_when_placed():
    placed = ModelError("no {braces} were meant here").located("on {host}", host="x")
    assert str(placed) == "on x: no {braces} were meant here"
