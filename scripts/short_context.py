"""Is a bucket's perplexity in the long read the text or the depth? Each 8k bucket of scripts/long_read.py's
text read again with only --context tokens before it (SelfExtend as the long read, q8_0), its perplexity
beside the long read's for the same targets (from --long, a long_read.py JSON).

Lower in the long read: the document's depth helped; higher: at that depth the model does worse than with a
short context, whatever the text.

    python scripts/short_context.py --context 4096 --long docs/long_read.json --json docs/short_context.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BUCKET = 8192


def short_ppl(model, tokens: list[int], first: int, context: int, group: int, window: int, kv: str) -> float:
    """Perplexity of the targets ``tokens[first + 1 : first + BUCKET + 1]`` read after ``context`` tokens."""
    from selfextend_local.engine.planning import Plan, align_cells
    from selfextend_local.engine.session import Session
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.evaluation.perplexity import token_nlls

    part = tokens[first - context : first + BUCKET + 1]
    plan = Plan(group, window, "neighbor", "auto", align_cells(len(part)), model.info.n_ctx_train, "short_context")
    with Session(model, plan, RuntimeSettings(kv_type=kv)) as session:
        nll = token_nlls(session, part)
    return float(np.exp(nll[context:].mean()))  # nll[j] scores part[j + 1]: from tokens[first + 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=Path, required=True, help="a scripts/long_read.py JSON")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--buckets", default=None, help="bucket starts (default: every bucket from --context on)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    long = json.loads(args.long.read_text())
    run = long["results"][0]
    full = {b["from"] - 1: b["ppl"] for b in run["ppl_by_bucket"]}
    starts = [int(s) for s in args.buckets.split(",")] if args.buckets else [s for s in full if s >= args.context]
    if bad := [s for s in starts if s not in full or s < args.context]:
        parser.error(f"not a bucket start of that reading with {args.context} tokens before it: {bad[0]}")

    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import long_tokens

    model = load_model()
    tokens = long_tokens(model, run["tokens"])
    rows = []
    for first in starts:
        began = time.perf_counter()
        ppl = short_ppl(model, tokens, first, args.context, long["group"], long["window"], run["kv_type"])
        rows.append({"from": first + 1, "long": full[first], "short": round(ppl, 4)})
        print(
            f"bucket from {first + 1:,}: long read {full[first]:.2f}, after {args.context:,} tokens {ppl:.2f} "
            f"({full[first] / ppl - 1:+.1%}; {time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d"),
            "command": "python scripts/short_context.py " + " ".join(sys.argv[1:]),
            "context": args.context,
            "kv_type": run["kv_type"],
            "group": long["group"],
            "window": long["window"],
            "buckets": rows,
        }
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
