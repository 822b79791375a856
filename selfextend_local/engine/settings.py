"""Typed settings, validated once and shared by the library, the CLI and the server."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import kvtypes
from .errors import BadInputError, Name, Setting, shown

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
MAX_SEED = 1 << 64  # a seed is taken modulo 2**32; beyond 64 bits a number is a mistake, not a seed
MAX_REPEAT_PENALTY = 10.0  # llama.cpp divides a repeated token's logit by it: beyond, every repeat is gone
MAX_PENALTY = 2.0  # presence and frequency, as the OpenAI API
MAX_REPEAT_LAST_N = 1 << 16  # llama.cpp keeps a ring of this many tokens a request
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


def check_type(key: str, value: object, kind: type) -> None:
    """Raise BadInputError naming setting ``key`` unless ``value`` is of ``kind``: int (a whole number, not
    a bool), float (an int or a float, not a bool), str; None passes (the fields that take it say so by
    their default). Values come from JSON and Python callers as they are: a string or a float where a
    whole number is wanted must be refused here, before arithmetic on it fails somewhere else."""
    if value is None:
        return
    kinds = (int, float) if kind is float else (kind,)
    if isinstance(value, kinds) and not isinstance(value, bool):
        return
    wanted = {int: "a whole number", float: "a number", str: "text"}[kind]
    raise BadInputError(
        "{name} must be {wanted}, got {value}", param=key, name=Name(key), wanted=wanted, value=shown(value)
    )


def check_types(settings: object, kinds: Mapping[str, type]) -> None:
    for key, kind in kinds.items():
        check_type(key, getattr(settings, key), kind)


def check_range(key: str, value: int | float | None, low: float, high: float, low_open: bool = False) -> None:
    """Raise BadInputError about setting ``key`` unless ``low <= value <= high`` (``low < value`` when
    ``low_open``); None passes. Bounds that are ints are a whole-number setting's (said as such)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInputError("{name} must be a finite number, got {value}", param=key, name=Name(key), value=value)
    below = value <= low if low_open else value < low
    if not (below or value > high):
        return
    if isinstance(value, int) and isinstance(low, int) and isinstance(high, int):  # a whole-number setting
        low_int = int(low) + 1 if low_open else int(low)
        raise BadInputError(
            "{name} must be between {low} and {high}, got {value}",
            param=key,
            name=Name(key),
            low=low_int,
            high=int(high),
            value=shown(value),
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
        check_types(self, {"group": int, "window": int, "schedule": str, "division": str})
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
        kinds = {"ctx": int, "threads": int, "gpu_layers": int, "batch": int, "kv_type": str, "flash_attn": str}
        check_types(self, kinds)
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
    (True: one JSON value; a JSON schema: a value valid against it; see :mod:`.grammar`). The penalties are
    llama.cpp's (``llama_sampler_init_penalties``) over the last ``repeat_last_n`` tokens of the reply (-1:
    all of it): a repeated token's logit divided by ``repeat_penalty`` (1: off), less ``frequency_penalty``
    a time it was seen and ``presence_penalty`` once (0: off)."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    grammar: str | None = None  # GBNF (root rule "root") that every reply must match, e.g. JSON of a schema
    schema: Mapping | bool | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    draft: int = DRAFT  # tokens drafted a step from the request's own text, at most (0: none)

    def __post_init__(self) -> None:
        check_types(self, SAMPLING_TYPES)
        for key in ("temperature", "top_k", "top_p", "min_p", "max_tokens", "repeat_penalty", "repeat_last_n", "draft"):
            if getattr(self, key) is None:
                raise BadInputError("{name} must be a number, got null", param=key, name=Name(key))
        check_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        check_range("draft", self.draft, 0, MAX_DRAFT)
        check_range("top_k", self.top_k, 0, MAX_TOP_K)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("min_p", self.min_p, 0.0, 1.0)
        check_range("seed", self.seed, -MAX_SEED, MAX_SEED)
        _positive("max_tokens", self.max_tokens, MAX_TOKENS)
        check_range("repeat_penalty", self.repeat_penalty, 0.0, MAX_REPEAT_PENALTY, low_open=True)
        check_range("repeat_last_n", self.repeat_last_n, -1, MAX_REPEAT_LAST_N)
        check_range("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        check_range("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        self._check_stop()

    def _check_stop(self) -> None:
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise BadInputError(
                "{name} must be a string or a list of strings, got {value}",
                param="stop",
                name=Name("stop"),
                value=shown(self.stop),
            )
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from JSON or Ray: the settings stay hashable
        if len(self.stop) > MAX_STOPS:
            raise BadInputError("at most {most} stop strings, got {n}", param="stop", most=MAX_STOPS, n=len(self.stop))
        if any(not s for s in self.stop):
            raise BadInputError("a stop string must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise BadInputError("a stop string may have at most {most} characters", param="stop", most=MAX_STOP_CHARS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits (then the pick is not the plain logits' argmax)."""
        neutral = self.repeat_penalty == 1 and not self.presence_penalty and not self.frequency_penalty
        return not neutral and self.repeat_last_n != 0


SAMPLING_TYPES = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "max_tokens": int,
    "min_p": float,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "draft": int,
}
