"""Errors as data: what is wrong, which setting it concerns, and what to change, as fields.

Every error a user can cause derives from :class:`SelfExtendError`. Its message is a template whose fields
may name settings (:class:`Name`) or give settings with values (:class:`Setting`); each front end renders
them in its own terms through a :class:`Naming`: ``--group 4 --window 2048`` on the command line,
``selfextend.group=4, selfextend.window=2048`` over HTTP (where ``param`` becomes OpenAI's ``param``),
``group=4, window=2048`` in Python. No front end parses or rewrites message text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Naming:
    """How a front end names settings: ``names`` maps a setting's key to its name there (default: the key
    itself, or ``--key-with-dashes`` when ``flags``)."""

    names: Mapping[str, str] = field(default_factory=dict)
    flags: bool = False

    def name(self, key: str) -> str:
        if key in self.names:
            return self.names[key]
        return "--" + key.replace("_", "-") if self.flags else key

    def setting(self, values: Mapping[str, object]) -> str:
        if self.flags:
            return " ".join(f"{self.name(k)} {v}" for k, v in values.items())
        return ", ".join(f"{self.name(k)}={v}" for k, v in values.items())


SHOWN_CHARS = 80  # of a value a user gave, echoed in an error: enough to recognise it, never 100 KB of it


def shown(value: object, most: int = SHOWN_CHARS) -> str:
    """``value`` as an error echoes it: its repr (a string's, quoted), cut to ``most`` characters and '…'."""
    text = repr(value)
    return text if len(text) <= most else text[:most] + "…"


def cut(text: str, most: int = SHOWN_CHARS) -> str:
    """A name or id as an error echoes it, unquoted: at most ``most`` characters and '…'."""
    return text if len(text) <= most else text[:most] + "…"


CLI = Naming(flags=True)
PYTHON = Naming(
    {
        "ctx": "n_ctx",
        "threads": "n_threads",
        "batch": "n_batch",
        "gpu_layers": "n_gpu_layers",
        "llama_log": "verbose=True",
        "input": "prompt",
        "model": "model_path",
        "file": "filename",
        "draft": "draft_model's num_pred_tokens",
    }
)


@dataclass(frozen=True)
class Name:
    """A setting's name in a message (``--window`` on the command line, ``selfextend.window`` over HTTP)."""

    key: str

    def render(self, naming: Naming) -> str:
        return naming.name(self.key)


@dataclass(frozen=True)
class Setting:
    """Settings with values in a message (``--group 8 --window 2048``)."""

    values: Mapping[str, object]

    def render(self, naming: Naming) -> str:
        return naming.setting(self.values)


class SelfExtendError(Exception):
    """A failure the user can act on, shown as a single line.

    ``message`` is a ``str.format`` template over ``fields`` (used only when there are fields);
    ``param`` is the setting at fault (a key such as ``"group"``, or ``"input"`` for the prompt);
    ``suggested`` holds values that would work. ``naming`` decides how ``str()`` renders (default: flags).
    """

    def __init__(
        self, message: str, *, param: str | None = None, suggested: Mapping[str, object] | None = None, **fields
    ) -> None:
        super().__init__(message)
        self.template = message
        self.param = param
        self.suggested = dict(suggested or {})
        self.fields = fields
        self.naming: Naming | None = None

    def render(self, naming: Naming = CLI) -> str:
        if not self.fields:
            return self.template
        values = {k: v.render(naming) if isinstance(v, (Name, Setting)) else v for k, v in self.fields.items()}
        return self.template.format(**values)

    def __str__(self) -> str:
        return self.render(self.naming or CLI)

    def located(self, where: str, **fields) -> SelfExtendError:
        """The same error (class, setting, suggestions, fields) said of a place: ``where`` is a template
        over ``fields`` put in front ("on Ray node {node}")."""
        own = self.template if self.fields else self.template.replace("{", "{{").replace("}", "}}")
        merged = {**self.fields, **fields}
        return type(self)(where + ": " + own, param=self.param, suggested=self.suggested, **merged)

    def __reduce__(self):  # keep the fields across processes (Ray workers)
        return _rebuild, (type(self), self.template, self.param, self.suggested, self.fields)


def _rebuild(cls, template, param, suggested, fields):
    return cls(template, param=param, suggested=suggested, **fields)


class BadInputError(SelfExtendError):
    """An option or argument has an invalid value (the CLI exits with a usage error)."""


class ModelError(SelfExtendError):
    """A model file is missing, unreadable, not a GGUF, or cannot be self-extended."""


class InputTooLongError(SelfExtendError):
    """The input does not fit the extended context of the chosen settings."""


class EngineError(SelfExtendError):
    """llama.cpp refused an operation (decode failure, out of memory)."""


class Interrupted(SelfExtendError):
    """Work stopped at a safe point because the user asked it to (Ctrl-C), or a request was cancelled."""
