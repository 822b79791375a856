"""Batch summarisation, one run: the same files locally and on a local Ray, and with and without batching.

Each configuration summarises the same short files into a fresh log through the real command (a process
of its own), one after another:

- local:            one process, --threads 2, one file at a time (--parallel 1);
- local --parallel: one process, --threads 2, N files decoded together;
- ray:              `--ray` on a local Ray this script starts, --workers 2 --threads 1;
- ray --parallel:   the same, each worker decoding N files together (optional, --ray-parallel).

Printed: wall time and files/minute for each, and what Ray adds: its start-up (measured alone, a separate
`ray.init` and shutdown) and the rest per file.

    python scripts/bench_summarize.py                    # 8 files, 64 tokens each summary
    python scripts/bench_summarize.py --files 16 --parallel 4 --ray-parallel 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_files(folder: Path, n: int, chars: int) -> list[Path]:
    from selfextend_local.testing import make_text_files

    return make_text_files(folder, n, chars, offset=30000)


def run(files: list[Path], out: Path, extra: list[str], tokens: int) -> float:
    cmd = [sys.executable, "-m", "selfextend_local.cli", "summarize", *map(str, files), "--out", str(out)]
    cmd += ["--temperature", "0", "-n", str(tokens), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'local'} failed:\n{done.stderr[-2000:]}")
    return seconds


def ray_startup() -> float:
    """A local Ray's start-up and shutdown, alone."""
    code = "import ray, time; t = time.perf_counter(); ray.init(num_cpus=2, log_to_driver=False); ray.shutdown(); "
    code += "print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--chars", type=int, default=1500, help="characters a file (~400 tokens)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens a summary (greedy)")
    parser.add_argument("--parallel", type=int, default=4, help="local --parallel to compare (0: skip)")
    parser.add_argument("--ray-parallel", type=int, default=0, help="--parallel inside each Ray worker (0: skip)")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    configs = [("local, 1 process x 2 threads", ["--threads", "2"])]
    if args.parallel > 1:
        batched = ["--threads", "2", "--parallel", str(args.parallel)]
        configs.append((f"local --parallel {args.parallel}, 2 threads", batched))
    if not args.no_ray:
        configs.append(("ray, 2 workers x 1 thread", ["--ray", "local", "--workers", "2", "--threads", "1"]))
        if args.ray_parallel > 1:
            configs.append(
                (
                    f"ray, 2 workers x 1 thread, --parallel {args.ray_parallel}",
                    ["--ray", "local", "--workers", "2", "--threads", "1", "--parallel", str(args.ray_parallel)],
                )
            )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.files, args.chars)
        for name, extra in configs:
            out = Path(tmp) / f"{len(results)}.jsonl"
            seconds = run(files, out, extra, args.tokens)
            records = [json.loads(line) for line in out.read_text().splitlines()]
            results[name] = {"seconds": seconds, "file_seconds": sum(r["seconds"] for r in records)}
            print(f"  {name}: {seconds:.1f} s", file=sys.stderr)
        startup = None if args.no_ray else ray_startup()

    print(f"\n{args.files} files of {args.chars} characters, summaries of {args.tokens} tokens (greedy)")
    print(f"{'configuration':42s} {'wall s':>7s} {'files/min':>9s} {'vs local':>8s}")
    local = results[configs[0][0]]["seconds"]
    for name, r in results.items():
        print(f"{name:42s} {r['seconds']:7.1f} {60 * args.files / r['seconds']:9.1f} {r['seconds'] / local:8.2f}")
    for name, r in results.items():
        if name.startswith("ray") and startup is not None:
            rest = r["seconds"] - startup
            print(
                f"{name}: Ray start-up and shutdown alone {startup:.1f} s; the rest {rest:.1f} s, "
                f"{rest / args.files:.2f} s a file against {local / args.files:.2f} s a file locally (whole run)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
