"""The methods evaluations compare, as a registry: no extension, llama.cpp's linear RoPE scaling and YaRN
(through its own context parameters), and SelfExtend with each schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..engine.context import RopeOverride
from ..engine.errors import BadInputError
from ..engine.model import Model
from ..engine.planning import Plan, align_cells
from ..engine.planning import default_setting as planned_setting
from ..engine.session import Session
from ..engine.settings import ExtendSettings, RuntimeSettings, not_a_multiple


@dataclass(frozen=True)
class Setting:
    """What every method is given: the length to serve and SelfExtend's G and W."""

    n_tokens: int
    group: int
    window: int


def _plain(model: Model, s: Setting, schedule: str = "neighbor") -> Plan:
    return Plan(1, s.window, schedule, "auto", _ctx(s), model.info.n_ctx_train, "baseline")


def _ctx(s: Setting) -> int:
    return align_cells(s.n_tokens)


def _factor(model: Model, s: Setting) -> float:
    return max(1.0, s.n_tokens / model.info.n_ctx_train)


def _selfextend(schedule: str) -> Callable[[Model, Setting], tuple[Plan, RopeOverride | None]]:
    def make(model: Model, s: Setting) -> tuple[Plan, RopeOverride | None]:
        return Plan(s.group, s.window, schedule, "auto", _ctx(s), model.info.n_ctx_train, "evaluation"), None

    return make


METHODS: dict[str, Callable[[Model, Setting], tuple[Plan, RopeOverride | None]]] = {
    "none": lambda model, s: (_plain(model, s), None),
    "linear": lambda model, s: (_plain(model, s), RopeOverride("linear", _factor(model, s))),
    "yarn": lambda model, s: (_plain(model, s), RopeOverride("yarn", _factor(model, s))),
    "neighbor": _selfextend("neighbor"),
    "llamacpp": _selfextend("llamacpp"),
}


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise BadInputError(
            "unknown method {unknown}; choose from: {choices}",
            param="methods",
            unknown=", ".join(unknown) or "(none)",
            choices=", ".join(METHODS),
        )
    return names


def default_setting(model: Model, n_tokens: int, group: int | None, window: int | None) -> Setting:
    """The family's G/W (or W = L/4 and G 4) unless given."""
    group, window = planned_setting(model.info, ExtendSettings(group, window))
    if window % group:
        raise not_a_multiple(window, group)
    return Setting(n_tokens, group, window)


def open_method(model: Model, method: str, setting: Setting, runtime: RuntimeSettings) -> Session:
    plan, rope = METHODS[method](model, setting)
    return Session(model, plan, runtime, rope)


def describe(method: str, setting: Setting) -> str:
    if method in ("neighbor", "llamacpp"):
        return f"SelfExtend {method} G{setting.group} W{setting.window}"
    return {"none": "no extension", "linear": "linear RoPE scaling", "yarn": "YaRN"}[method]
