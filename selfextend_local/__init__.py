"""selfextend-local: run GGUF models on inputs longer than their training context with SelfExtend.

The public names below are imported on first use, so ``--help`` and the settings stay instant (the
engine imports llama.cpp).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module (relative to this package) that defines it
_PUBLIC = {
    "Llama": "api",
    "LlamaPromptLookupDecoding": "api",
    "load_model": "locate",
    "open_session": "engine.session",
    "generate": "engine.generate",
    "stream_generate": "engine.generate",
    "Engine": "engine.slots",
    "Request": "engine.slots",
    "Scheduler": "engine.scheduler",
    "ExtendSettings": "engine.settings",
    "RuntimeSettings": "engine.settings",
    "SamplingSettings": "engine.settings",
    "SelfExtendError": "engine.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
