"""The registry of known model families and models (``models/registry.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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


# The registry is a data file of the checkout (README: the tool is installed from its clone).
REGISTRY_FILE = Path(__file__).resolve().parents[1] / "models" / "registry.json"


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(REGISTRY_FILE.read_text("utf-8"))


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
