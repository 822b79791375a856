"""Choosing SelfExtend settings for a model and an input length, and the limits of a setting.

Pure functions over integers and the model's metadata; no llama.cpp calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInputError, InputTooLongError, Name, Setting
from .registry import family_for
from .settings import ExtendSettings, RuntimeSettings, not_a_multiple

GROUPS = (2, 4, 8, 16, 32, 64)
RULE_OF_THUMB = 2 / 3  # the paper: keep W + (N - W)/G within about 1/2 to 2/3 of L
CTX_ALIGN = 256  # contexts are sized in whole multiples of this many cells
DEFAULT_GROUP = 4  # where neither the user nor the model's family gives one


def align_cells(n_tokens: int) -> int:
    """Cells for ``n_tokens``: rounded up to a whole multiple of :data:`CTX_ALIGN` (at least one)."""
    return max(CTX_ALIGN, -(-n_tokens // CTX_ALIGN) * CTX_ALIGN)


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
    current = Setting({"group": group, "window": window}) if group > 1 else "no extension"
    hint = suggest(n_ctx_train, n_tokens, window)
    fields = {"n": n_tokens, "generate": generate, "setting": current, "limit": limit, "L": n_ctx_train}
    needs = "the input needs {n} tokens" + (" ({generate} of them {max_tokens})" if generate else "")
    reach = needs + " but {setting} reaches {limit} (training context {L})"
    if hint:
        fix = {"group": hint[0], "window": hint[1]}
        return InputTooLongError(
            reach + "; use {fix}",
            param="group",
            suggested=fix,
            fix=Setting(fix),
            max_tokens=Name("max_tokens"),
            **fields,
        )
    best = max(max_input(n_ctx_train, g, w) for g, w in _settings_for(n_ctx_train, window))
    prompt = n_tokens - generate
    if generate and prompt < best:
        return InputTooLongError(
            reach + "; no setting up to {group} {top} reaches it: lower {max_tokens} to at most {most}",
            param="max_tokens",
            suggested={"max_tokens": best - prompt},
            group=Name("group"),
            top=GROUPS[-1],
            max_tokens=Name("max_tokens"),
            most=best - prompt,
            **fields,
        )
    return InputTooLongError(
        reach + "; no setting up to {group} {top} reaches it: shorten the input",
        param="input",
        group=Name("group"),
        top=GROUPS[-1],
        max_tokens=Name("max_tokens"),
        **fields,
    )


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


def _cells(n_tokens: int, generate: int, ctx: int | None, room: int | None) -> int:
    """The cells a plan gets: ``--ctx`` as given, a slot's ``room``, or what the input needs."""
    fixed = ctx or room
    if fixed is None:
        return align_cells(n_tokens)
    if fixed >= n_tokens:
        return fixed
    if ctx is not None:
        raise InputTooLongError(
            "the input needs {n} tokens but {ctx} is {cells}; raise {ctx} or leave it out",
            param="ctx",
            n=n_tokens,
            ctx=Name("ctx"),
            cells=ctx,
        )
    prompt = n_tokens - generate
    fix = room - prompt if generate and room > prompt else None
    raise InputTooLongError(
        "the input needs {n} tokens"
        + (" ({generate} of them {max_tokens})" if generate else "")
        + " but a slot holds {room}"
        + ("; lower {max_tokens} to at most {fix}" if fix else "; shorten the input"),
        param="max_tokens" if fix else "input",
        suggested={"max_tokens": fix} if fix else None,
        n=n_tokens,
        generate=generate,
        max_tokens=Name("max_tokens"),
        room=room,
        fix=fix,
    )


def _check_window(window: int, group: int | None, n_ctx_train: int) -> None:
    if window >= n_ctx_train:
        raise BadInputError(
            "{window} {w} must be smaller than the training context {L}",
            param="window",
            window=Name("window"),
            w=window,
            L=n_ctx_train,
        )
    if group is not None and group > window:
        raise BadInputError(
            "{group} {g} is larger than the window {w}; give a group up to {w}",
            param="group",
            suggested={"group": window},
            group=Name("group"),
            g=group,
            w=window,
        )
    if group is not None and window % group:
        raise not_a_multiple(window, group)


