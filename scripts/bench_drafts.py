"""Drafts from the request's own text (issue 43): decode speed with and without them, ours and llama-server's.

Three loads on the bundled model, each a few chat requests, greedy:

- quote:   questions whose answers quote a ~10k-token pydoc document (past the 8k training context). Ours
           reads it once under SelfExtend through the documents API (as ``qa``: the document held in a slot,
           each question and answer after it); llama-server gets the same messages (qa's system line, then
           "Document: ... Question: ...") with YaRN for the length (it has no SelfExtend) and keeps the
           document in its prompt cache;
- free:    free writing with nothing to copy;
- summary: summaries of ~2k-token pydoc passages.

Ours: one ``serve`` for the whole run; each round runs every load without and with drafts (the per-request
field ``"selfextend": {"draft": K}``), alternating which goes first. llama-server, built from the same patched
sources (scripts/bench_peer.py's build_peer): its n-gram speculation is a server flag, so each round starts
it without and with ``--spec-type ...``, alternating too; given several --peer-spec, the first round tries
each on the quote load and keeps the fastest. Decode tok/s is each server's own ``timings`` (predicted_n over
predicted_ms, llama.cpp's definition, which ours reports the same way), summed over a load's requests; the
acceptance is draft_n_accepted / draft_n. Ratios are the medians of per-round ratios (benchlib).

    python scripts/bench_drafts.py --json docs/drafts.json       # 3 rounds, 1 client, with the peer
    python scripts/bench_drafts.py --clients 4 --parallel 4
    python scripts/bench_drafts.py --quick --no-peer               # short document, 16 tokens: it runs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_peer import build_peer
from benchlib import median_ratio, save, table

from selfextend_local.engine.settings import KV_TYPES, default_threads
from selfextend_local.paths import bundled_model
from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.tasks.qa import SYSTEM
from selfextend_local.testing import free_port, start_server, stop_server

LOADS = ("quote", "free", "summary")
# llama-server's n-gram speculation (tools/server --spec-type): its defaults, and shorter n-grams as ours
PEER_SPECS = {
    name: flags.split()
    for name, flags in {
        "ngram-simple": "--spec-type ngram-simple",
        "ngram-simple-n3": "--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 16",
        "ngram-map-k": "--spec-type ngram-map-k",
        "ngram-map-k-n3": "--spec-type ngram-map-k --spec-ngram-map-k-size-n 3 --spec-ngram-map-k-size-m 16",
        "ngram-mod": "--spec-type ngram-mod",
        "ngram-cache": "--spec-type ngram-cache",
    }.items()
}
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your new bicycle.",
    "Invent a recipe for a soup and explain how to make it.",
]
FREE_WARM_UP = "Write a poem about the sea."
TRAINED = 8192  # the bundled model's training context


def document(model_path: Path, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of the pinned pydoc text, cut at a paragraph's end."""
    from selfextend_local.locate import load_model

    model = load_model(model_path)
    try:
        text = model.detokenize(model.tokenize(pydoc_text(), add_special=False)[:n_tokens])
    finally:
        model.close()
    return text[: text.rfind("\n\n")]


def quote_questions(doc: str, n: int) -> tuple[list[str], str]:
    """Questions each asking for a paragraph of ``doc`` word for word, by its opening words; and one more,
    about a paragraph none of them asks for (the warm-up's)."""
    paragraphs = [p.strip() for p in doc.split("\n\n") if len(p.split()) >= 25]
    step = max(1, len(paragraphs) // (n + 1))
    picked = paragraphs[step::step][:n]
    ask = 'Quote, word for word, the paragraph that begins "{}".'
    return [ask.format(" ".join(p.split()[:8])) for p in picked], ask.format(" ".join(paragraphs[0].split()[:8]))


def loads(args, doc: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Each load's requests (messages, and the document they are about: the quote load's), and its
    warm-up: one request of the same kind whose reply none of the measured ones has (llama-server's
    ngram-mod keeps the n-grams of every request a server has seen, so warming up with the measured
    requests themselves would have it draft their replies from memory)."""
    questions, other = quote_questions(doc, args.requests)
    quote = [{"question": q, "document": doc} for q in questions]
    free = [{"messages": [{"role": "user", "content": p}]} for p in FREE[: args.requests]]
    text = pydoc_text()
    summary = []
    for i in range(args.requests):
        passage = text[60000 + i * args.summary_chars : 60000 + (i + 1) * args.summary_chars]
        ask = f"{passage}\n\nSummarise the text above in a few sentences."
        summary.append({"messages": [{"role": "user", "content": ask}]})
    chosen = {"quote": quote, "free": free, "summary": summary}
    passage = text[50000 : 50000 + args.summary_chars]
    warm = {
        "quote": [{"question": other, "document": doc}],
        "free": [{"messages": [{"role": "user", "content": FREE_WARM_UP}]}],
        "summary": [{"messages": [{"role": "user", "content": f"{passage}\n\nSummarise the text above."}]}],
    }
    return {name: chosen[name] for name in args.loads}, {name: warm[name] for name in args.loads}


# -- the two servers ------------------------------------------------------------------------------------


class Ours:
    """Our server; the quote load's document given to it once (the documents API) and read."""

    name = "selfextend-local"

    def __init__(self, args) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="bench-drafts-")  # documents and their states
        extra = ["--parallel", str(args.parallel), "--threads", str(args.threads), "--queue-size", "64"]
        extra += ["--cache-dir", self.folder.name, "--model", str(args.model), "--kv-type", args.kv_type]
        self.proc, self.url = start_server(*extra, timeout=300, quiet=True)
        self.documents: dict[str, str] = {}

    def close(self) -> None:
        stop_server(self.proc)
        self.folder.cleanup()

    def body(self, request: dict, max_tokens: int, draft: int) -> dict:
        body = {"max_tokens": max_tokens, "temperature": 0, "selfextend": {"draft": draft}}
        if "document" in request:
            ident = self._document(request["document"])
            return {**body, "document": ident, "messages": [{"role": "user", "content": request["question"]}]}
        return {**body, "messages": request["messages"]}

    def _document(self, text: str) -> str:
        if text not in self.documents:
            card = httpx.post(f"{self.url}/v1/documents?name=bench.txt", content=text.encode(), timeout=600)
            card.raise_for_status()
            ident = card.json()["id"]
            with httpx.stream("POST", f"{self.url}/v1/documents/{ident}/read", timeout=None) as events:
                for line in events.iter_lines():
                    if line.startswith("data:") and json.loads(line[5:]).get("state") in ("ready", "failed"):
                        break
            self.documents[text] = ident
        return self.documents[text]


