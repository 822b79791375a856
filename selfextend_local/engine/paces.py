"""What earlier readings on this machine said about the cost of reading: the time left's prior.

A reading's cost model (:mod:`.eta`) has two terms: ``a`` seconds a token for the weights and ``b`` seconds a
token per cell before it for attention. Their ratio ``b / a`` belongs to the setup (the model, the KV type,
the llama.cpp build, the threads, the SelfExtend setting), while the machine's pace moves both terms alike.
Fitted from a reading's first quarter, the ratio is what goes wrong; so each finished reading long enough to
show the slope leaves its fitted ratio here, and the next reading of the same setup starts from them
(:class:`~.eta.Clock`'s ``prior``).

One small JSON file, ``$SELFEXTEND_LOCAL_PACES`` (empty: none kept) or else
``~/.cache/selfextend-local/paces.json``, written to a temporary file and renamed. A file that cannot be
read or written means no prior: never an error, never a lost reading.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .eta import Clock

PACES_ENV = "SELFEXTEND_LOCAL_PACES"
MIN_TOKENS = 8192  # a shorter reading's slope is mostly noise: it leaves nothing
KEPT = 5  # the newest ratios a setup keeps; its prior is their median
MAX_BYTES = 1 << 20  # far more than any number of setups' ratios: a larger file is not ours


def default_path() -> Path | None:
    if (env := os.environ.get(PACES_ENV)) is not None:
        return Path(env).expanduser() if env else None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "selfextend-local" / "paces.json"


def setup_of(model_path: Path, kv_type: str, threads: int, group: int, window: int) -> str:
    """The key of a setup: what the ratio of a reading's two costs depends on."""
    import llama_cpp  # here: the CLI's bar imports this module, and its start should not wait on llama.cpp

    try:
        size = model_path.stat().st_size
    except OSError:
        size = 0
    return json.dumps([model_path.name, size, kv_type, llama_cpp.__version__, threads, group, window])


@dataclass
class Pace:
    """One setup's entry in the file at ``path``: a clock for a new reading, and what a finished one said."""

    setup: str
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.path is None:
            self.path = default_path()

    def clock(self) -> Clock:
        """A clock for a reading of this setup, with the prior its earlier readings give (if any)."""
        return Clock(prior=self.prior())

    def prior(self) -> float | None:
        ratios = self._read().get(self.setup)
        return statistics.median(ratios) if ratios else None

    def record(self, clock: Clock, total: int) -> None:
        """Keep the ratio a reading's own fit ended with, once it has read all ``total`` tokens (one that
        read under :data:`MIN_TOKENS` leaves none)."""
        if not clock.points or clock.points[-1][0] < total or total - clock.points[0][0] < MIN_TOKENS:
            return
        if (ratio := clock.ratio()) is None:
            return
        paces = self._read()
        paces[self.setup] = [*paces.get(self.setup, []), ratio][-KEPT:]
        self._write(paces)

    def _read(self) -> dict[str, list[float]]:
        if self.path is None:
            return {}
        try:  # a FIFO or a device in its place would never end: only a small regular file is read
            if not self.path.is_file() or self.path.stat().st_size > MAX_BYTES:
                return {}
            paces = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(paces, dict):
            return {}
        kept = {k: v for k, v in paces.items() if isinstance(v, list)}
        return {k: [float(r) for r in v if isinstance(r, (int, float)) and r > 0] for k, v in kept.items()}

    def _write(self, paces: dict[str, list[float]]) -> None:
        if self.path is None or (self.path.exists() and not self.path.is_file()):
            return  # something else is there (a FIFO, a device, a folder): it is not ours to replace
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps(paces, indent=1))
            os.replace(temp, self.path)
        except OSError:
            temp.unlink(missing_ok=True)


def pace_for(model_path: Path, runtime, plan) -> Pace:
    """The entry of a reading with this model, :class:`~.settings.RuntimeSettings` and :class:`~.planning.Plan`."""
    return Pace(setup_of(model_path, runtime.kv_type, runtime.threads, plan.group, plan.window))


def pace_of(sequence) -> Pace:
    """The entry of a reading in ``sequence`` (a :class:`~.session.Session`, say)."""
    return pace_for(sequence.context.model.path, sequence.runtime, sequence.plan)
