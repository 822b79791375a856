"""llama.cpp's own llama-bench at depth, built from the stock kernel's sources and from ours (issue 44).

Prompt processing of 512 tokens after --depth tokens already in the cache (`-p 512 -n 0 -d DEPTH`, flash
attention on), with f16 and q8_0 caches, from two builds of the same sdist (cached, as bench_fa_kernel.py
builds them): "stock" carries our patches except the two flash-attention kernels (0003, 0005), "patched"
all of them. Each build and type in turn, alternating which build goes first.

    python scripts/bench_depth.py --depth 8192 --out docs/depth.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_fa_kernel import bench_dir, build_bench, llama_bench
from benchlib import save, table

from selfextend_local import llama_build

KERNEL_PATCHES = ("0003", "0005")  # the flash-attention kernels; 0005 builds on 0003


def builds() -> dict[str, Path]:
    everything = llama_build.patches()
    stock = [p for p in everything if not p[0].startswith(KERNEL_PATCHES)]
    stock_binary = build_bench(bench_dir() / "stock", stock)
    return {"stock": stock_binary, "patched": build_bench(bench_dir() / "patched", everything)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=8192)
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    binaries = builds()
    results = []
    for kv in args.types.split(","):
        got: dict[str, list[float]] = {name: [] for name in binaries}
        for i in range(args.rounds):
            for name in list(binaries) if i % 2 == 0 else reversed(list(binaries)):
                tok_s = llama_bench(binaries[name], kv, ["-p", "512", "-n", "0", "-d", str(args.depth)], 1)
                got[name].append(tok_s)
                print(f"{kv} {name}: {tok_s:.1f} tok/s", file=sys.stderr, flush=True)
        median = {name: sorted(v)[len(v) // 2] for name, v in got.items()}
        results.append({"kv": kv, "depth": args.depth, "tok_s": got, "median": median})
    rows = []
    for r in results:
        stock, patched = r["median"]["stock"], r["median"]["patched"]
        rows.append([r["kv"], r["depth"], stock, patched, patched / stock])
    table(["cache", "depth", "stock tok/s", "patched tok/s", "patched / stock"], rows)
    save(args.out, {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
