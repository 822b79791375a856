"""Shared fixtures: the real bundled GGUF, loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the internet; hub tests set their own endpoint


@pytest.fixture(scope="session")
def model():
    from selfextend_local.engine import load_model

    loaded = load_model(None)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def runtime():
    from selfextend_local.settings import RuntimeSettings

    return RuntimeSettings()


@pytest.fixture(scope="session")
def pydoc_tokens(model):
    from selfextend_local.corpus import pydoc_text

    return model.tokenize(pydoc_text())


def make_session(model, runtime, n_ctx, group=1, window=1024, schedule="neighbor", division="auto"):
    from selfextend_local.planning import Plan
    from selfextend_local.session import Session

    plan = Plan(group, window, schedule, division, n_ctx, model.info.n_ctx_train, "test")
    return Session(model, plan, runtime)
