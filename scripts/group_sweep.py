"""Same text, same depth, only the group differs: perplexity by 8k bucket of the first --tokens tokens of the
long-read text (scripts/long_read.py's) under SelfExtend with each --groups value, window --window, q8_0.

Does a large grouped position (near the training context) cost more than a coarse grouping? The planner
takes the smallest group that reaches the input; this shows what the larger ones would give instead.

    python scripts/group_sweep.py --tokens 24576 --groups 4,8,16
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--groups", default="4,8,16")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--kv-type", default="q8_0")
    args = parser.parse_args()

    from selfextend_local.engine.planning import Plan, align_cells, largest_position
    from selfextend_local.engine.session import Session
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.evaluation.perplexity import bucket_ppl, token_nlls
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import long_tokens

    model = load_model()
    tokens = long_tokens(model, args.tokens)
    for group in (int(g) for g in args.groups.split(",")):
        began = time.perf_counter()
        cells = align_cells(args.tokens)
        plan = Plan(group, args.window, "neighbor", "auto", cells, model.info.n_ctx_train, "group_sweep")
        with Session(model, plan, RuntimeSettings(kv_type=args.kv_type)) as session:
            nll = token_nlls(session, tokens)
        buckets = " ".join(f"{p:.3f}" for _, _, p in bucket_ppl(nll, 8192))
        print(
            f"G{group} W{args.window}, largest position {largest_position(args.tokens, group, args.window):,}: "
            f"perplexity {np.exp(nll.mean()):.4f}, by 8k bucket {buckets} ({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
