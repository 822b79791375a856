"""Prompt-ingestion speed: a bare llama-cpp-python decode loop, the engine's plain path, and SelfExtend.

One run, one prompt (the pydoc text), one context size and chunk size for every method. The methods run
in lockstep, chunk by chunk in rotating order, each in its own context, so that the noise of this shared
machine falls on all of them alike. With --repeats R the whole pass is repeated, and each method's time
is the sum over chunks of that chunk's fastest run (noise only ever adds time).

With --mode whole each method ingests the whole prompt in one call, as the tools do, and the device is
synchronised only at the end (use it on a GPU, where per-chunk timing would add a sync the tools never
make; on the H100 the edits still did not overlap the computation); methods take turns, and each keeps
its fastest of --repeats.

    python scripts/bench_ingest.py --tokens 8192
    python scripts/bench_ingest.py --tokens 32768 --group 8 --window 2048 --gpu-layers 99 --mode whole  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import llama_cpp

from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import RuntimeSettings
from selfextend_local.locate import load_model
from selfextend_local.tasks.corpus import long_tokens


class BareLoop:
    """What a user would write with llama-cpp-python alone: chunks at explicit positions, last logits."""

    def __init__(self, model, n_ctx: int, runtime: RuntimeSettings) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = runtime.batch
        params.n_ubatch = min(runtime.batch, 512)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = runtime.threads
        self.ctx = llama_cpp.llama_init_from_model(model.handle, params)
        self.batch = llama_cpp.llama_batch_init(runtime.batch, 0, 1)
        self.n_past = 0
        self.division = "-"

    def ingest(self, part: list[int], last: bool) -> None:
        batch = self.batch
        batch.n_tokens = len(part)
        for i, token in enumerate(part):
            batch.token[i] = token
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = last and i == len(part) - 1
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.n_past += len(part)

    def ingest_all(self, tokens: list[int], chunk: int) -> None:
        for offset in range(0, len(tokens), chunk):
            self.ingest(tokens[offset : offset + chunk], offset + chunk >= len(tokens))
        llama_cpp.llama_synchronize(self.ctx)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


class OnePerPosition:
    """Emulated division as it was first written, one ``seq_add`` per position (--per-position)."""

    name = "emulated, one shift per position"

    def divide(self, mem, seq: int, p0: int, p1: int, d: int) -> None:
        for p in range(max(p0, 0), p1):
            if p // d != p:
                llama_cpp.llama_memory_seq_add(mem, seq, p, p + 1, p // d - p)


class EngineRun:
    """The engine's session: plain when group is 1, else SelfExtend with the given schedule."""

    def __init__(
        self, model, n_ctx: int, runtime: RuntimeSettings, group: int, window: int, schedule: str, divider=None
    ) -> None:
        plan = Plan(group, window, schedule, "auto", n_ctx, model.info.n_ctx_train, "benchmark")
        self.session = Session(model, plan, runtime)
        if divider and self.session.divider and self.session.divider.name == "emulated":
            self.session.divider = divider
        self.ctx = self.session.ctx
        self.division = self.session.divider.name if self.session.divider else "-"
        self.edit_seconds = 0.0  # time spent making position edits (the part of the overhead that is ours)
        self.shifted_decodes = 0
        apply = self.session.apply

        def timed_apply(ops) -> None:
            start = time.perf_counter()
            apply(ops)
            self.edit_seconds += time.perf_counter() - start
            self.shifted_decodes += bool(ops)

        self.session.apply = timed_apply

    def ingest(self, part: list[int], last: bool) -> None:
        self.session.ingest(part)

    def ingest_all(self, tokens: list[int], chunk: int) -> None:
        self.session.ingest(tokens)
        llama_cpp.llama_synchronize(self.session.ctx)

    def close(self) -> None:
        self.session.close()


def kv_maker(model, n_ctx: int, runtime: RuntimeSettings, group: int, window: int, kind: str):
    """A maker of a neighbor run with a cache of ``kind`` (``TYPE-norot``: LLAMA_ATTN_ROT_DISABLE set while
    the context is made, when llama.cpp reads it)."""
    kv_type, _, rot = kind.partition("-")

    def make() -> EngineRun:
        if rot == "norot":
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
        try:
            return EngineRun(model, n_ctx, replace(runtime, kv_type=kv_type), group, window, "neighbor")
        finally:
            os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)

    return make


