"""A chat beside a reading, through the server: the chat's decode speed alone and while the server reads a
~9k-token document, and the reading's speed alone and with the chat beside it, side by side in one run.

Each round reads a fresh slice of the pinned pydoc text (so nothing is restored from memory or disk) and
asks one streamed chat (greedy, --max-tokens) three ways: the reading alone, the chat alone, then both:
the chat starts once the reading is --at of the way in (at depth, where a step of reading costs most).
Figures a round: chat decode tok/s beside / alone; the reading's tok/s over its whole length beside / alone
(one chat inside it); and the reading's tok/s while the chat streamed / alone (what a reading keeps while a
chat goes on the whole time). The rounds' medians are printed and saved (benchlib).

    python scripts/bench_beside.py --rounds 3 --chars 36000 --out docs/beside.json
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
from benchlib import alternate, median_ratio, save, table
from load_test import decode_speed, stream_once

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import start_server, stop_server

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


class Reader:
    """One document given to the server and read; the times at which each reading event arrived."""

    def __init__(self, url: str, text: str) -> None:
        self.url, self.events, self.ready = url, [], None
        card = httpx.post(f"{url}/v1/documents?name=doc.txt", content=text.encode(), timeout=120).json()
        self.ident, self.total = card["id"], card["tokens"]

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/documents/{self.ident}/read", json={}, timeout=3600) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    event = json.loads(line[5:])
                    self.events.append((time.perf_counter(), event.get("done", 0), event))
                    if event.get("state") == "ready":
                        self.ready = event

    def rate(self) -> float:
        return self.total / self.ready["seconds"]

    def done_at(self, moment: float) -> tuple[float, int]:
        """The last reading event at or before ``moment``: (its time, tokens done)."""
        before = [(t, d) for t, d, _ in self.events if t <= moment]
        return before[-1] if before else (moment, 0)


def slices(chars: int):
    text, i = pydoc_text(), 0
    while True:
        start = (i * chars * 7) % (len(text) - chars)
        yield text[start : start + chars]
        i += 1


def alone(url: str, docs, max_tokens: int) -> dict:
    reader = Reader(url, next(docs))
    reader.run()
    chat = stream_once(httpx.Client(), url, max_tokens, PROMPT)
    return {"reading": reader.rate(), "chat": decode_speed(chat["times"]), "tokens": reader.total}


def beside(url: str, docs, max_tokens: int, at: float) -> dict:
    reader = Reader(url, next(docs))
    thread = threading.Thread(target=reader.run)
    thread.start()
    while not reader.events or reader.events[-1][1] < at * reader.total:
        time.sleep(0.05)
        if not thread.is_alive():
            raise SystemExit("the reading ended before the chat began; use a longer --chars")
    chat = stream_once(httpx.Client(), url, max_tokens, PROMPT)
    thread.join()
    (t0, d0), (t1, d1) = reader.done_at(chat["times"][0]), reader.done_at(chat["times"][-1])
    during = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
    return {"reading": reader.rate(), "chat": decode_speed(chat["times"]), "during": during, "tokens": reader.total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=36000, help="characters of each document (~4 a token)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--at", type=float, default=0.25, help="how far the reading is when the chat starts")
    parser.add_argument("--out", type=Path)
    parser.add_argument("serve_args", nargs="*", help="more arguments for serve (after --)")
    args = parser.parse_args()
    proc, url = start_server("--parallel", "2", "--no-cache", *args.serve_args, quiet=True, timeout=300)
    docs = slices(args.chars)
    try:
        pairs = alternate(
            lambda: alone(url, docs, args.max_tokens),
            lambda: beside(url, docs, args.max_tokens, args.at),
            args.rounds,
        )
    finally:
        stop_server(proc)
    rows = []
    for i, (a, b) in enumerate(pairs, 1):
        rows.append(
            [
                i,
                a["tokens"],
                a["chat"],
                b["chat"],
                b["chat"] / a["chat"],
                a["reading"],
                b["reading"],
                b["reading"] / a["reading"],
                b["during"],
                b["during"] / a["reading"],
            ]
        )
    table(
        [
            "round",
            "doc tokens",
            "chat alone",
            "chat beside",
            "chat ratio",
            "read alone",
            "read beside",
            "read ratio",
            "read during chat",
            "during ratio",
        ],
        rows,
    )
    figures = {
        "chat_ratio": median_ratio([(a["chat"], b["chat"]) for a, b in pairs]),
        "reading_ratio": median_ratio([(a["reading"], b["reading"]) for a, b in pairs]),
        "during_ratio": median_ratio([(a["reading"], b["during"]) for a, b in pairs]),
        "chat_alone": statistics.median(a["chat"] for a, _ in pairs),
        "rounds": [{"alone": a, "beside": b} for a, b in pairs],
        "serve_args": args.serve_args,
    }
    print(
        f"median ratios: chat beside/alone {figures['chat_ratio']:.3f}, reading beside/alone "
        f"{figures['reading_ratio']:.3f}, reading while the chat streamed / alone {figures['during_ratio']:.3f}"
    )
    save(args.out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