class Peer:
    """llama-server with ``spec`` (its flags for n-gram speculation; none: off)."""

    def __init__(self, args, binary: Path, spec: list[str]) -> None:
        self.name = "llama-server"
        port = free_port()
        cells = args.doc_tokens + 1024
        cmd = [str(binary), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        cmd += ["-np", str(args.parallel), "-c", str(args.parallel * cells), "-t", str(args.threads), *spec]
        cmd += ["-ctk", args.kv_type, "-ctv", args.kv_type]
        if args.doc_tokens > TRAINED and args.peer_rope == "yarn":  # its own way past the trained positions
            scale = -(-cells // TRAINED)
            cmd += ["--rope-scaling", "yarn", "--rope-scale", str(scale), "--yarn-orig-ctx", str(TRAINED)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(3000):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise SystemExit(f"llama-server did not start: {' '.join(cmd)}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()

    def body(self, request: dict, max_tokens: int, draft: int) -> dict:
        body = {"max_tokens": max_tokens, "temperature": 0, "cache_prompt": True}
        if "document" in request:  # the messages qa makes (tasks/qa.py's document_prompt)
            user = f"Document:\n{request['document']}\n\nQuestion: {request['question']}"
            return {**body, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
        return {**body, "messages": request["messages"]}


def run_load(server, requests: list[dict], args, draft: int) -> dict:
    """The load's requests, ``args.clients`` at a time: decode tok/s from the servers' timings, drafts."""

    def one(request: dict) -> dict:
        body = server.body(request, args.max_tokens, draft)
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=3600)
        reply.raise_for_status()
        return reply.json()["timings"]

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:  # every client busy
        timings = list(pool.map(one, requests * -(-args.clients // len(requests))))
    tokens = sum(t["predicted_n"] for t in timings)
    seconds = sum(t["predicted_ms"] for t in timings) / 1000
    drafted = sum(t.get("draft_n", 0) for t in timings)
    accepted = sum(t.get("draft_n_accepted", 0) for t in timings)
    return {"tps": tokens / seconds if seconds else 0.0, "tokens": tokens, "drafted": drafted, "accepted": accepted}


# -- rounds ---------------------------------------------------------------------------------------------


def ours_round(server: Ours, work: dict, args, first: bool) -> dict:
    """Every load without and with drafts, in the order of the round."""
    out = {}
    for name, requests in work.items():
        order = (0, args.draft) if first else (args.draft, 0)
        runs = {k: run_load(server, requests, args, k) for k in order}
        out[name] = {"without": runs[0], "with": runs[args.draft]}
    return out


def warm_up(server, warm: dict, args) -> None:
    """Each load's warm-up, not measured: the slots have read the quote load's document."""
    for requests in warm.values():
        run_load(server, requests, args, 0)


def peer_round(binary: Path, spec: list[str], work: dict, warm: dict, args, first: bool) -> dict:
    """Every load on llama-server without speculation and with ``spec``, each a server of its own."""
    runs = {}
    for side in ("without", "with") if first else ("with", "without"):
        server = Peer(args, binary, spec if side == "with" else [])
        try:
            warm_up(server, warm, args)
            runs[side] = {name: run_load(server, requests, args, 0) for name, requests in work.items()}
        finally:
            server.close()
    return {name: {side: runs[side][name] for side in runs} for name in work}


def best_peer_spec(binary: Path, work: dict, warm: dict, args) -> str:
    """Of --peer-spec, the fastest on the quote load (the first load given, without one)."""
    if len(args.peer_spec) == 1:
        return args.peer_spec[0]
    name = "quote" if "quote" in work else next(iter(work))
    speeds = {}
    for spec in args.peer_spec:
        server = Peer(args, binary, PEER_SPECS[spec])
        try:
            warm_up(server, {name: warm[name]}, args)
            speeds[spec] = run_load(server, work[name], args, 0)["tps"]
        finally:
            server.close()
        print(f"llama-server {spec} on {name}: {speeds[spec]:.1f} tok/s", file=sys.stderr)
    return max(speeds, key=speeds.get)


def report(rounds: list[dict], args, spec: str | None) -> dict:
    """A table per load; the figures for docs/RESULTS.md."""
    figures = {}
    for name in args.loads:
        rows, pairs, peer_pairs, versus = [], [], [], []
        for i, r in enumerate(rounds):
            ours = r["ours"][name]
            pairs.append((ours["without"]["tps"], ours["with"]["tps"]))
            row = [i + 1, ours["without"]["tps"], ours["with"]["tps"], pairs[-1][1] / pairs[-1][0], _rate(ours["with"])]
            if "peer" in r:
                peer = r["peer"][name]
                peer_pairs.append((peer["without"]["tps"], peer["with"]["tps"]))
                versus.append((peer["with"]["tps"], ours["with"]["tps"]))
                row += [peer["without"]["tps"], peer["with"]["tps"], peer_pairs[-1][1] / peer_pairs[-1][0]]
                row += [_rate(peer["with"]), versus[-1][1] / versus[-1][0]]
            rows.append(row)
        header = ["round", "ours off", "ours on", "on/off", "kept"]
        if peer_pairs:
            header += ["peer off", "peer on", "on/off", "kept", "ours on/peer on"]
        print(f"\n{name} (decode tok/s, {args.clients} client(s), draft {args.draft}, peer: {spec or 'not run'})")
        table(header, rows)
        figures[name] = {"ours_on_off": median_ratio(pairs), "rows": rows}
        if peer_pairs:
            figures[name].update(peer_on_off=median_ratio(peer_pairs), ours_vs_peer=median_ratio(versus))
        shown = ", ".join(f"{k} {v:.3f}" for k, v in figures[name].items() if k != "rows")
        print(f"medians of the rounds' ratios: {shown}")
    return figures


def _rate(run: dict) -> str:
    return f"{run['accepted']}/{run['drafted']}" if run["drafted"] else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default=",".join(LOADS), help="of: " + ", ".join(LOADS))
    parser.add_argument("--draft", type=int, default=8, help="tokens drafted a step at most (ours)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="requests a load")
    parser.add_argument("--clients", type=int, default=1, help="concurrent requests")
    parser.add_argument("--parallel", type=int, default=1, help="slots of each server (-np)")
    parser.add_argument("--doc-tokens", type=int, default=10000, help="the quote load's document")
    parser.add_argument("--summary-chars", type=int, default=8000, help="each summary's passage (~2k tokens)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--kv-type", default="f16", choices=KV_TYPES, help="both servers' K and V cache type")
    parser.add_argument("--model", type=Path, default=None, help="a .gguf (default: the bundled model)")
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--peer-spec", default="ngram-simple,ngram-simple-n3,ngram-map-k-n3,ngram-mod")
    parser.add_argument("--peer-rope", choices=("yarn", "none"), default="yarn", help="llama-server past 8k")
    parser.add_argument("--quick", action="store_true", help="a 600-token document, 16 tokens, 1 round")
    parser.add_argument("--json", type=Path, default=None, help="write the figures (docs/drafts.json)")
    args = parser.parse_args()
    if args.quick:
        args.doc_tokens, args.max_tokens, args.rounds, args.requests, args.summary_chars = 600, 16, 1, 1, 1500
    args.loads = [name for name in args.loads.split(",") if name]
    args.peer_spec = [s for s in args.peer_spec.split(",") if s]
    if unknown := [n for n in args.loads if n not in LOADS] + [s for s in args.peer_spec if s not in PEER_SPECS]:
        raise SystemExit(f"unknown: {', '.join(unknown)}; loads: {', '.join(LOADS)}; specs: {', '.join(PEER_SPECS)}")
    args.model = args.model or bundled_model()
    work, warm = loads(args, document(args.model, args.doc_tokens))
    binary = None if args.no_peer else build_peer() / "llama-server"
    ours = Ours(args)
    rounds, spec = [], None
    try:
        warm_up(ours, warm, args)
        if binary is not None:
            spec = best_peer_spec(binary, work, warm, args)
        for r in range(args.rounds):
            first = r % 2 == 0
            result = {"ours": ours_round(ours, work, args, first)}
            if binary is not None:
                result["peer"] = peer_round(binary, PEER_SPECS[spec], work, warm, args, not first)
            rounds.append(result)
            print(f"round {r + 1}/{args.rounds} done at {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    finally:
        ours.close()
    figures = report(rounds, args, spec)
    names = ("draft", "rounds", "requests", "clients", "parallel", "doc_tokens", "kv_type")
    setup = {k: getattr(args, k) for k in names}
    save(args.json, {"model": args.model.name, **setup, "max_tokens": args.max_tokens, "peer_spec": spec, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
