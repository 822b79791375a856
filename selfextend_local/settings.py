"""Typed settings, validated once and shared by the library, the CLI and the server."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .errors import BadInputError

SCHEDULES = ("neighbor", "llamacpp")
DIVISIONS = ("auto", "native", "emulated")
KV_TYPES = ("f16", "f32")

# Upper bounds for what a user can type. Beyond them llama.cpp crashes, allocates without limit, or
# the setting means nothing (a group larger than any window, more threads than a machine could run).
MAX_GROUP = 256
MAX_WINDOW = 1 << 20
MAX_CTX = 1 << 24  # cells; memory is checked against the model when the context is made
MAX_BATCH = 8192
THREADS_PER_CORE = 4
MAX_GPU_LAYERS = 1000
MAX_TEMPERATURE = 2.0  # as the OpenAI API
MAX_TOP_K = 1 << 20
MAX_TOKENS = 1 << 20
MAX_STOPS = 4  # as the OpenAI API
MAX_STOP_CHARS = 256


def default_threads() -> int:
    """CPU threads to use: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return THREADS_PER_CORE * default_threads()


def check_range(name: str, value: int | float | None, low: float, high: float, low_open: bool = False) -> None:
    """Raise BadInputError unless ``low <= value <= high`` (``low < value`` when ``low_open``); None passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value}")
    below = value <= low if low_open else value < low
    if below or value > high:
        if isinstance(value, int) and not isinstance(value, bool):
            bounds = f"between {int(low) + 1 if low_open else int(low)} and {int(high)}"
            raise BadInputError(f"{name} must be {bounds}, got {value}")
        bounds = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise BadInputError(f"{name} must be {bounds}, got {value:g}")


def _positive(name: str, value: int | float | None, high: float) -> None:
    check_range(name, value, 0, high, low_open=True)


@dataclass(frozen=True)
class ExtendSettings:
    """SelfExtend settings. group None or window None means "plan it from the model and input"."""

    group: int | None = None
    window: int | None = None
    schedule: str = "neighbor"
    division: str = "auto"

    def __post_init__(self) -> None:
        _positive("--group", self.group, MAX_GROUP)
        _positive("--window", self.window, MAX_WINDOW)
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
        _positive("--ctx", self.ctx, MAX_CTX)
        _positive("--threads", self.threads, max_threads())
        _positive("--batch", self.batch, MAX_BATCH)
        check_range("--gpu-layers", self.gpu_layers, 0, MAX_GPU_LAYERS)
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
        check_range("--temperature", self.temperature, 0, MAX_TEMPERATURE)
        check_range("--top-k", self.top_k, 0, MAX_TOP_K)
        check_range("--top-p", self.top_p, 0, 1, low_open=True)
        _positive("--max-tokens", self.max_tokens, MAX_TOKENS)
        if len(self.stop) > MAX_STOPS:
            raise BadInputError(f"at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise BadInputError("a stop string must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise BadInputError(f"a stop string may have at most {MAX_STOP_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
