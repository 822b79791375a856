"""The long end on this machine: a ~100k-token text read once with a q8_0 KV cache and once with f16, under
SelfExtend G16 W1024 (what reaches ~115k tokens on the bundled 8k model).

Each type is read in a process of its own (so each peak RSS is its own): wall time, tok/s by 8k bucket,
peak RSS against the KV bytes the plan predicts (and the model file), and perplexity by 8k bucket. Writes
--json and a plot (--plot) of tok/s and perplexity by position for both.

    python scripts/long_read.py --tokens 100000 --json docs/long_read.json --plot docs/long_read.png   # hours
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GROUP, WINDOW, BUCKET = 16, 1024, 8192


def read_once(kv: str, n_tokens: int) -> dict:
    """Read the text with a ``kv`` cache in this process; its figures."""
    from selfextend_local.engine.memory import kv_bytes_per_cell
    from selfextend_local.engine.planning import Plan, align_cells
    from selfextend_local.engine.session import Session
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.evaluation.perplexity import bucket_ppl, token_nlls
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import long_tokens

    model = load_model()
    tokens = long_tokens(model, n_tokens)
    cells = align_cells(n_tokens)
    plan = Plan(GROUP, WINDOW, "neighbor", "auto", cells, model.info.n_ctx_train, "long_read")
    marks: list[tuple[int, float]] = []
    with Session(model, plan, RuntimeSettings(kv_type=kv)) as session:
        start = time.perf_counter()
        nll = token_nlls(session, tokens, progress=lambda done, total: marks.append((done, time.perf_counter())))
        seconds = time.perf_counter() - start
    rates = []
    for edge in range(BUCKET, n_tokens + BUCKET, BUCKET):
        inside = [(d, t) for d, t in [(0, start), *marks] if edge - BUCKET <= d <= edge]
        if len(inside) > 1:
            (d0, t0), (d1, t1) = inside[0], inside[-1]
            rates.append({"from": d0, "to": d1, "tok_s": round((d1 - d0) / (t1 - t0), 1)})
    return {
        "kv_type": kv,
        "tokens": n_tokens,
        "seconds": round(seconds, 1),
        "tok_s": round(n_tokens / seconds, 1),
        "tok_s_by_bucket": rates,
        "ppl": round(float(np.exp(nll.mean())), 4),
        "ppl_by_bucket": [{"from": a, "to": b, "ppl": round(p, 4)} for a, b, p in bucket_ppl(nll, BUCKET)],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "predicted_kv_bytes": cells * kv_bytes_per_cell(model.info, kv),
        "model_bytes": model.info.size_bytes,
    }


def plot(results: list[dict], path: Path) -> None:
    from selfextend_local.extras import pyplot

    plt = pyplot()
    fig, (speed, ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        mids = [(b["from"] + b["to"]) / 2 / 1000 for b in result["tok_s_by_bucket"]]
        speed.plot(mids, [b["tok_s"] for b in result["tok_s_by_bucket"]], marker="o", label=result["kv_type"])
        mids = [(b["from"] + b["to"]) / 2 / 1000 for b in result["ppl_by_bucket"]]
        ppl.plot(mids, [b["ppl"] for b in result["ppl_by_bucket"]], marker="o", label=result["kv_type"])
    speed.set(xlabel="position (k tokens)", ylabel="tokens/s read", title=f"reading speed, G{GROUP} W{WINDOW}")
    ppl.set(xlabel="position (k tokens)", ylabel="perplexity (8k bucket)", title="perplexity by position")
    for axis in (speed, ppl):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--types", default="q8_0,f16")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: read with this type, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(read_once(args.one, args.tokens)))
        return 0
    results = []
    for kv in args.types.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--one", kv, "--tokens", str(args.tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{kv}: {r['tokens']:,} tokens in {r['seconds']:.0f} s ({r['tok_s']} tok/s), perplexity {r['ppl']}, "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, predicted KV {r['predicted_kv_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"date": time.strftime("%Y-%m-%d"), "group": GROUP, "window": WINDOW, "results": results}, indent=1
            )
        )
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
