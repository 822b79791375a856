"""selfextend-local: run GGUF models on inputs longer than their training context with SelfExtend."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "ExtendSettings",
    "RuntimeSettings",
    "SamplingSettings",
    "generate",
    "load_model",
    "open_session",
    "stream_generate",
]


def __getattr__(name: str):
    # llama_cpp is imported only when the engine is used, so `--help` and settings stay instant.
    if name in ("load_model", "open_session"):
        from . import engine

        return getattr(engine, name)
    if name in ("generate", "stream_generate"):
        from . import generate as module

        return getattr(module, name)
    if name in ("ExtendSettings", "RuntimeSettings", "SamplingSettings"):
        from . import settings

        return getattr(settings, name)
    raise AttributeError(name)
