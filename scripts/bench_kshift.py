"""The K-shift of the moved cells only (patches/0004) against llama.cpp's own of every cell, in one run.

llama.cpp's K-shift (applied at the decode after a ``seq_add``/``seq_div``, so at every SelfExtend grouping
step) rotates every cell of every stream: a server's context has one stream a slot, each sized for the
longest request, so the cost of a step grows with the slots and their size, not with what moved. Our build
rotates only the cells that moved; LLAMA_KV_SHIFT_ALL_CELLS=1 (read at every K-shift) gives llama.cpp's own,
so both run in this one process on the same weights, alternating.

1. One K-shift: after 2,048 cached tokens, a one-token decode following a move of the last 1,024
   cells by one position (on, then back at the next), minus one without, median of --repeats; in the
   server's shape (``serve``'s default: 4 slots of the cells the model family's setting reaches) and in
   one stream sized for a 10k-token document (as ``qa`` reads it).
2. A reading: a ~10k-token document read under G4 W2048 into one slot of the server's shape, as the page
   reads it (held for a question after it), with each K-shift; best of --rounds, every run listed.

    python scripts/bench_kshift.py                                   # f16 and q8_0, 2 rounds
    python scripts/bench_kshift.py --types f16,q8_0,q4_0 --rounds 3 --json docs/kshift.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import llama_cpp

from selfextend_local.engine.build import KSHIFT_MOVED_CELLS, patch_level
from selfextend_local.engine.context import Context, Span
from selfextend_local.engine.model import Model
from selfextend_local.engine.scheduler import Scheduler, size
from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings
from selfextend_local.engine.slots import Held, Request
from selfextend_local.paths import bundled_model
from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.tasks.qa import QUESTION_BUDGET, document_prompt

ALL_CELLS = "LLAMA_KV_SHIFT_ALL_CELLS"
WAYS = ("every cell", "moved cells")
EXTEND = ExtendSettings(group=4, window=2048)


@contextmanager
def shifting(way: str):
    """The K-shifts in this block rotate ``way``: every cell (llama.cpp's own) or the moved cells (ours)."""
    if way == "every cell":
        os.environ[ALL_CELLS] = "1"
    try:
        yield
    finally:
        os.environ.pop(ALL_CELLS, None)


def one_shift(model: Model, runtime: RuntimeSettings, cells: int, slots: int, repeats: int) -> dict[str, float]:
    """Milliseconds one K-shift of 1,024 cells adds to a one-token decode, each way (median of ``repeats``)."""
    context = Context(model, cells, runtime, n_seq=slots)
    try:
        tokens = [(7 * i + 3) % 2000 + 100 for i in range(2048)]
        for start in range(0, 2048, 512):
            context.decode([Span(tokens[start : start + 512], start, 0, "none")])
        spent: dict[str, list[float]] = {"plain": [], **{way: [] for way in WAYS}}
        step = 1
        for r in range(repeats):
            for way in ("plain", *WAYS) if r % 2 == 0 else (*WAYS[::-1], "plain"):
                with shifting(way):
                    if way != "plain":  # the last 1,024 cells one position on, then back at the next shift
                        first = 1024 if step > 0 else 1025
                        llama_cpp.llama_memory_seq_add(context.mem, 0, first, first + 1024, step)
                        step = -step
                    at = llama_cpp.llama_memory_seq_pos_max(context.mem, 0) + 1
                    start = time.perf_counter()
                    context.decode([Span([200], at, 0, "last")])
                    spent[way].append(time.perf_counter() - start)
                llama_cpp.llama_memory_seq_rm(context.mem, 0, at, -1)
        plain = statistics.median(spent["plain"])
        return {way: 1000 * (statistics.median(spent[way]) - plain) for way in WAYS} | {"decode": 1000 * plain}
    finally:
        context.close()


def read_once(model: Model, tokens: list[int], runtime: RuntimeSettings, way: str) -> float:
    """Tokens a second reading ``tokens`` into one slot of the server's shape, K-shifts rotating ``way``."""
    with Scheduler.create(model, runtime, capacity=size(model, runtime, EXTEND, 4)) as scheduler:
        scheduler.warm_up()
        held = Held(len(tokens), QUESTION_BUDGET)
        scheduler.submit(Request(list(tokens), extend=EXTEND, generate=False, held=held))
        with shifting(way):
            start = time.perf_counter()
            scheduler.run()
            return len(tokens) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--chars", type=int, default=42000, help="characters of the pydoc text (42000: ~10k tokens)")
    parser.add_argument("--rounds", type=int, default=2, help="readings of each way (0: the one K-shift only)")
    parser.add_argument("--repeats", type=int, default=7, help="one-K-shift timings of each way")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if patch_level(llama_cpp.__version__) < KSHIFT_MOVED_CELLS:
        sys.exit(f"llama-cpp-python {llama_cpp.__version__} lacks patches/0004: run the README's install first")
    model = Model(bundled_model())
    tokens, _ = document_prompt(model, pydoc_text()[: args.chars])
    figures: dict = {"date": time.strftime("%Y-%m-%d"), "tokens": len(tokens), "rounds": args.rounds, "types": {}}
    for kv_type in args.types.split(","):
        runtime = RuntimeSettings(kv_type=kv_type)
        server = size(model, runtime, EXTEND, 4)
        doc_cells = len(tokens) + QUESTION_BUDGET
        shapes = {
            f"{server.slots} x {server.cells:,}": (server.cells, server.slots),
            f"1 x {doc_cells:,}": (doc_cells, 1),
        }
        shift = {name: one_shift(model, runtime, cells, n, args.repeats) for name, (cells, n) in shapes.items()}
        runs: dict[str, list[float]] = {way: [] for way in WAYS}
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                runs[way].append(read_once(model, tokens, runtime, way))
                print(f"{kv_type} reading {r + 1}, {way}: {runs[way][-1]:.1f} tok/s", file=sys.stderr, flush=True)
        figures["types"][kv_type] = {"one_shift_ms": shift, "reading_tok_s": runs}
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def report(figures: dict) -> None:
    print("\none K-shift of 1,024 cells (ms; slots x cells a slot):")
    for kv_type, f in figures["types"].items():
        for shape, ms in f["one_shift_ms"].items():
            print(
                f"  {kv_type:5} {shape:>12}: every cell {ms['every cell']:8.1f}, moved cells {ms['moved cells']:6.1f}"
            )
    if figures["rounds"]:
        print(
            f"\n{figures['tokens']:,} tokens read under G4 W2048 in the server's shape "
            f"(tok/s, best of {figures['rounds']}):"
        )
        for kv_type, f in figures["types"].items():
            every, moved = (max(f["reading_tok_s"][way]) for way in WAYS)
            print(f"  {kv_type:5} every cell {every:6.1f}, moved cells {moved:6.1f}: {moved / every:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
