"""Quantized KV caches under SelfExtend (neighbor G4 W2048) on the bundled model: what each type costs in
perplexity, retrieval, memory and speed, and how its error grows with repeated K-shifts.

For each cache type (f16, q8_0, q4_0, and q8_0/q4_0 with llama.cpp's Hadamard rotation of K turned off,
which only a build with our K-shift fix survives):
- one ingestion of --tokens tokens (26,000 by default, within what G4 W2048 reaches) with every token's
  logits: perplexity of the first 12k tokens, per 2k bucket up to 12k, and of the 2k tokens after 8k, 16k
  and 24k (keys there have been shifted by every grouping step before them);
- a pass-key (five digits) and a name hidden in ~12k tokens, at depths 0.25/0.5/0.75, greedy answers;
- the KV bytes of the 12k state as llama.cpp serialises it, against f16's;
- the K-shift probe's KL (selfextend_local.engine.kshift);
and the ingestion speed of each at 12k, side by side in lockstep (scripts/bench_ingest.py's runners).
Writes a table on stdout and --json (docs/kv.json is what scripts/make_results.py puts in RESULTS.md).

    python scripts/bench_kv.py --json docs/kv.json     # hours on two cores (12k ingestions run ~70 tok/s)
    python scripts/bench_kv.py --tokens 12288 --depths 0.5 --retrieval-configs f16,q8_0,q4_0 --speed-repeats 0 \
        --json docs/kv.json                          # about 40 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import llama_cpp
import numpy as np

from selfextend_local.engine import kshift
from selfextend_local.engine.generate import generate
from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import RuntimeSettings, SamplingSettings
from selfextend_local.evaluation import passkey as pk
from selfextend_local.evaluation.perplexity import token_nlls
from selfextend_local.locate import load_model
from selfextend_local.tasks.corpus import long_tokens

GROUP, WINDOW = 4, 2048
CONFIGS = {  # name -> (cache type, Hadamard rotation of a quantized K)
    "f16": ("f16", True),
    "q8_0": ("q8_0", True),
    "q8_0/no-rot": ("q8_0", False),
    "q4_0": ("q4_0", True),
    "q4_0/no-rot": ("q4_0", False),
}
NAMES = ("Ottoline Bramwell", "Casimir Dunleavy", "Perpetua Vance")


class Rotation:
    """LLAMA_ATTN_ROT_DISABLE around a context's creation (llama.cpp reads it when the cache is made)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        if not self.on:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"

    def __exit__(self, *exc) -> None:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)


def plan_for(model, n_tokens: int) -> Plan:
    return Plan(GROUP, WINDOW, "neighbor", "auto", align_cells(n_tokens), model.info.n_ctx_train, "bench_kv")


def perplexity(model, runtime, tokens, rotation: bool) -> dict:
    """Every token's NLL in one ingestion; the figures of the first 12k, and of 2k after 8k/16k/24k."""
    with Rotation(rotation):
        session = Session(model, plan_for(model, len(tokens)), runtime)
    try:
        start = time.perf_counter()
        nll = token_nlls(session, tokens)
        seconds = time.perf_counter() - start
        kv_bytes = llama_cpp.llama_state_seq_get_size(session.ctx, 0)
    finally:
        session.close()

    def ppl(a: int, b: int) -> float:
        return float(np.exp(nll[a:b].mean()))

    first = min(12288, len(nll))
    return {
        "ppl_12k": ppl(0, first),
        "buckets_12k": [ppl(a, a + 2048) for a in range(0, first, 2048)],
        "after": {f"{k // 1024}k": ppl(k, k + 2048) for k in (8192, 16384, 24576) if k + 2048 <= len(nll)},
        "ingest_seconds": seconds,
        "kv_bytes_all": kv_bytes,
    }


