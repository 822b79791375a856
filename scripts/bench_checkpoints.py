"""What a long reading's checkpoints cost, and whether the time left it shows is right at length.

A ~32k-token text (the pinned pydoc text) is read under SelfExtend G16 W1024 twice a round, with and
without checkpoints (engine/checkpoint.py, at their default interval, into a temporary cache), alternating
which goes first (benchlib). Printed: each reading's seconds and their ratio, the checkpoints written and
the bytes they wrote; then, for the readings, the time left the product shows (engine/eta.py's cost
model, fed the reading's own progress as the CLI, the page and the API feed it) at 10, 25, 50, 75 and 90%
of the reading against the time it then really took, with the average-rate estimate at the same points
and the cost model fitted in hindsight to the whole reading (its error is the model's own; the rest of the
shown estimate's error is the machine's pace changing after the point), and the cost model started from the
ratio of its two terms that the reading before it ended with (engine/paces.py keeps it per setup: what a
second reading of the same setup shows).

    python scripts/bench_checkpoints.py --tokens 32768 --kv-type q8_0 --rounds 1 --out docs/checkpoints.json

With --marks, no reading: the same time-left table for the readings of a scripts/long_read.py or
scripts/ceiling.py JSON (their chunks' marks), e.g. the 100k-token read, split into processes by its
checkpoints.

    python scripts/bench_checkpoints.py --marks docs/long_read.json
    python scripts/bench_checkpoints.py --marks docs/ceiling.json --prior-from docs/long_read.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import alternate, median_ratio, save, table

from selfextend_local.engine.checkpoint import Checkpoints
from selfextend_local.engine.eta import Clock
from selfextend_local.engine.kvcache import KVCache
from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import CHECKPOINT_SECONDS, RuntimeSettings
from selfextend_local.locate import load_model
from selfextend_local.tasks.corpus import long_tokens

GROUP, WINDOW = 16, 1024
POINTS = (0.10, 0.25, 0.50, 0.75, 0.90)


def reading(model, tokens: list[int], kv_type: str, checkpoints: Checkpoints | None) -> dict:
    """Read ``tokens`` in a fresh session; its seconds and the (done, time) of every step."""
    plan = Plan(GROUP, WINDOW, "neighbor", "auto", align_cells(len(tokens)), model.info.n_ctx_train, "bench")
    marks: list[tuple[int, float]] = []
    with Session(model, plan, RuntimeSettings(kv_type=kv_type)) as session:
        start = time.perf_counter()
        marks.append((0, start))
        session.ingest(tokens, lambda done, total: marks.append((done, time.perf_counter())), checkpoints=checkpoints)
        seconds = time.perf_counter() - start
    out = {"seconds": seconds, "marks": [(d, t - start) for d, t in marks]}
    if checkpoints is not None:
        out.update(writes=checkpoints.writes, bytes=checkpoints.bytes_written, write_seconds=checkpoints.write_seconds)
    return out


def estimates(marks: list[tuple[int, float]], total: int, prior: float | None = None) -> list[dict]:
    """At each point of the reading: the time left the cost model says, the average rate's, the same cost
    model fitted in hindsight to the whole reading (what is left when the machine's pace does not change
    midway: the model's own error), the cost model started from ``prior`` (the ratio an earlier reading of
    the same setup left, as engine/paces.py keeps it: what a second reading shows), and the truth."""
    clock, primed, rows, end = Clock(), Clock(prior=prior), [], marks[-1][1]
    hindsight = Clock()
    for done, at in marks:
        hindsight.mark(done, at)
    points = list(POINTS)
    for done, at in marks:
        clock.mark(done, at)
        primed.mark(done, at)
        if points and done >= points[0] * total and done < total:
            shown = clock.seconds_left(done, total)
            linear = (total - done) / (done / at) if at > 0 else None
            fitted = hindsight.seconds_left(done, total)
            row = {"at": points.pop(0), "done": done, "shown": shown, "linear": linear, "hindsight": fitted}
            row["primed"] = primed.seconds_left(done, total) if prior is not None else None
            rows.append(row | {"true": end - at})
    return rows


def ratio_of(marks: list[tuple[int, float]]) -> float | None:
    """The ratio of the cost model's two terms fitted to a whole reading (what engine/paces.py keeps)."""
    clock = Clock()
    for done, at in marks:
        clock.mark(done, at)
    return clock.ratio()


HEADER = [
    "round",
    "reading",
    "at",
    "left really (s)",
    "left shown (s)",
    "error",
    "average rate's (s)",
    "its error",
    "whole reading's fit (s)",
    "its error",
    "from the last reading's ratio (s)",
    "its error",
]


