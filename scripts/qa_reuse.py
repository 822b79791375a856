"""Time to first token of a second question about the same document: in one run, and across two runs.

Each run is a separate process sharing a fresh on-disk cache. Run 1 ingests the document for question 1
and restores it from memory for question 2; run 2 restores it from the disk cache for question 1.

    python scripts/qa_reuse.py                  # ~6k-token document, the bundled model
    python scripts/qa_reuse.py --chars 24000 --group 4 --window 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ("What does the assert statement do?", "What is a generator?")


def one_run(args) -> dict:
    from selfextend_local.engine.kvcache import KVCache
    from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import pydoc_text
    from selfextend_local.tasks.qa import DocumentQA

    model = load_model(args.model)
    text = pydoc_text()[: args.chars]
    extend = ExtendSettings(args.group, args.window)
    sampling = SamplingSettings(temperature=0, max_tokens=8)
    out = {"ttft": []}
    with DocumentQA(model, text, extend, RuntimeSettings(), sampling, KVCache(Path(args.cache))) as doc:
        out["document_tokens"] = len(doc.doc_tokens)
        out["plan"] = doc.session.plan.describe()
        for question in QUESTIONS[: args.questions]:
            start = time.perf_counter()
            first = None
            for _ in doc.ask(question):
                first = first or time.perf_counter() - start
            out["ttft"].append(first)
        out["source"] = doc.source
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--chars", type=int, default=24000, help="document length in characters (~6k tokens)")
    parser.add_argument("--group", type=int, default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--questions", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args)))
        return 0

    with tempfile.TemporaryDirectory() as cache:
        base = [sys.executable, __file__, "--child", "--cache", cache, "--chars", str(args.chars)]
        for flag in ("model", "group", "window"):
            if getattr(args, flag) is not None:
                base += [f"--{flag}", str(getattr(args, flag))]
        run1 = json.loads(subprocess.run(base, capture_output=True, text=True, check=True).stdout)
        run2 = json.loads(
            subprocess.run(base + ["--questions", "1"], capture_output=True, text=True, check=True).stdout
        )
    q1, q2 = run1["ttft"]
    again = run2["ttft"][0]
    print(f"document: {run1['document_tokens']} tokens; {run1['plan']}")
    print(f"run 1: question 1 (document ingested)        TTFT {q1:8.3f} s")
    print(f"run 1: question 2 (document kept in memory)  TTFT {q2:8.3f} s   ratio {q2 / q1:.4f}")
    print(
        f"run 2: question 1 (document from disk cache) TTFT {again:8.3f} s   ratio {again / q1:.4f}  [{run2['source']}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
