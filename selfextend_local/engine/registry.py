"""The registry of known model families and models.

Its source is ``models/registry.json`` in the repository; it is installed as package data of
``selfextend_local.models`` (pyproject.toml maps that package to the ``models/`` folder), so a wheel
or an editable install reads the same file, from any directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import ModelInfo


@dataclass(frozen=True)
class Family:
    family: str
    match: tuple[str, ...]
    group: int
    window: int
    source: str


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo: str
    quant: str
    family: str


REGISTRY_PACKAGE = "selfextend_local.models"


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(resources.files(REGISTRY_PACKAGE).joinpath("registry.json").read_text("utf-8"))


def families() -> list[Family]:
    return [
        Family(f["family"], tuple(f["match"]), int(f["group"]), int(f["window"]), f["source"])
        for f in _data()["families"]
    ]


def known_models() -> list[KnownModel]:
    return [KnownModel(m["name"], m["repo"], m["quant"], m["family"]) for m in _data()["models"]]


def known_model(name: str) -> KnownModel | None:
    return next((m for m in known_models() if m.name == name.lower()), None)


def family_for(info: ModelInfo) -> Family | None:
    """The family whose match strings occur in the model's name or file name."""
    haystack = f"{info.name} {info.path.name}".lower()
    return next((f for f in families() if any(m in haystack for m in f.match)), None)
