"""Does one client's grammar slow the other clients? A server with two slots: client A streams plain greedy
replies, measured as generated tokens/s between its first and last token; beside it, client B sends, over
and over, nothing (A alone), plain requests, or requests held to a JSON schema: a list of bounded strings,
or a list of values of an enum as large as a schema may have (256 values, 16 KiB). Every B request runs
to its 48 tokens (the schemas ask for more), so B's steps are alike but for the grammar. The conditions
alternate round by round. Prints A's median speed in each and its ratio to A beside plain B.

    python scripts/bench_grammar.py --rounds 3 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from load_test import decode_speed, stream_once

from selfextend_local.engine.grammar import MAX_ENUM, MAX_ENUM_BYTES
from selfextend_local.testing import start_server, stop_server

B_TOKENS = 48
STRINGS = {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 12, "maxItems": 12}
WIDTH = MAX_ENUM_BYTES // MAX_ENUM - 4  # each value's characters, so that all fit the byte bound
VALUES = [f"choice {i:03d} " + "x" * (WIDTH - 11) for i in range(MAX_ENUM)]
ENUM = {"type": "array", "items": {"enum": VALUES}, "minItems": 8, "maxItems": 8}
CONDITIONS = {"alone": None, "plain": "plain", "json schema": STRINGS, "largest enum": ENUM}


def other_client(url: str, what, stop: threading.Event) -> None:
    """Client B: requests of one kind until told to stop."""
    with httpx.Client(timeout=300) as client:
        while not stop.is_set():
            ask = [{"role": "user", "content": "Write a long story about a cat."}]
            body = {"messages": ask, "max_tokens": B_TOKENS, "temperature": 0}
            if isinstance(what, dict):
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": what}}
            client.post(f"{url}/v1/chat/completions", json=body)


def measure(url: str, what, seconds: float) -> list[float]:
    """Client A's decode speeds over ``seconds`` with B doing ``what``."""
    stop = threading.Event()
    other = threading.Thread(target=other_client, args=(url, what, stop)) if what else None
    if other:
        other.start()
        time.sleep(1.0)  # B is under way
    speeds = []
    end = time.perf_counter() + seconds
    with httpx.Client() as client:
        while time.perf_counter() < end:
            result = stream_once(client, url, 64, "Write a short story about a lighthouse keeper.")
            if result.get("times"):
                speeds.append(decode_speed(result["times"]))
    stop.set()
    if other:
        other.join()
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    proc, url = start_server("--parallel", "2", "--ctx", "2048", quiet=True)
    results: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    try:
        for r in range(args.rounds):
            names = list(CONDITIONS) if r % 2 == 0 else list(reversed(CONDITIONS))
            for name in names:
                results[name] += measure(url, CONDITIONS[name], args.seconds)
                print(f"round {r + 1}: {name} done", file=sys.stderr)
    finally:
        stop_server(proc)
    base = statistics.median(results["plain"])
    print(f"\nclient A's decode tok/s (median), {args.rounds} rounds x {args.seconds:.0f} s, alternating")
    for name, speeds in results.items():
        median = statistics.median(speeds)
        print(f"  B {name:<13} {median:7.1f} tok/s  ({len(speeds)} replies)  {median / base:5.2f} of beside plain B")
    if args.json:
        medians = {name: round(statistics.median(speeds), 1) for name, speeds in results.items()}
        figures = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "seconds": args.seconds}
        args.json.write_text(json.dumps({**figures, "median": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
