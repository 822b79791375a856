"""Typed settings, validated once and shared by the library, the CLI and the server."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import kvtypes
from .errors import BadInputError, Name, Setting

SCHEDULES = ("neighbor", "llamacpp")
DIVISIONS = ("auto", "native", "emulated")
KV_TYPES = tuple(kvtypes.KV_TYPES)
FLASH_ATTN = kvtypes.FLASH_ATTN

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
# Tokens a request may draft a step from its own text (engine/drafting.py; 0: none). Off until measured to
# never lose (scripts/bench_drafts.py): the default everywhere (CLI, server, Llama) is this one constant.
DRAFT = 0
MAX_DRAFT = 32  # llama.cpp's server drafts at most 16 by default, llama-cpp-python 10
# Seconds of a long reading between two of its checkpoints (engine/checkpoint.py); each write is also kept
# to within 1/40 of the reading's time whatever the disk. 60 s: at most one minute of reading is lost.
CHECKPOINT_SECONDS = 60.0
MAX_CHECKPOINT_SECONDS = 86400.0


def default_threads() -> int:
    """CPU threads to use: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return THREADS_PER_CORE * default_threads()


def check_range(key: str, value: int | float | None, low: float, high: float, low_open: bool = False) -> None:
    """Raise BadInputError about setting ``key`` unless ``low <= value <= high`` (``low < value`` when
    ``low_open``); None passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInputError("{name} must be a finite number, got {value}", param=key, name=Name(key), value=value)
    below = value <= low if low_open else value < low
    if not (below or value > high):
        return
    if isinstance(value, int) and not isinstance(value, bool):
        low_int = int(low) + 1 if low_open else int(low)
        raise BadInputError(
            "{name} must be between {low} and {high}, got {value}",
            param=key,
            name=Name(key),
            low=low_int,
            high=int(high),
            value=value,
        )
    raise BadInputError(
        "{name} must be {side} {low:g} and at most {high:g}, got {value:g}",
        param=key,
        name=Name(key),
        side="above" if low_open else "at least",
        low=low,
        high=high,
        value=value,
    )


def _unknown(key: str, value: str, choices: tuple[str, ...]) -> BadInputError:
    return BadInputError(
        "unknown {name} {value!r}; choose one of: {choices}",
        param=key,
        name=Name(key),
        value=value,
        choices=", ".join(choices),
    )


def not_a_multiple(window: int, group: int) -> BadInputError:
    """The window must be a multiple of the group: say so, with the nearest window that is."""
    fix = window - window % group or group
    return BadInputError(
        "{window} {w} is not a multiple of {group} {g}; try {fix}",
        param="window",
        suggested={"window": fix},
        window=Name("window"),
        group=Name("group"),
        w=window,
        g=group,
        fix=Setting({"window": fix}),
    )


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
        _positive("group", self.group, MAX_GROUP)
        _positive("window", self.window, MAX_WINDOW)
        if self.schedule not in SCHEDULES:
            raise _unknown("schedule", self.schedule, SCHEDULES)
        if self.division not in DIVISIONS:
            raise _unknown("division", self.division, DIVISIONS)
        if self.group and self.window and self.group > 1 and self.window % self.group:
            raise not_a_multiple(self.window, self.group)

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
    kv_type: str = "f16"  # K and V
    flash_attn: str = "auto"  # llama.cpp's choice, or forced on or off

    def __post_init__(self) -> None:
        _positive("ctx", self.ctx, MAX_CTX)
        _positive("threads", self.threads, max_threads())
        _positive("batch", self.batch, MAX_BATCH)
        check_range("gpu_layers", self.gpu_layers, 0, MAX_GPU_LAYERS)
        if self.kv_type not in KV_TYPES:
            raise _unknown("kv_type", self.kv_type, KV_TYPES)
        if self.flash_attn not in FLASH_ATTN:
            raise _unknown("flash_attn", self.flash_attn, FLASH_ATTN)
        if self.flash_attn == "off" and kvtypes.KV_TYPES[self.kv_type].quantized:
            raise BadInputError(
                "llama.cpp quantizes the V cache only with flash attention: use {flash_attn} auto or on with "
                "{kv_type} {kv}, or a {kv_type} of f16, bf16 or f32",
                param="flash_attn",
                flash_attn=Name("flash_attn"),
                kv_type=Name("kv_type"),
                kv=self.kv_type,
            )


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling for generation. temperature 0 means greedy; seed None means a random seed; ``grammar``
    constrains every reply (structured output), and ``schema`` is what a finished reply is checked against
    (True: one JSON value; a JSON schema: a value valid against it; see :mod:`.grammar`)."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    grammar: str | None = None  # GBNF (root rule "root") that every reply must match, e.g. JSON of a schema
    schema: Mapping | bool | None = None
    draft: int = DRAFT  # tokens drafted a step from the request's own text, at most (0: none)

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0, MAX_TEMPERATURE)
        if not isinstance(self.draft, int) or isinstance(self.draft, bool):
            raise BadInputError("{name} must be a whole number of tokens", param="draft", name=Name("draft"))
        check_range("draft", self.draft, 0, MAX_DRAFT)
        check_range("top_k", self.top_k, 0, MAX_TOP_K)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        check_range("min_p", self.min_p, 0, 1)
        _positive("max_tokens", self.max_tokens, MAX_TOKENS)
        if len(self.stop) > MAX_STOPS:
            raise BadInputError("at most {most} stop strings, got {n}", param="stop", most=MAX_STOPS, n=len(self.stop))
        if any(not s for s in self.stop):
            raise BadInputError("a stop string must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise BadInputError("a stop string may have at most {most} characters", param="stop", most=MAX_STOP_CHARS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