def _row(e: dict) -> list:
    """The table's columns after the reading's name: the point, the truth, and each estimate with its error."""
    estimates_ = [_left(e.get(key), e["true"]) for key in ("shown", "linear", "hindsight", "primed")]
    return [f"{e['at']:.0%}", e["true"], *(x for pair in estimates_ for x in pair)]


def readings_of(path: Path) -> list[tuple[str, list, int]]:
    """The readings of a long_read.py or ceiling.py JSON that kept their marks: name, marks, tokens."""
    out, figures = [], json.loads(path.read_text())
    for result in figures.get("results") or figures.get("runs", []):  # long_read.py's, or ceiling.py's
        marks = [tuple(m) for m in result.get("marks", []) if m[0] > 0]
        if marks:
            total = result.get("tokens") or marks[-1][0]
            out.append((f"{result['kv_type']} {result.get('kernel', '')} {total:,}".replace("  ", " "), marks, total))
    return out


def time_left_of(path: Path, prior_from: Path | None = None) -> int:
    """The time-left table of each reading in a long_read.py or ceiling.py JSON that kept its marks; with
    ``prior_from``, started from the ratio of that file's readings too (their median)."""
    ratios = [r for _, marks, _ in readings_of(prior_from) if (r := ratio_of(marks))] if prior_from else []
    prior = statistics.median(ratios) if ratios else None
    rows = []
    for name, marks, total in readings_of(path):
        for e in estimates(marks, total, prior):
            rows.append([1, name, *_row(e)])
        if first := first_shown(marks, total):
            print(f"{name}: first time left shown at {first[0]:.1%} of the reading, {first[1]:+.1%} off")
    table(HEADER, rows)
    return 0


def first_shown(marks: list[tuple[int, float]], total: int) -> tuple[float, float] | None:
    """Where in the reading the cost model first says a time left (a share of it), and that estimate's error."""
    clock, end = Clock(), marks[-1][1]
    for done, at in marks:
        clock.mark(done, at)
        if done < total and (shown := clock.seconds_left(done, total)) is not None:
            return done / total, (shown - (end - at)) / (end - at)
    return None


def _json_file(path: Path) -> bool:
    if not path.is_file():  # (not /dev/zero: it never ends)
        return False
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _left(estimate: float | None, true: float) -> tuple:
    """An estimate of the time left and its error against the truth (dashes while there is none)."""
    if estimate is None:
        return "-", "-"
    return estimate, f"{(estimate - true) / true:+.1%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--kv-type", default="q8_0")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--every", type=float, default=CHECKPOINT_SECONDS, help="seconds between checkpoints")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--marks", type=Path, help="a long_read.py JSON: its readings' time left, no reading")
    parser.add_argument("--prior-from", type=Path, help="with --marks: another such JSON, whose ratio primes the clock")
    args = parser.parse_args()
    if args.marks:
        for name, path in (("--marks", args.marks), ("--prior-from", args.prior_from)):
            if path is not None and not _json_file(path):
                parser.error(f"{name}: {path} is not a JSON file; name a long_read.py or ceiling.py JSON")
        return time_left_of(args.marks, args.prior_from)
    model = load_model()
    tokens = long_tokens(model, args.tokens)
    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as tmp:

        def with_checkpoints() -> dict:
            cache = KVCache(Path(tmp) / f"kv-{time.time_ns()}", limit=1 << 40)
            return reading(model, tokens, args.kv_type, Checkpoints(cache, tokens, args.every))

        pairs = alternate(lambda: reading(model, tokens, args.kv_type, None), with_checkpoints, args.rounds)
    rows = [
        [
            i + 1,
            a["seconds"],
            b["seconds"],
            b["seconds"] / a["seconds"],
            b["writes"],
            b["bytes"] / 2**20,
            b["write_seconds"],
        ]
        for i, (a, b) in enumerate(pairs)
    ]
    table(["round", "without (s)", "with (s)", "with/without", "checkpoints", "MiB written", "writing (s)"], rows)
    ratio = median_ratio([(a["seconds"], b["seconds"]) for a, b in pairs])
    print(f"median with/without: {ratio:.3f} ({args.tokens:,} tokens, {args.kv_type}, every {args.every:g} s)")
    clock_rows, prior = [], None
    for i, pair in enumerate(pairs):
        for side, run in zip(("without", "with"), pair):  # each reading primed by the one before it
            for e in estimates(run["marks"], args.tokens, prior):
                clock_rows.append([i + 1, side, *_row(e)])
            prior = ratio_of(run["marks"])
    table(HEADER, clock_rows)
    save(
        args.out,
        {
            "tokens": args.tokens,
            "kv_type": args.kv_type,
            "every": args.every,
            "ratio": ratio,
            "rounds": [{"without": a, "with": b} for a, b in pairs],
            "time_left": clock_rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