def _window(requested: int | None, group: int | None, recommended: int | None, n_ctx_train: int) -> int:
    """The window: as requested, else the family's, else a quarter of L (made a multiple of the group)."""
    if requested is not None:
        return requested
    window = recommended if recommended and recommended < n_ctx_train else default_window(n_ctx_train)
    if group and group <= window and window % group:
        window -= window % group
    return window


def _source(group: int, recommended: int | None) -> str:
    if group == recommended:
        return "the model family's setting"
    if recommended:
        return "the family's group, raised to reach the input"
    return "smallest group within 2/3 of the training context"


def plan(
    n_ctx_train: int,
    n_tokens: int,
    requested: ExtendSettings,
    recommended: tuple[int, int] | None = None,
    ctx: int | None = None,
    generate: int = 0,
    room: int | None = None,
) -> Plan:
    """Settings for an input of ``n_tokens`` (prompt plus tokens to generate, ``generate`` of them).

    ``requested`` holds what the user chose (None: plan it); ``recommended`` is the model family's
    (group, window) from the registry; ``ctx`` the cells the user asked for, ``room`` the cells of a slot
    the input must fit in. Raises InputTooLongError with a setting that would fit.
    """
    group = requested.group
    n_ctx = _cells(n_tokens, generate, ctx, room)

    def made(g: int, w: int, reason: str) -> Plan:
        return Plan(g, w, requested.schedule, requested.division, n_ctx, n_ctx_train, reason)

    if group == 1:
        window = requested.window or default_window(n_ctx_train)
        if n_tokens > n_ctx_train:
            raise _too_long(n_tokens, n_ctx_train, 1, window, generate)
        return made(1, window, "no extension requested")
    if group is None and requested.window is None and n_tokens <= n_ctx_train:
        return made(1, default_window(n_ctx_train), f"{n_tokens} tokens fit the training context {n_ctx_train}")
    rec_group, rec_window = recommended or (None, None)
    window = _window(requested.window, group, rec_window, n_ctx_train)
    _check_window(window, group, n_ctx_train)
    if group is not None:
        if max_input(n_ctx_train, group, window) < n_tokens:
            raise _too_long(n_tokens, n_ctx_train, group, window, generate)
        return made(group, window, "as requested")
    group = _choose_group(n_tokens, n_ctx_train, window, rec_group, generate)
    return made(group, window, f"planned for {n_tokens} tokens: {_source(group, rec_group)}")


def family_setting(info) -> tuple[int, int] | None:
    """The model family's (group, window) from the registry, or None for a model it does not know."""
    family = family_for(info)
    return (family.group, family.window) if family else None


def default_setting(info, extend: ExtendSettings, group: int | None = None) -> tuple[int, int]:
    """(group, window): as given in ``extend``, else the model family's, else ``group`` (default
    :data:`DEFAULT_GROUP`) and a quarter of the training context."""
    family = family_setting(info)
    window = extend.window or (family[1] if family else default_window(info.n_ctx_train))
    return extend.group or (family[0] if family else group or DEFAULT_GROUP), window


def plan_for(
    model, n_tokens: int, extend: ExtendSettings, runtime: RuntimeSettings, generate: int = 0, room: int | None = None
) -> Plan:
    """Settings for ``n_tokens`` on this model (``generate`` of them still to be generated), from the
    user's choices and the model family's; within ``room`` cells when given (a slot)."""
    if n_tokens - generate <= 0:
        raise BadInputError("the prompt is empty; give some text", param="input")
    return plan(model.info.n_ctx_train, n_tokens, extend, family_setting(model.info), runtime.ctx, generate, room)
