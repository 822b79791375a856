"""Reading a document through the page's API against `qa`, the same file, side by side in one run.

`qa --no-cache` says how fast it ingested the document; the server (started as `serve` is by default,
`--no-cache` so that it reads) is given the same file (POST /v1/documents) and asked to read it (POST
/v1/documents/ID/read): its `ready` event says how long the reading took, from the request to the end. The
two alternate, --rounds times. This machine's speed drifts by 20-40% within minutes, so the ratio is taken
within a round (the two readings back to back) and the figure is the median of the rounds' ratios; every
reading is printed and kept.

    python scripts/bench_page.py --chars 42000 --rounds 3      # ~10k tokens of pydoc text
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.testing import CLI, start_server, stop_server


def qa_rate(path: Path) -> tuple[int, float]:
    """(tokens, tok/s) of qa's ingestion of ``path``."""
    done = subprocess.run(
        [*CLI, "qa", "--doc", str(path), "--no-cache", "-n", "1", "--temperature", "0", "What is it?"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"document: ([\d,]+) tokens \(ingested at ([\d,.]+) tok/s", done.stderr)
    return int(found.group(1).replace(",", "")), float(found.group(2).replace(",", ""))


def page_rate(path: Path, tmp: Path) -> tuple[int, float]:
    """(tokens, tok/s) of the server's reading of ``path`` given through the page's API."""
    proc, url = start_server("--no-cache", "--cache-dir", str(tmp / "cache"), quiet=True)
    try:
        card = httpx.post(
            f"{url}/v1/documents?name={path.name}",
            content=path.read_bytes(),
            headers={"Content-Type": "text/plain"},
            timeout=120,
        ).json()
        last = {}
        with httpx.stream("POST", f"{url}/v1/documents/{card['id']}/read", json={}, timeout=3600) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    last = json.loads(line[5:])
        assert last.get("state") == "ready" and last["source"] == "read", last
        return card["tokens"], card["tokens"] / last["seconds"]
    finally:
        stop_server(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=42000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        path = tmp / "document.txt"
        path.write_text(pydoc_text()[: args.chars])
        rates: dict[str, list[float]] = {"qa": [], "page": []}
        tokens = {}
        for r in range(args.rounds):
            for who in ("qa", "page") if r % 2 == 0 else ("page", "qa"):
                n, rate = qa_rate(path) if who == "qa" else page_rate(path, tmp)
                tokens[who] = n
                rates[who].append(round(rate, 1))
                print(f"round {r + 1}: {who} {n:,} tokens at {rate:.1f} tok/s", file=sys.stderr, flush=True)
    ratios = [round(page / qa, 3) for qa, page in zip(rates["qa"], rates["page"])]
    median = statistics.median(ratios)
    print(f"\nqa:   {tokens['qa']:,} tokens, tok/s each round {rates['qa']}")
    print(f"page: {tokens['page']:,} tokens, tok/s each round {rates['page']}")
    print(f"page / qa each round {ratios}, median {median:.3f}")
    if args.json:
        figures = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "tokens": tokens["page"], **rates}
        args.json.write_text(json.dumps({**figures, "ratios": ratios, "median": median}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
