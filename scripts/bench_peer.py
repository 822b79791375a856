"""Speed guard against the peer: our `serve --parallel N` beside llama.cpp's own `llama-server -np N`, same
model, same load, in one run; and llama-batched-bench's generation speed at 1 and N sequences (the kernels'
ceiling).

llama-server and llama-batched-bench are built from the llama.cpp vendored in the same patched
llama-cpp-python sdist our engine is built from (`python -m selfextend_local.llama_build`), cmake targets
only, once: the binaries are cached under ~/.cache/selfextend-local/peer/KEY (the version, the patches,
CMAKE_ARGS). The load is scripts/load_test.py's (concurrent streaming chat requests, greedy). The two servers
run in turn, --repeats rounds, alternating which goes first. This machine's speed drifts by 20-40% within
minutes, so a ratio is taken within a round (the two runs minutes apart) and the median of the rounds' ratios
is the figure; tok/s is each server's median; TTFT percentiles pool every request of all rounds, so the p99
is not one run's slowest request.

    python scripts/bench_peer.py                     # 1 and 4 clients, --parallel 4, 30 s a cell, 5 rounds
    python scripts/bench_peer.py --clients 1,4 --seconds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_test import load, percentile

from selfextend_local import llama_build
from selfextend_local.engine.settings import default_threads
from selfextend_local.paths import bundled_model
from selfextend_local.testing import free_port, start_server, stop_server

TARGETS = ("llama-server", "llama-batched-bench")
SLOT_CELLS = 4096  # each llama-server slot: a chat prompt and its reply fit many times over


def peer_dir() -> Path:
    digest = hashlib.sha256()
    digest.update(llama_build.KNOWN_VERSION.encode())
    for name, data in llama_build.patches():
        digest.update(name.encode() + data)
    digest.update(os.environ.get("CMAKE_ARGS", "").encode())
    return llama_build.cache_root().parent / "peer" / digest.hexdigest()[:16]


def build_peer() -> Path:
    """llama-server and llama-batched-bench from the patched sdist (cached); their folder."""
    out = peer_dir()
    if all((out / t).exists() for t in TARGETS):
        return out
    with tempfile.TemporaryDirectory(prefix="selfextend-peer-") as tmp:
        source = llama_build.extract(
            llama_build.download_sdist(llama_build.KNOWN_VERSION, Path(tmp)), Path(tmp) / "src"
        )
        if (problem := llama_build.apply_patches(source)) is not None:
            raise SystemExit(f"the patches do not apply: {problem}")
        tree, build = source / "vendor" / "llama.cpp", Path(tmp) / "build"
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
        flags += os.environ.get("CMAKE_ARGS", "").split()
        print(f"building {', '.join(TARGETS)} from {tree} (once; cached in {out})", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *flags], check=True, capture_output=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *TARGETS], check=True)
        out.mkdir(parents=True, exist_ok=True)
        for target in TARGETS:
            shutil.copy2(build / "bin" / target, out / target)
    return out


def start_peer(binary: Path, model: Path, parallel: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel)]
    cmd += ["-c", str(parallel * SLOT_CELLS), "-t", str(threads), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama-server did not start")


def serve_and_load(who: str, peer: Path, args) -> list[dict]:
    """Start one server, run the load at each client count, stop it: one row per client count."""
    if who == "llama-server":
        proc, url = start_peer(peer / "llama-server", args.model, args.parallel, args.threads)
    else:
        proc, url = start_server(
            "--parallel",
            str(args.parallel),
            "--queue-size",
            "64",
            "--model",
            str(args.model),
            "--threads",
            str(args.threads),
            quiet=True,
        )
    try:
        rows = []
        for clients in args.clients:
            rows.append({"who": who, **load(url, clients, args.seconds, args.max_tokens)})
            failed = rows[-1]["requests"] - rows[-1]["ok"]
            print(f"{who}, {clients} clients: {rows[-1]['tps']:.1f} tok/s, {failed} requests failed", file=sys.stderr)
        return rows
    finally:
        proc.terminate() if who == "llama-server" else stop_server(proc)
        proc.wait()


def batched_bench(peer: Path, model: Path, parallel: int, threads: int) -> dict[int, float]:
    """llama-batched-bench's text generation speed (S_TG, tok/s) at 1 and ``parallel`` sequences."""
    cmd = [str(peer / "llama-batched-bench"), "-m", str(model), "-c", str(4 * 2048), "-b", "512", "-ub", "512"]
    cmd += ["-npp", "128", "-ntg", "128", "-npl", f"1,{parallel}", "-t", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    speeds = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[2]):  # PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG ...
            speeds[int(cells[2])] = float(cells[7])
    return speeds


