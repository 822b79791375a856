"""Choosing SelfExtend settings for a model and an input length, and the limits of a setting.

Pure functions over integers and the model's metadata; no llama.cpp calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInputError, InputTooLongError
from .settings import ExtendSettings

GROUPS = (2, 4, 8, 16, 32, 64)
RULE_OF_THUMB = 2 / 3  # the paper: keep W + (N - W)/G within about 1/2 to 2/3 of L
CTX_ALIGN = 256


def max_input(n_ctx_train: int, group: int, window: int) -> int:
    """Largest number of tokens a setting serves without leaving the trained positions."""
    if group <= 1:
        return n_ctx_train
    return (n_ctx_train - window) * group + window


def largest_position(n_tokens: int, group: int, window: int) -> int:
    """The position span the model sees for ``n_tokens`` tokens: ``W + (N - W) / G``."""
    if group <= 1 or n_tokens <= window:
        return n_tokens
    return window + -(-(n_tokens - window) // group)


def default_window(n_ctx_train: int) -> int:
    """A quarter of the training context, in multiples of 64 between 256 and 4096."""
    return max(256, min(4096, (n_ctx_train // 4) // 64 * 64))


@dataclass(frozen=True)
class Plan:
    """Concrete settings for one input: group 1 means plain decoding."""

    group: int
    window: int
    schedule: str
    division: str
    n_ctx: int
    n_ctx_train: int
    reason: str

    @property
    def extended(self) -> bool:
        return self.group > 1

    @property
    def limit(self) -> int:
        return max_input(self.n_ctx_train, self.group, self.window)

    def describe(self) -> str:
        if not self.extended:
            return f"plain decoding, context {self.n_ctx} ({self.reason})"
        return (
            f"SelfExtend G={self.group} W={self.window} schedule={self.schedule}, context {self.n_ctx}, "
            f"reaches {self.limit} tokens ({self.reason})"
        )


def _fits_rule(n_tokens: int, n_ctx_train: int, group: int, window: int) -> bool:
    return largest_position(n_tokens, group, window) <= RULE_OF_THUMB * n_ctx_train


def suggest(n_ctx_train: int, n_tokens: int, window: int) -> tuple[int, int] | None:
    """The smallest group (and a window) that serves ``n_tokens``, or None if nothing up to 64 does."""
    for g, w in _settings_for(n_ctx_train, window):
        if g > 1 and max_input(n_ctx_train, g, w) >= n_tokens:
            return g, w
    return None


def _too_long(n_tokens: int, n_ctx_train: int, group: int, window: int, generate: int = 0) -> InputTooLongError:
    limit = max_input(n_ctx_train, group, window)
    setting = f"--group {group} --window {window}" if group > 1 else "no extension"
    hint = suggest(n_ctx_train, n_tokens, window)
    if hint:
        fix = f"; use --group {hint[0]} --window {hint[1]}"
    else:
        best = max(max_input(n_ctx_train, g, w) for g, w in _settings_for(n_ctx_train, window))
        prompt = n_tokens - generate
        fix = (
            f"; no setting up to --group {GROUPS[-1]} reaches it: lower --max-tokens to at most {best - prompt}"
            if generate and prompt < best
            else f"; no setting up to --group {GROUPS[-1]} reaches it: shorten the input"
        )
    needs = f"the input needs {n_tokens} tokens" + (f" ({generate} of them --max-tokens)" if generate else "")
    return InputTooLongError(f"{needs} but {setting} reaches {limit} (training context {n_ctx_train}){fix}")


def _settings_for(n_ctx_train: int, window: int) -> list[tuple[int, int]]:
    windows = [w for w in dict.fromkeys((window, default_window(n_ctx_train))) if w < n_ctx_train]
    return [(g, w) for w in windows for g in GROUPS if w % g == 0] or [(1, n_ctx_train)]


def _choose_group(n_tokens: int, n_ctx_train: int, window: int, preferred: int | None, generate: int) -> int:
    """The family's group, doubled until it reaches the input; without one, the paper's rule of thumb."""
    candidates = [g for g in GROUPS if window % g == 0]
    if preferred:
        raised = [g for g in candidates if g >= preferred and max_input(n_ctx_train, g, window) >= n_tokens]
        if raised:
            return raised[0]
    for g in candidates:
        if _fits_rule(n_tokens, n_ctx_train, g, window):
            return g
    for g in candidates:
        if max_input(n_ctx_train, g, window) >= n_tokens:
            return g
    raise _too_long(n_tokens, n_ctx_train, candidates[-1] if candidates else 1, window, generate)


def plan(
    n_ctx_train: int,
    n_tokens: int,
    requested: ExtendSettings,
    recommended: tuple[int, int] | None = None,
    ctx: int | None = None,
    generate: int = 0,
) -> Plan:
    """Settings for an input of ``n_tokens`` (prompt plus tokens to generate, ``generate`` of them).

    ``requested`` holds what the user chose (None: plan it); ``recommended`` is the model family's
    (group, window) from the registry. Raises InputTooLongError with a setting that would fit.
    """
    group, window = requested.group, requested.window
    if ctx is not None and ctx < n_tokens:
        raise InputTooLongError(f"the input needs {n_tokens} tokens but --ctx is {ctx}; raise --ctx or leave it out")
    n_ctx = ctx or max(CTX_ALIGN, -(-n_tokens // CTX_ALIGN) * CTX_ALIGN)

    def made(g: int, w: int, reason: str) -> Plan:
        return Plan(g, w, requested.schedule, requested.division, n_ctx, n_ctx_train, reason)

    if group == 1:
        if n_tokens > n_ctx_train:
            raise _too_long(n_tokens, n_ctx_train, 1, window or default_window(n_ctx_train), generate)
        return made(1, window or default_window(n_ctx_train), "--group 1")
    if group is None and window is None and n_tokens <= n_ctx_train:
        return made(1, default_window(n_ctx_train), f"{n_tokens} tokens fit the training context {n_ctx_train}")
    rec_group, rec_window = recommended or (None, None)
    if window is None:
        window = rec_window if rec_window and rec_window < n_ctx_train else default_window(n_ctx_train)
        if group and group <= window and window % group:
            window -= window % group
    if window >= n_ctx_train:
        raise BadInputError(f"--window {window} must be smaller than the training context {n_ctx_train}")
    if group is not None:
        if group > window:
            raise BadInputError(f"--group {group} is larger than the window {window}; give a group up to {window}")
        if window % group:
            raise BadInputError(f"--window {window} is not a multiple of --group {group}")
        if max_input(n_ctx_train, group, window) < n_tokens:
            raise _too_long(n_tokens, n_ctx_train, group, window, generate)
        return made(group, window, "as requested")
    group = _choose_group(n_tokens, n_ctx_train, window, rec_group, generate)
    source = (
        "the model family's setting"
        if group == rec_group
        else "the family's group, raised to reach the input"
        if rec_group
        else "smallest group within 2/3 of the training context"
    )
    return made(group, window, f"planned for {n_tokens} tokens: {source}")
