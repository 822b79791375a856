"""Shared fixtures: the real bundled GGUF, loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach the internet: the hub points at a closed local port unless a test starts its own.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"


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
