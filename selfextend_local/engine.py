"""Entry points that tie the pieces together: load a model, plan settings, open a session."""

from __future__ import annotations

import os

from .errors import BadInputError
from .model import Model
from .paths import resolve_model
from .planning import Plan, plan
from .registry import family_for
from .session import RopeOverride, Session
from .settings import ExtendSettings, RuntimeSettings


def load_model(spec: str | os.PathLike | None = None, runtime: RuntimeSettings | None = None) -> Model:
    """Load ``--model`` (a path, a local or known name, REPO:QUANT, or None for the bundled model)."""
    runtime = runtime or RuntimeSettings()
    return Model(resolve_model(spec), gpu_layers=runtime.gpu_layers)


def plan_for(model: Model, n_tokens: int, extend: ExtendSettings, runtime: RuntimeSettings, generate: int = 0) -> Plan:
    """Settings for ``n_tokens`` on this model (``generate`` of them still to be generated), from the
    user's choices and the model family's."""
    if n_tokens - generate <= 0:
        raise BadInputError("the prompt is empty; give some text")
    family = family_for(model.info)
    recommended = (family.group, family.window) if family else None
    return plan(model.info.n_ctx_train, n_tokens, extend, recommended, runtime.ctx, generate)


def open_session(
    model: Model,
    n_tokens: int,
    extend: ExtendSettings | None = None,
    runtime: RuntimeSettings | None = None,
    rope: RopeOverride | None = None,
    generate: int = 0,
) -> Session:
    """A session sized and planned for ``n_tokens`` (the prompt plus the ``generate`` tokens to generate)."""
    runtime = runtime or RuntimeSettings()
    chosen = plan_for(model, n_tokens, extend or ExtendSettings(), runtime, generate)
    return Session(model, chosen, runtime, rope)
