"""What every A/B script under scripts/ does the same way: alternate the two sides in rounds, take the median
of the per-round ratios (this machine's speed drifts by 20-40% within minutes, so a ratio is only fair
within a round), print a table, and write the figures as JSON for docs/RESULTS.md.

    rounds = alternate(measure_a, measure_b, rounds=3)      # [(a, b), ...], the first side swapped each round
    ratio = median_ratio(rounds)                             # median of b / a over the rounds
    table(["round", "a", "b", "b/a"], rows); save(path, {...})
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def alternate(first: Callable[[], Any], second: Callable[[], Any], rounds: int) -> list[tuple[Any, Any]]:
    """``rounds`` pairs of (first(), second()), run back to back, which goes first swapped each round."""
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        pairs.append((a, b))
        print(f"round {i + 1}/{rounds} done at {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    return pairs


def median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    """The median over rounds of second / first."""
    return statistics.median(b / a for a, b in pairs if a)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, columns as wide as their widest cell; printed and returned."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def save(path: str | Path | None, figures: dict) -> None:
    """Write ``figures`` (with the time of the run) as JSON, if a path is given."""
    if path:
        Path(path).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), **figures}, indent=1) + "\n")
