"""Typed settings, validated once and shared by the library, the CLI and the server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import BadInputError

SCHEDULES = ("neighbor", "llamacpp")
DIVISIONS = ("auto", "native", "emulated")
KV_TYPES = ("f16", "f32")


def default_threads() -> int:
    """CPU threads to use: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS
        return max(1, os.cpu_count() or 1)


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise BadInputError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class ExtendSettings:
    """SelfExtend settings. group None or window None means "plan it from the model and input"."""

    group: int | None = None
    window: int | None = None
    schedule: str = "neighbor"
    division: str = "auto"

    def __post_init__(self) -> None:
        _positive("--group", self.group)
        _positive("--window", self.window)
        if self.schedule not in SCHEDULES:
            raise BadInputError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.division not in DIVISIONS:
            raise BadInputError(f"unknown division {self.division!r}; choose one of: {', '.join(DIVISIONS)}")
        if self.group and self.window and self.group > 1 and self.window % self.group:
            raise BadInputError(
                f"--window {self.window} is not a multiple of --group {self.group}; "
                f"try --window {self.window - self.window % self.group or self.group}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.group and self.group > 1)


@dataclass(frozen=True)
class RuntimeSettings:
    """How llama.cpp runs: context size, threads, offload, batch, KV cache type."""

    ctx: int | None = None
    threads: int = field(default_factory=default_threads)
    gpu_layers: int = 0
    batch: int = 512
    kv_type: str = "f16"

    def __post_init__(self) -> None:
        _positive("--ctx", self.ctx)
        _positive("--threads", self.threads)
        _positive("--batch", self.batch)
        if self.gpu_layers < 0:
            raise BadInputError(f"--gpu-layers must be 0 or more, got {self.gpu_layers}")
        if self.kv_type not in KV_TYPES:
            raise BadInputError(f"unknown --kv-type {self.kv_type!r}; choose one of: {', '.join(KV_TYPES)}")


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling for generation. temperature 0 means greedy; seed None means a random seed."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadInputError(f"--temperature must be 0 or more, got {self.temperature}")
        if self.top_k < 0:
            raise BadInputError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"--top-p must be in (0, 1], got {self.top_p}")
        _positive("--max-tokens", self.max_tokens)
        if any(not s for s in self.stop):
            raise BadInputError("a stop string must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