def summary(rows: list[dict], clients: int) -> dict:
    """The median of the rounds' ours / llama-server ratios, each server's median tok/s and pooled TTFT."""
    mine = [r for r in rows if r["who"] == "selfextend-local" and r["clients"] == clients]
    peers = [r for r in rows if r["who"] == "llama-server" and r["clients"] == clients]
    out = {"clients": clients, "ratio": statistics.median(a["tps"] / b["tps"] for a, b in zip(mine, peers))}
    for key, cells in (("ours", mine), ("peer", peers)):
        pooled = [t for r in cells for t in r["ttft_all"]]
        out[key] = {
            "tps": statistics.median(r["tps"] for r in cells),
            "tps_each": [round(r["tps"], 1) for r in cells],
            "requests": len(pooled),
            "ttft": [percentile(pooled, q) for q in (50, 99)],
        }
    return out


def report(summaries: list[dict], args, ceiling: dict[int, float]) -> None:
    print(
        f"\nbundled model {args.model.name}, --parallel / -np {args.parallel}, {args.threads} threads, "
        f"{args.seconds:.0f} s a cell, {args.max_tokens} tokens greedy, {args.repeats} rounds"
    )
    print(
        f"{'clients':>7} {'ours tok/s':>10} {'peer tok/s':>10} {'ratio':>6} {'ours TTFT p50/p99':>18} "
        f"{'peer TTFT p50/p99':>18}   (medians; ratio: the median of the rounds' ratios)"
    )
    for s in summaries:
        ours, peer = s["ours"], s["peer"]
        print(
            f"{s['clients']:>7} {ours['tps']:>10.1f} {peer['tps']:>10.1f} {s['ratio']:>6.2f} "
            f"{ours['ttft'][0]:>8.3f}/{ours['ttft'][1]:.3f} s {peer['ttft'][0]:>8.3f}/{peer['ttft'][1]:.3f} s"
        )
        print(f"{'':>7} each round: ours {ours['tps_each']}, llama-server {peer['tps_each']}")
    line = ", ".join(f"{n} seq {s:.1f} tok/s" for n, s in sorted(ceiling.items()))
    print(f"llama-batched-bench generation: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--model", type=Path, default=None, help="a .gguf (default: the bundled model)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures (docs/peer.json for RESULTS.md)")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.model = args.model or bundled_model()
    peer = build_peer()
    rows = []
    for r in range(args.repeats):
        order = ("llama-server", "selfextend-local") if r % 2 == 0 else ("selfextend-local", "llama-server")
        for who in order:
            rows += serve_and_load(who, peer, args)
    ceiling = batched_bench(peer, args.model, args.parallel, args.threads)
    summaries = [summary(rows, n) for n in args.clients]
    report(summaries, args, ceiling)
    if args.json:
        setup = {k: getattr(args, k) for k in ("parallel", "seconds", "max_tokens", "repeats", "threads")}
        figures = {"date": time.strftime("%Y-%m-%d"), "model": args.model.name, **setup, "summary": summaries}
        cells = [{k: v for k, v in r.items() if k != "ttft_all"} for r in rows]
        args.json.write_text(json.dumps({**figures, "rows": cells, "batched_bench": ceiling}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
