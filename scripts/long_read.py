"""The long end on this machine: a ~100k-token text read once with a q8_0 KV cache and once with f16, under
SelfExtend G16 W1024 (what reaches ~115k tokens on the bundled 8k model; --group and --window set another).

Each type is read in a process of its own (so each peak RSS is its own): wall time, tok/s by 8k bucket,
peak RSS against what the reading is predicted to hold (the KV bytes the plan predicts, the model file, and
the buffers a chunk's logits fill: llama.cpp's compute and output buffers and this script's copy), and
perplexity by 8k bucket. Writes
--json and a plot (--plot) of tok/s and perplexity by position for both.

With --segment-minutes M the reading is split: each process reads for about M minutes, stops at a chunk's
end (the reading's checkpoint written, as Ctrl-C writes it: engine/checkpoint.py), keeps its tokens' NLLs
and timings in --state, and the next process resumes from the checkpoint. The wall time is then the sum of
the segments' reading time (each resume's restore included, and reported).

    python scripts/long_read.py --tokens 100000 --json docs/long_read.json --plot docs/long_read.png   # hours
    python scripts/long_read.py --tokens 100000 --types q8_0 --segment-minutes 20 --state /tmp/long
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


def read_once(
    kv: str,
    n_tokens: int,
    state: Path | None = None,
    minutes: float | None = None,
    group: int = GROUP,
    window: int = WINDOW,
) -> dict:
    """Read the text with a ``kv`` cache in this process (with ``state``, from where the last segment
    stopped, for at most ``minutes``); its figures, or ``{"done": False}`` for a segment that stopped."""
    from selfextend_local.engine.checkpoint import Checkpoints
    from selfextend_local.engine.errors import Interrupted
    from selfextend_local.engine.kvcache import KVCache
    from selfextend_local.engine.memory import kv_bytes_per_cell
    from selfextend_local.engine.metrics import token_nll
    from selfextend_local.engine.planning import Plan, align_cells
    from selfextend_local.engine.session import Session
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.evaluation.perplexity import bucket_ppl
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import long_tokens

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Python and the libraries
    model = load_model()
    tokens = long_tokens(model, n_tokens)
    cells = align_cells(n_tokens)
    plan = Plan(group, window, "neighbor", "auto", cells, model.info.n_ctx_train, "long_read")
    part = Segments(state, kv, n_tokens)
    checkpoints = Checkpoints(KVCache(state / "kv", 1 << 40), tokens, every=3600) if state else None
    targets = np.asarray(tokens, dtype=np.int64)
    with Session(model, plan, RuntimeSettings(kv_type=kv)) as session:
        logits_bytes = session.context.n_batch * model.n_vocab * 4  # a chunk's logits, every token's
        start = time.perf_counter()

        def take(offset: int, logits: np.ndarray) -> None:  # offsets count from where this segment began
            at = offset + (checkpoints.restored if checkpoints else 0)
            stop = min(at + len(logits), n_tokens - 1)
            if stop > at:
                part.nll[at:stop] = token_nll(logits[: stop - at], targets[at + 1 : stop + 1])

        def progress(done: int, total: int) -> None:
            part.marks.append((done, part.seconds + time.perf_counter() - start))
            if len(part.marks) > 1 and done // 4096 != part.marks[-2][0] // 4096:
                print(f"{kv}: {done:,}/{total:,} tokens, {part.marks[-1][1]:.0f} s", file=sys.stderr, flush=True)

        try:
            stop = (lambda: time.perf_counter() - start > 60 * minutes) if minutes else None
            session.ingest(tokens, progress, on_logits=take, should_stop=stop, checkpoints=checkpoints)
        except Interrupted:
            part.stopped(time.perf_counter() - start, checkpoints.written)
            return {"done": False, "at": checkpoints.written}
        seconds = part.seconds + time.perf_counter() - start
    nll, marks = part.nll, part.marks
    rates = []
    for edge in range(BUCKET, n_tokens + BUCKET, BUCKET):
        inside = [(d, t) for d, t in [(0, 0.0), *marks] if edge - BUCKET <= d <= edge]
        if len(inside) > 1:
            (d0, t0), (d1, t1) = inside[0], inside[-1]
            rates.append({"from": d0, "to": d1, "tok_s": round((d1 - d0) / (t1 - t0), 1)})
    return {
        "done": True,
        "kv_type": kv,
        "tokens": n_tokens,
        "seconds": round(seconds, 1),
        "segments": part.count + 1,
        "tok_s": round(n_tokens / seconds, 1),
        "tok_s_by_bucket": rates,
        "marks": [[int(d), round(float(t), 3)] for d, t in marks],  # (tokens read, seconds) at each chunk's end
        "ppl": round(float(np.exp(nll.mean())), 4),
        "ppl_by_bucket": [{"from": a, "to": b, "ppl": round(p, 4)} for a, b, p in bucket_ppl(nll, BUCKET)],
        "peak_rss_bytes": max(part.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "base_rss_bytes": base_rss,
        "predicted_kv_bytes": cells * kv_bytes_per_cell(model.info, kv),
        "model_bytes": model.info.size_bytes,
        # llama.cpp's compute buffer holds a chunk's logits tensor (99.4 MiB of it at 8k cells, 110.2 at
        # 100k, its own log says), its output buffer the logits asked for, and Context.logits copies them
        "predicted_buffer_bytes": 3 * logits_bytes,
    }


class Segments:
    """What the segments of a split reading read so far (in --state): each token's NLL, the (done, seconds)
    of every step, the seconds read, how many segments stopped, and the largest peak RSS among them."""

    def __init__(self, state: Path | None, kv: str, n_tokens: int) -> None:
        self.path = state / f"{kv}-{n_tokens}.npz" if state else None
        self.nll, self.marks = np.full(n_tokens - 1, np.nan), []
        self.seconds, self.count, self.peak_rss = 0.0, 0, 0
        if self.path is not None and self.path.exists():
            saved = np.load(self.path)
            self.nll, self.marks = saved["nll"], [tuple(m) for m in saved["marks"].tolist()]
            self.seconds, self.count, self.peak_rss = float(saved["seconds"]), int(saved["count"]), int(saved["rss"])

    def stopped(self, seconds: float, at: int) -> None:
        """This segment read for ``seconds`` and its checkpoint holds ``at`` tokens: keep what is up to it."""
        self.marks = [m for m in self.marks if m[0] <= at]
        rss = max(self.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(
            tmp, nll=self.nll, marks=np.array(self.marks), seconds=self.seconds + seconds, count=self.count + 1, rss=rss
        )
        tmp.replace(self.path)


def plot(results: list[dict], path: Path, group: int, window: int) -> None:
    from selfextend_local.extras import pyplot

    plt = pyplot()
    fig, (speed, ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        mids = [(b["from"] + b["to"]) / 2 / 1000 for b in result["tok_s_by_bucket"]]
        speed.plot(mids, [b["tok_s"] for b in result["tok_s_by_bucket"]], marker="o", label=result["kv_type"])
        mids = [(b["from"] + b["to"]) / 2 / 1000 for b in result["ppl_by_bucket"]]
        ppl.plot(mids, [b["ppl"] for b in result["ppl_by_bucket"]], marker="o", label=result["kv_type"])
    speed.set(xlabel="position (k tokens)", ylabel="tokens/s read", title=f"reading speed, G{group} W{window}")
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
    parser.add_argument("--group", type=int, default=GROUP)
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--segment-minutes", type=float, default=None, help="split the reading (needs --state)")
    parser.add_argument("--state", type=Path, default=None, help="where a split reading keeps its checkpoint")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: read with this type, print JSON
    args = parser.parse_args()
    if args.segment_minutes and not args.state:
        parser.error("--segment-minutes needs --state")
    if args.one:
        print(json.dumps(read_once(args.one, args.tokens, args.state, args.segment_minutes, args.group, args.window)))
        return 0
    results = []
    for kv in args.types.split(","):
        child = [sys.executable, __file__, "--one", kv, "--tokens", str(args.tokens)]
        child += ["--group", str(args.group), "--window", str(args.window)]
        if args.segment_minutes:
            child += ["--state", str(args.state), "--segment-minutes", str(args.segment_minutes)]
        while True:
            done = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)  # progress on stderr
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["done"]:
                break
            print(f"{kv}: a segment stopped at {result['at']:,} tokens; resuming", flush=True)
        results.append(result)
        r = results[-1]
        print(
            f"{kv}: {r['tokens']:,} tokens in {r['seconds']:.0f} s ({r['tok_s']} tok/s), perplexity {r['ppl']}, "
            f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"({(r['peak_rss_bytes'] - r['base_rss_bytes']) / 2**30:.2f} "
            f"over Python and its libraries), predicted KV {r['predicted_kv_bytes'] / 2**30:.2f} GiB "
            f"+ model {r['model_bytes'] / 2**30:.2f} GiB + a chunk's logits' buffers "
            f"{r['predicted_buffer_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "command": "python scripts/long_read.py " + " ".join(sys.argv[1:]),
                    "group": args.group,
                    "window": args.window,
                    "results": results,
                },
                indent=1,
            )
        )
    if args.plot:
        plot(results, args.plot, args.group, args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
