"""Shared fixtures: the real bundled GGUF, loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach the internet: the hub points at a closed local port unless a test starts its own.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
# Nor keep what readings cost (engine/paces.py): a test's time left never depends on the tests before it.
os.environ["SELFEXTEND_LOCAL_PACES"] = ""


# SELFEXTEND_TEST_GPU_LAYERS=99 runs the engine tests with the model offloaded (a CUDA or Metal build).
GPU_LAYERS = int(os.environ.get("SELFEXTEND_TEST_GPU_LAYERS", "0"))


@pytest.fixture(scope="session")
def model():
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.locate import load_model

    loaded = load_model(None, RuntimeSettings(gpu_layers=GPU_LAYERS))
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def runtime():
    from selfextend_local.engine.settings import RuntimeSettings

    return RuntimeSettings(gpu_layers=GPU_LAYERS)


@pytest.fixture(scope="session")
def pydoc_tokens(model):
    from selfextend_local.tasks.corpus import pydoc_text

    return model.tokenize(pydoc_text())


def make_session(model, runtime, n_ctx, group=1, window=1024, schedule="neighbor", division="auto"):
    from selfextend_local.engine.planning import Plan
    from selfextend_local.engine.session import Session

    plan = Plan(group, window, schedule, division, n_ctx, model.info.n_ctx_train, "test")
    return Session(model, plan, runtime)