def needle_prompt(model, name: str, depth: float, length: int) -> list[int]:
    """A name stated once in filler text of about ``length`` tokens, then the question."""
    filler = model.tokenize(pk.FILLER, add_special=False)
    fact = model.tokenize(f"The lighthouse keeper's name is {name}. Remember the name {name}. ", add_special=False)
    ask = model.tokenize("\nWhat is the lighthouse keeper's name? The lighthouse keeper's name is", add_special=False)
    head = model.tokenize(pk.INTRO)
    reps = max(1, (length - len(head) - len(fact) - len(ask)) // len(filler))
    before = round(depth * reps)
    return head + filler * before + fact + filler * (reps - before) + ask


def retrieval(model, runtime, rotation: bool, depths: list[float], length: int = 12288) -> dict:
    sampling = SamplingSettings(temperature=0, max_tokens=8)
    found = {"passkey": [], "name": []}
    for i, depth in enumerate(depths):
        trial = pk.Trial("digits", length, depth, i, pk.make_key("digits", i))
        prompts = {"passkey": (pk.trial_tokens(model, trial), trial.key)}
        prompts["name"] = (needle_prompt(model, NAMES[i], depth, length), NAMES[i].split()[0])
        for kind, (prompt, key) in prompts.items():
            with Rotation(rotation):
                session = Session(model, plan_for(model, len(prompt) + 8), runtime)
            try:
                answer = generate(session, prompt, sampling)[0]
            finally:
                session.close()
            found[kind].append(pk.answered(answer, key))
    return {kind: f"{sum(v)}/{len(v)}" for kind, v in found.items()}


def state_bytes_12k(model, runtime, tokens, rotation: bool) -> int:
    with Rotation(rotation):
        session = Session(model, plan_for(model, len(tokens)), runtime)
    try:
        session.ingest(tokens)
        return llama_cpp.llama_state_seq_get_size(session.ctx, 0)
    finally:
        session.close()


def probe_kl(model, runtime, rotation: bool) -> float | None:
    with Rotation(rotation):
        return kshift.probe(model, runtime)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=26000)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--depths", default="0.25,0.5,0.75", help="where the pass-key and the name are hidden")
    parser.add_argument("--retrieval-configs", default=None, help="the configs retrieval runs for (default: all)")
    parser.add_argument(
        "--speed-repeats",
        type=int,
        default=2,
        help="lockstep ingestion passes, fastest chunk kept (0: the speed of each perplexity run, one at a time)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = load_model(None)
    tokens = long_tokens(model, args.tokens)
    version = llama_cpp.__version__
    results = {}
    for name in args.configs.split(","):
        kv_type, rotation = CONFIGS[name]
        if not rotation and kshift.patch_level(version) < 2:
            print(f"{name}: skipped (this llama.cpp, {version}, crashes shifting it)", file=sys.stderr)
            continue
        runtime = replace(RuntimeSettings(), kv_type=kv_type)
        print(f"{name}...", file=sys.stderr, flush=True)
        row = {"probe_kl": probe_kl(model, runtime, rotation)}
        row.update(perplexity(model, runtime, tokens, rotation))
        if len(tokens) == 12288:  # the perplexity run's state is the 12k state
            row["kv_bytes_12k"] = row["kv_bytes_all"]
        else:
            row["kv_bytes_12k"] = state_bytes_12k(model, runtime, tokens[:12288], rotation)
        if args.speed_repeats == 0 and len(tokens) == 12288:
            row["ingest_tps_12k"] = len(tokens) / row["ingest_seconds"]
        if not args.skip_retrieval and name in (args.retrieval_configs or args.configs).split(","):
            row.update(retrieval(model, runtime, rotation, [float(d) for d in args.depths.split(",")]))
        results[name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    names = [n for n in args.configs.split(",") if n in results]
    speeds = ingestion_speeds(model, tokens[:12288], names, args.speed_repeats) if args.speed_repeats else {}
    for name, tps in speeds.items():
        results[name]["ingest_tps_12k"] = tps
    print_table(results, version, len(tokens))
    if args.json:
        with open(args.json, "w") as f:
            date = time.strftime("%Y-%m-%d")
            command = "python scripts/bench_kv.py " + " ".join(sys.argv[1:])
            meta = {"date": date, "command": command, "llama_cpp": version, "tokens": len(tokens)}
            meta |= {"depths": args.depths, "speed_repeats": args.speed_repeats}
            json.dump({**meta, "results": results}, f, indent=1)
    return 0


def ingestion_speeds(model, tokens: list[int], names: list[str], repeats: int) -> dict[str, float]:
    """Tokens/s of a neighbor G4 W2048 ingestion with each cache, in lockstep chunk by chunk (fastest pass)."""
    from bench_ingest import kv_maker, lockstep_pass

    runtime = RuntimeSettings()
    kinds = {name: CONFIGS[name][0] + ("" if CONFIGS[name][1] else "-norot") for name in names}
    cells = align_cells(len(tokens))
    makers = {name: kv_maker(model, cells, runtime, GROUP, WINDOW, kind) for name, kind in kinds.items()}
    best: dict[str, list[float]] = {}
    for _ in range(repeats):
        runners = {name: make() for name, make in makers.items()}
        try:
            for name, chunks in lockstep_pass(runners, tokens, runtime.batch).items():
                best[name] = [min(a, b) for a, b in zip(best[name], chunks)] if name in best else chunks
        finally:
            for runner in runners.values():
                runner.close()
    return {name: len(tokens) / sum(chunks) for name, chunks in best.items()}


def print_table(results: dict, version: str, n_tokens: int) -> None:
    base = results.get("f16")
    print(f"\nneighbor G{GROUP} W{WINDOW}, bundled SmolLM2-135M Q4_1, llama-cpp-python {version}, {n_tokens} tokens")
    head = ["cache", "PPL 12k", "vs f16", "KV bytes 12k", "vs f16", "after 8k", "after 16k", "after 24k"]
    head += ["pass-key", "name", "probe KL", "ingest tok/s", "vs f16"]
    print(" | ".join(head))
    for name, r in results.items():
        vs = f"{r['ppl_12k'] / base['ppl_12k']:.4f}" if base else "-"
        mem = f"{r['kv_bytes_12k'] / base['kv_bytes_12k']:.3f}" if base else "-"
        after = [f"{r['after'].get(k, float('nan')):.2f}" for k in ("8k", "16k", "24k")]
        cells = [name, f"{r['ppl_12k']:.3f}", vs, f"{r['kv_bytes_12k']:,}", mem, *after]
        cells += [
            r.get("passkey", "-"),
            r.get("name", "-"),
            f"{r['probe_kl']:.4f}" if r["probe_kl"] is not None else "-",
        ]
        tps = r.get("ingest_tps_12k")
        cells += [f"{tps:.1f}" if tps else "-", f"{tps / base['ingest_tps_12k']:.3f}" if tps and base else "-"]
        print(" | ".join(cells))
    if base:
        for name, r in results.items():
            buckets = ", ".join(f"{p:.2f}" for p in r["buckets_12k"])
            print(f"{name}: per 2k bucket up to 12k: {buckets}")


if __name__ == "__main__":
    sys.exit(main())