def lockstep_pass(runners: dict, tokens: list[int], chunk: int) -> dict[str, list[float]]:
    """Feed every runner the same chunks, rotating who goes first; seconds per chunk per runner."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for k, offset in enumerate(range(0, len(tokens), chunk)):
        part = tokens[offset : offset + chunk]
        last = offset + chunk >= len(tokens)
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            runners[name].ingest(part, last)
            llama_cpp.llama_synchronize(runners[name].ctx)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def whole_pass(runners: dict, tokens: list[int], chunk: int, turn: int) -> dict[str, list[float]]:
    """Each runner ingests everything in one call, in turn; seconds as a one-element list per runner."""
    names = list(runners)
    seconds: dict[str, list[float]] = {}
    for name in names[turn % len(names) :] + names[: turn % len(names)]:
        start = time.perf_counter()
        runners[name].ingest_all(tokens, chunk)
        seconds[name] = [time.perf_counter() - start]
    return {name: seconds[name] for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M Q4_1")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument(
        "--per-position", action="store_true", help="also time neighbor with one seq_add per divided position"
    )
    parser.add_argument("--mode", choices=["lockstep", "whole"], default="lockstep")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument(
        "--kv-types",
        default=None,
        help="compare these KV cache types under neighbor G W (e.g. f16,q8_0,q4_0; q8_0-norot: without the "
        "Hadamard rotation of K)",
    )
    args = parser.parse_args()

    runtime = RuntimeSettings(
        gpu_layers=args.gpu_layers, batch=args.batch, **({"threads": args.threads} if args.threads else {})
    )
    model = load_model(args.model, runtime)
    tokens = long_tokens(model, args.tokens)
    n_ctx = align_cells(args.tokens)
    G, W = args.group, args.window
    makers = {
        "bare llama-cpp-python loop": lambda: BareLoop(model, n_ctx, runtime),
        "engine plain": lambda: EngineRun(model, n_ctx, runtime, 1, W, "neighbor"),
        f"neighbor G{G} W{W}": lambda: EngineRun(model, n_ctx, runtime, G, W, "neighbor"),
        f"llamacpp G{G} W{W}": lambda: EngineRun(model, n_ctx, runtime, G, W, "llamacpp"),
    }
    if args.kv_types:  # the cache types side by side instead: neighbor G W with each
        makers = {"engine plain": makers["engine plain"]} | {
            f"neighbor G{G} W{W} {kind}": kv_maker(model, n_ctx, runtime, G, W, kind)
            for kind in args.kv_types.split(",")
        }
    if args.per_position:
        makers[f"neighbor G{G} W{W}, 1 shift/pos"] = lambda: EngineRun(
            model, n_ctx, runtime, G, W, "neighbor", OnePerPosition()
        )
    times: dict[str, list[list[float]]] = {name: [] for name in makers}
    division = "-"
    for r in range(args.repeats):
        runners = {name: make() for name, make in makers.items()}
        division = next((x.division for x in runners.values() if x.division != "-"), division)
        try:
            if args.mode == "whole":
                measured = whole_pass(runners, tokens, runtime.batch, r)
            else:
                measured = lockstep_pass(runners, tokens, runtime.batch)
            for name, chunks in measured.items():
                times[name].append(chunks)
                total = sum(chunks)
                edits = getattr(runners[name], "edit_seconds", 0.0)
                shifted = getattr(runners[name], "shifted_decodes", 0)
                print(
                    f"  pass {r + 1}: {name:28s} {total:7.2f} s  {len(tokens) / total:8.1f} tok/s  "
                    f"(position edits {edits:.3f} s before {shifted} decodes)",
                    file=sys.stderr,
                )
        finally:
            for runner in runners.values():
                runner.close()

    tps = {name: len(tokens) / sum(map(min, zip(*passes))) for name, passes in times.items()}
    plain = tps["engine plain"]
    names = list(makers)
    how = f"lockstep, fastest of {args.repeats} per chunk"
    if args.mode == "whole":
        how = f"whole prompt in one call, fastest of {args.repeats}"
    print(
        f"\n{len(tokens)} tokens, context {n_ctx}, chunk {runtime.batch}, threads {runtime.threads}, "
        f"gpu layers {runtime.gpu_layers}, division {division}, {how}"
    )
    print(f"{'method':30s} {'tok/s':>9s} {'ratio to plain':>15s}")
    for name in names:
        print(f"{name:30s} {tps[name]:9.1f} {tps[name] / plain:15.3f}")
    if names[0] != "engine plain":
        print(f"\nengine plain / bare loop: {plain / tps[names[0]]:.3f}")
    for name in names[2:]:
        print(f"{name} / {names[1]}: {tps[name] / tps[names[1]]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"tokens": len(tokens), "mode": args.mode, "seconds": times, "tokens_per_second": tps}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
