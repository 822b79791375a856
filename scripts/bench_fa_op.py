"""One layer's flash attention, the bundled model's shape, with each CPU kernel on the same K and V, side by
side in one process: the stock per-row kernel (GGML_CPU_FA_CONVERT=0; for f16 llama.cpp's own tiles), patch
0003's tiles (GGML_CPU_FA_KERNEL=tiled) and patch 0005's GQA tiles, alternating in rounds (benchlib), for
prompt batches of 512, 64 and 16 tokens and a one-token decode, at cache depths of 8k and 32k cells.

    python scripts/bench_fa_op.py --types q8_0,f16,q4_0 --depths 8192,32768 --out docs/fa_op.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchlib import save, table

from selfextend_local.engine.settings import default_threads
from selfextend_local.evaluation.fa_op import FlashAttention

KERNELS = {"stock": ("0", "tiled"), "tiled": ("1", "tiled"), "gqa": ("1", "gqa")}


def measure(kind: str, n_q: int, n_kv: int, rounds: int, repeats: int) -> dict:
    """Median ms of each kernel over ``rounds`` rounds (the kernels in turn, the first swapped each round)."""
    names = list(KERNELS) if kind != "f16" else ["tiled", "gqa"]  # f16's stock kernel is the tiled one
    best: dict[str, list[float]] = {name: [] for name in names}
    with FlashAttention(kind, n_q, n_kv, threads=default_threads()) as op:
        op.seconds(*KERNELS["gqa"], 1)  # warm
        for i in range(rounds):
            for name in names if i % 2 == 0 else reversed(names):
                best[name].append(op.seconds(*KERNELS[name], repeats))
        flops = op.flops(n_kv)
    ms = {name: 1000 * sorted(times)[len(times) // 2] for name, times in best.items()}
    return {"kind": kind, "n_q": n_q, "n_kv": n_kv, "ms": ms, "gflops": {k: flops / v / 1e6 for k, v in ms.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="q8_0,f16,q4_0")
    parser.add_argument("--depths", default="8192,32768")
    parser.add_argument("--batches", default="512,64,16,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results, rows = [], []
    for kind in args.types.split(","):
        for n_kv in map(int, args.depths.split(",")):
            for n_q in map(int, args.batches.split(",")):
                r = measure(kind, n_q, n_kv, args.rounds, args.repeats)
                results.append(r)
                ms, gf = r["ms"], r["gflops"]
                stock = f"{ms['stock']:.1f}" if "stock" in ms else "(tiled)"
                rows.append([kind, n_kv, n_q, stock, ms["tiled"], ms["gqa"], gf["gqa"], ms["tiled"] / ms["gqa"]])
                print(f"{kind} {n_kv} {n_q}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    table(["kv", "cells", "tokens", "stock ms", "tiled ms", "gqa ms", "gqa Gflop/s", "tiled/gqa"], rows)
    save(args.out, {"threads": default_threads(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
