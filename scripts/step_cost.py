"""What a draft's verification costs at depth: one sequence holding --depth tokens of the long-read text,
the time of one ``llama_decode`` of n generating tokens (every row's logits, as a drafted step asks), for
each n in --sizes, the order alternating each round; medians, and each over n = 1's. With --kernels, each
size under each CPU flash-attention kernel in turn (GGML_CPU_FA_KERNEL, read at every op: gqa is patches
0005 and 0006, short batches scored with the cells as vector lanes; gqa-gemm patch 0005's tiles alone;
tiled patch 0003's, which sends a batch under 64 tokens to the per-row kernel).

    python scripts/step_cost.py --depth 10000 --kv-type q8_0
    python scripts/step_cost.py --depth 10000 --kv-type f16 --sizes 1,2,3,5,9 --kernels gqa-gemm,gqa
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

KERNELS = ("gqa", "gqa-gemm", "tiled")  # GGML_CPU_FA_KERNEL's values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10000)
    parser.add_argument("--kv-type", default="q8_0")
    parser.add_argument("--sizes", default="1,2,3,4,5,9,17")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--kernels", default=None, help="e.g. gqa,tiled: each size under each kernel in turn")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    kernels = args.kernels.split(",") if args.kernels else [None]
    if unknown := [k for k in kernels if k not in (None, *KERNELS)]:
        parser.error(f"--kernels: {', '.join(unknown)} is not a kernel; name any of {', '.join(KERNELS)}")

    import llama_cpp

    from selfextend_local.engine.context import Span
    from selfextend_local.engine.planning import Plan, align_cells
    from selfextend_local.engine.session import Session
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import long_tokens

    model = load_model()
    tokens = long_tokens(model, args.depth + max(sizes))
    cells = align_cells(args.depth + max(sizes))
    plan = Plan(4, 2048, "neighbor", "auto", cells, model.info.n_ctx_train, "step_cost")  # the family's setting
    with Session(model, plan, RuntimeSettings(kv_type=args.kv_type)) as session:
        session.ingest(tokens[: args.depth])
        context = session.context
        memory = llama_cpp.llama_get_memory(context.ctx)
        at = llama_cpp.llama_memory_seq_pos_max(memory, 0) + 1  # positions are grouped under SelfExtend
        times: dict[tuple[str | None, int], list[float]] = {(k, n): [] for k in kernels for n in sizes}
        for round_ in range(args.rounds):
            for kernel in kernels if round_ % 2 else kernels[::-1]:
                if kernel is not None:
                    os.environ["GGML_CPU_FA_KERNEL"] = kernel
                for n in sizes if round_ % 2 else sizes[::-1]:
                    began = time.perf_counter()
                    context.decode([Span(tokens[args.depth : args.depth + n], at, 0, "all")])
                    times[kernel, n].append(time.perf_counter() - began)
                    llama_cpp.llama_memory_seq_rm(memory, 0, at, -1)
    for kernel in kernels:
        one = float(np.median(times[kernel, sizes[0]]))
        print(f"{args.kv_type}, {args.depth:,} tokens before the step" + (f", {kernel} kernel:" if kernel else ":"))
        for n in sizes:
            took = np.median(times[kernel, n])
            print(f"  n={n:<3d} {took * 1e3:7.1f} ms  ({took / one:.2f}x n={sizes[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
