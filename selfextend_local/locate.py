"""``--model`` values to a loaded model: the bundled SmolLM2, a path, a local name, a known name from the
registry, or ``REPO:QUANT`` (downloaded through :mod:`.hub` the first time)."""

from __future__ import annotations

import os
from pathlib import Path

from .engine.errors import ModelError
from .engine.model import Model
from .engine.registry import known_model
from .engine.settings import RuntimeSettings
from .paths import bundled_model, expand_user, is_hub_spec, local_models


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A path to a GGUF for ``--model``: default bundled, a path, a local name, a known name, or REPO:QUANT."""
    if spec is None or str(spec) == "":
        return bundled_model()
    text = str(spec)
    path = expand_user(text)
    if path.exists() or text.endswith(".gguf"):
        return path
    for candidate in local_models():
        if text in (candidate.name, candidate.stem):
            return candidate
    if known := known_model(text):
        text = f"{known.repo}:{known.quant}"
    if is_hub_spec(text):
        from .hub import fetch_for_model_option

        return fetch_for_model_option(text)
    names = ", ".join(p.name for p in local_models()) or "none downloaded yet"
    raise ModelError(
        "no model named {text!r}; pass a .gguf path, a local model ({names}) or REPO:QUANT",
        param="model",
        text=text,
        names=names,
    )


def load_model(spec: str | os.PathLike | None = None, runtime: RuntimeSettings | None = None) -> Model:
    """Load ``--model`` (a path, a local or known name, REPO:QUANT, or None for the bundled model)."""
    runtime = runtime or RuntimeSettings()
    return Model(resolve_model(spec), gpu_layers=runtime.gpu_layers)
