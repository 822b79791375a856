"""Load test of `selfextend-local serve` on loopback, and the server's decode speed beside the engine's.

For each --parallel value it starts a server (`serve --parallel N`) on 127.0.0.1 and, for each --clients
value, runs that many concurrent streaming clients for a fixed time: requests/s, generated tokens/s and
percentiles of time to first token and of latency, all in one run, then a table side by side. With
--single, it also streams one request at a time through the server and through the engine in this
process, same prompt and settings, and prints both decode speeds (best of --repeats, alternating).

    python scripts/load_test.py --clients 4,8 --parallel 1,4 --seconds 30
    python scripts/load_test.py --url http://127.0.0.1:8080 --clients 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import httpx

from selfextend_local.testing import start_server, stop_server

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def start(extra: list[str]) -> tuple[subprocess.Popen, str]:
    return start_server("--queue-size", "64", *extra, timeout=60, quiet=True)


def stream_once(client: httpx.Client, url: str, max_tokens: int, prompt: str) -> dict:
    """One streamed chat request: arrival time of each chunk with text, and the tokens generated (the
    usage's count: a chunk is not a token, e.g. llama-server's first chunk carries the role alone)."""
    start = time.perf_counter()
    times = []
    generated = None
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    tokens = len(times) if generated is None else generated
    return {"status": 200, "start": start, "times": times, "tokens": tokens, "end": time.perf_counter()}


def decode_speed(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client_loop(i: int) -> None:
        with httpx.Client() as client:
            n = 0
            while time.perf_counter() < stop_at:
                try:
                    r = stream_once(client, url, max_tokens, f"{PROMPT} (variant {i}.{n})")
                except httpx.TransportError as exc:  # e.g. llama-server closing a kept-alive connection
                    r = {"status": type(exc).__name__}  # counted as not ok; the client goes on
                n += 1
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200 and r["times"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["times"][0] - r["start"] for r in ok]
    total = [r["end"] - r["start"] for r in ok]
    return {
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "wall": wall,
        "rps": len(ok) / wall,
        "tps": tokens / wall,
        "ttft": [percentile(ttft, q) for q in (50, 99)],
        "ttft_all": ttft,  # every request's, so that several runs can be pooled
        "latency": [percentile(total, q) for q in (50, 99)],
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'parallel':>8} {'clients':>7} {'requests':>8} {'req/s':>6} {'gen tok/s':>9} "
        f"{'TTFT p50':>8} {'TTFT p99':>8} {'lat p50':>8} {'lat p99':>8}"
    )
    for r in rows:
        print(
            f"{r['parallel']:>8} {r['clients']:>7} {r['ok']:>4}/{r['requests']:<3} {r['rps']:6.2f} {r['tps']:9.1f} "
            f"{r['ttft'][0]:7.2f}s {r['ttft'][1]:7.2f}s {r['latency'][0]:7.2f}s {r['latency'][1]:7.2f}s"
        )


def engine_stream(model, max_tokens: int) -> list[float]:
    from selfextend_local.engine.generate import stream_generate
    from selfextend_local.engine.session import open_session
    from selfextend_local.engine.settings import SamplingSettings

    tokens = model.chat_tokens([{"role": "user", "content": PROMPT}])
    sampling = SamplingSettings(temperature=0, max_tokens=max_tokens)
    times = []
    with open_session(model, len(tokens) + max_tokens) as session:
        for chunk in stream_generate(session, tokens, sampling):
            if chunk.finish_reason is None:
                times.append(time.perf_counter())
    return times


def single_request_comparison(url: str, max_tokens: int, repeats: int) -> None:
    from selfextend_local.locate import load_model

    model = load_model(None)
    server_tps, engine_tps = [], []
    with httpx.Client() as client:
        for r in range(repeats):
            order = ("server", "engine") if r % 2 == 0 else ("engine", "server")
            for who in order:
                if who == "server":
                    server_tps.append(decode_speed(stream_once(client, url, max_tokens, PROMPT)["times"]))
                else:
                    engine_tps.append(decode_speed(engine_stream(model, max_tokens)))
    s, e = max(server_tps), max(engine_tps)
    print(
        f"one request, {max_tokens} tokens, best of {repeats}: server {s:.1f} tok/s, engine {e:.1f} tok/s, "
        f"server/engine {s / e:.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="an already running server on loopback (else one is started)")
    parser.add_argument("--clients", default="4", help="comma-separated client counts, e.g. 4,8")
    parser.add_argument("--parallel", default="1", help="comma-separated `serve --parallel` values, e.g. 1,4")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="passed to serve --model (default: the bundled model)")
    parser.add_argument("--single", action="store_true", help="also compare one request: server vs engine")
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.url and not args.url.startswith(("http://127.", "http://localhost")):
        raise SystemExit("load tests run against loopback only")
    clients = [int(c) for c in args.clients.split(",")]
    parallels = [int(p) for p in args.parallel.split(",")] if not args.url else ["?"]
    rows = []
    for parallel in parallels:
        proc, url = (None, args.url)
        if url is None:
            extra = ["--parallel", str(parallel)] + (["--model", args.model] if args.model else [])
            proc, url = start(extra)
        try:
            for n in clients:
                row = {"parallel": parallel, **load(url, n, args.seconds, args.max_tokens)}
                print(f"parallel {parallel}, {n} clients: {row['tps']:.1f} generated tok/s", file=sys.stderr)
                rows.append(row)
            if args.single:
                single_request_comparison(url, args.single_tokens, args.repeats)
        finally:
            if proc:
                stop_server(proc)
    print(f"{args.seconds:.0f} s per cell, max_tokens {args.max_tokens}, greedy; model {args.model or 'bundled'}")
    print_table(rows)
    by = {(r["parallel"], r["clients"]): r for r in rows}
    for n in clients:
        base = by.get((1, n))
        for p in parallels:
            if p != 1 and base and (p, n) in by:
                r = by[(p, n)]
                print(
                    f"{n} clients: --parallel {p} / --parallel 1: generated tok/s x{r['tps'] / base['tps']:.2f}, "
                    f"TTFT p99 {r['ttft'][1]:.2f} s vs {base['ttft'][1]:.2f} s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
