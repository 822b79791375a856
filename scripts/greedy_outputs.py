"""Greedy outputs of every generation path over a fixed set of prompts, for a before/after comparison.

Drives only the command line and the HTTP API (what users have), so the same script runs on any version of
the code: `generate` (short prompts, raw, and one past the 8k training context), `chat` (two turns),
`qa` (two questions; a second run restoring from the disk cache; a document past 8k), `summarize` (one at
a time and `--parallel 2`), and `serve` (`--parallel 1` and `--parallel 4`, sequential and concurrent
requests, one past 8k). Writes one JSON object {case: text}; `--compare OLD.json` prints which cases differ.

    python scripts/greedy_outputs.py --out before.json          # on the old code
    python scripts/greedy_outputs.py --out after.json --compare before.json
    python scripts/greedy_outputs.py --out drafts.json --compare after.json --draft 8   # drafts on
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from selfextend_local.tasks.corpus import pydoc_text

CLI = [sys.executable, "-m", "selfextend_local.cli"]
GREEDY = ["--temperature", "0"]  # with --draft N, every command's and server's drafts too
SERVE: list[str] = []
SHORT = [
    "In two sentences, what does a librarian do?",
    "Write a short poem about the sea.",
    "List three fruits and their colours.",
]
LONG_CHARS = 38000  # ~9.5k tokens of pydoc text: past the 8k training context, SelfExtend planned (G4 W2048)


def run(args: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, timeout=1800)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def generate_cases(out: dict) -> None:
    for i, prompt in enumerate(SHORT):
        out[f"generate/short{i}"] = run(["generate", *GREEDY, "-n", "48", prompt])
    out["generate/raw"] = run(["generate", "--raw", *GREEDY, "-n", "32", "The history of the printing press"])
    out["generate/system"] = run(["generate", "--system", "Answer in French.", *GREEDY, "-n", "24", "Name a colour."])
    out["generate/long"] = run(["generate", "--raw", *GREEDY, "-n", "32"], stdin=pydoc_text()[:LONG_CHARS])


def chat_cases(out: dict) -> None:
    turns = "Tell me about foxes.\nAnd what do they eat?\n/exit\n"
    out["chat/two_turns"] = run(["chat", *GREEDY, "-n", "40"], stdin=turns)


def qa_cases(out: dict, folder: Path) -> None:
    doc = folder / "doc.txt"
    doc.write_text(pydoc_text()[:12000])
    cache = folder / "kv"
    questions = ["What does the assert statement do?", "-q", "What is a generator?"]
    args = ["qa", "--doc", str(doc), *GREEDY, "-n", "32", "-g", "4", "-w", "256", "--cache-dir", str(cache)]
    out["qa/first_run"] = run(args + questions)
    out["qa/from_cache"] = run(args + questions)
    long_doc = folder / "long.txt"
    long_doc.write_text(pydoc_text()[:LONG_CHARS])
    out["qa/long"] = run(["qa", "--doc", str(long_doc), "--no-cache", *GREEDY, "-n", "32", "What is this text about?"])


def summarize_cases(out: dict, folder: Path) -> None:
    text = pydoc_text()
    files = []
    for i in range(3):
        path = folder / f"part{i}.txt"
        path.write_text(text[20000 + i * 2000 : 20000 + (i + 1) * 2000])
        files.append(str(path))
    for parallel in ("1", "2"):
        log = folder / f"summaries{parallel}.jsonl"
        run(["summarize", *files, "--out", str(log), "--parallel", parallel, *GREEDY, "-n", "40"])
        records = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda r: r["path"])
        for r in records:
            out[f"summarize/parallel{parallel}/{Path(r['path']).name}"] = r["summary"]


def serve_cases(out: dict) -> None:
    from selfextend_local.testing import start_server, stop_server

    for parallel in ("1", "4"):
        proc, url = start_server("--parallel", parallel, "--queue-size", "8", *SERVE)
        try:
            with httpx.Client(timeout=1800) as client:
                for i, prompt in enumerate(SHORT):
                    out[f"serve{parallel}/chat{i}"] = chat(client, url, prompt, 48)
                body = {"prompt": "The history of the printing press", "max_tokens": 32, "temperature": 0}
                out[f"serve{parallel}/completion"] = client.post(f"{url}/v1/completions", json=body).json()["choices"][
                    0
                ]["text"]
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    replies = list(pool.map(lambda p, url=url: chat(client, url, p, 40), SHORT + ["Tell me a story."]))
                for i, text in enumerate(replies):
                    out[f"serve{parallel}/concurrent{i}"] = text
                if parallel == "1":
                    body = {"prompt": pydoc_text()[:LONG_CHARS], "max_tokens": 32, "temperature": 0}
                    out["serve1/long"] = client.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
        finally:
            stop_server(proc)


def chat(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    return client.post(f"{url}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def compare(now: dict, before: dict) -> int:
    differ = [k for k in before if now.get(k) != before[k]]
    missing = [k for k in now if k not in before]
    for key in differ:
        print(f"DIFFERS {key}:\n  before {before[key]!r}\n  now    {now.get(key)!r}")
    print(f"{len(before) - len(differ)} of {len(before)} cases byte-identical; {len(missing)} new cases")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None, help="a JSON file written by an earlier run")
    parser.add_argument("--only", default="generate,chat,qa,summarize,serve")
    parser.add_argument("--draft", type=int, default=None, help="every command and server drafts (--draft N)")
    args = parser.parse_args()
    if args.draft is not None:  # compared with a run without: drafts change no reply (up to near ties)
        GREEDY.extend(["--draft", str(args.draft)])
        SERVE.extend(["--draft", str(args.draft)])
    out: dict[str, str] = {}
    wanted = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, step in [
            ("generate", lambda: generate_cases(out)),
            ("chat", lambda: chat_cases(out)),
            ("qa", lambda: qa_cases(out, folder)),
            ("summarize", lambda: summarize_cases(out, folder)),
            ("serve", lambda: serve_cases(out)),
        ]:
            if name in wanted:
                print(f"{name}...", file=sys.stderr, flush=True)
                step()
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {len(out)} cases to {args.out}", file=sys.stderr)
    return compare(out, json.loads(args.compare.read_text())) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
