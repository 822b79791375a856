"""Exception types that the CLI and the server turn into one-line messages.

Every error a user can cause derives from SelfExtendError; its message says what is wrong and what to do.
"""

from __future__ import annotations


class SelfExtendError(Exception):
    """A failure the user can act on; its text is shown as a single line."""


class BadInputError(SelfExtendError):
    """An option or argument has an invalid value (the CLI exits with a usage error)."""


class ModelError(SelfExtendError):
    """A model file is missing, unreadable, not a GGUF, or cannot be self-extended."""


class InputTooLongError(SelfExtendError):
    """The input does not fit the extended context of the chosen settings."""


class EngineError(SelfExtendError):
    """llama.cpp refused an operation (decode failure, out of memory)."""


class Interrupted(SelfExtendError):
    """Work stopped at a safe point because the user asked it to (Ctrl-C)."""
