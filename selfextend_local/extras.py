"""Optional features and the extra that installs each: a missing one is a one-line error saying what to
install, never an ImportError traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from .engine.errors import BadInputError, Name

# module -> (the PyPI package, the extra of selfextend-local that installs it)
EXTRAS = {
    "matplotlib": ("matplotlib", "plot"),
    "pypdf": ("pypdf", "docs"),
    "bs4": ("beautifulsoup4", "docs"),
    "ray": ("ray[data]", "ray"),
}


def require(module: str, what: str | Name) -> ModuleType:
    """Import ``module`` for ``what`` (e.g. "drawing plots", or a setting's ``Name("ray")``), or say in one
    line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = EXTRAS[module.split(".")[0]]
        raise BadInputError(
            "{what} needs {package}: pip install 'selfextend-local[{extra}]'", what=what, package=package, extra=extra
        ) from None


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    matplotlib = require("matplotlib", "drawing plots")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
