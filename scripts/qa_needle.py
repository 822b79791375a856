"""A fact stated once in a ~10k-token document (past the 8k training context): found by `qa`, with
SelfExtend and without extension, over a few seeds and depths.

    python scripts/qa_needle.py --tokens 10000 --depths 0.1,0.5,0.9 --seeds 2
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from selfextend_local.engine.generate import generate
from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from selfextend_local.locate import load_model
from selfextend_local.tasks.corpus import pydoc_text
from selfextend_local.tasks.qa import DocumentQA

FACT = "Note for readers: the secret ingredient of Aunt Miriam's soup is {word}."
QUESTION = "What is the secret ingredient of Aunt Miriam's soup?"
WORDS = ("saffron", "nutmeg", "tarragon", "cardamom", "fennel", "paprika", "juniper", "sorrel")


def document(model, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """pydoc prose from a seed-dependent offset, cut to about ``n_tokens``, the fact inserted at ``depth``."""
    rng = random.Random(seed)
    word = rng.choice(WORDS)
    text = pydoc_text()
    start = rng.randrange(0, len(text) // 2)
    chars = n_tokens * 4
    body = text[start : start + chars]
    while len(model.tokenize(body)) > n_tokens:
        body = body[: int(len(body) * 0.97)]
    cut = body.rfind("\n", 0, int(len(body) * depth)) + 1
    return body[:cut] + FACT.format(word=word) + "\n" + body[cut:], word


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10000)
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--group", type=int, default=None)
    parser.add_argument("--window", type=int, default=None)
    args = parser.parse_args()

    model = load_model(None)
    runtime = RuntimeSettings()
    sampling = SamplingSettings(temperature=0, max_tokens=32)
    found = {"selfextend": 0, "none": 0}
    trials = 0
    for seed in range(args.seeds):
        for depth in (float(d) for d in args.depths.split(",")):
            text, word = document(model, args.tokens, depth, seed)
            trials += 1
            with DocumentQA(model, text, ExtendSettings(args.group, args.window), runtime, sampling) as doc:
                prompt = doc.doc_tokens + doc.question_tokens(QUESTION)
                label = doc.session.plan.describe()
                start = time.perf_counter()
                answer = "".join(c.text for c in doc.ask(QUESTION))
                took = time.perf_counter() - start
            plain = Plan(1, 1, "neighbor", "auto", align_cells(len(prompt) + 32), model.info.n_ctx_train, "none")
            with Session(model, plain, runtime) as session:
                baseline, _ = generate(session, prompt, sampling)
            hit, miss = word in answer.lower(), word in baseline.lower()
            found["selfextend"] += hit
            found["none"] += miss
            print(
                f"seed {seed} depth {depth:.1f} ({len(prompt)} tokens, {took:.0f} s) key {word!r}: "
                f"SelfExtend {'found' if hit else 'missed'} {answer.strip()[:50]!r}; "
                f"no extension {'found' if miss else 'missed'} {baseline.strip()[:50]!r}",
                flush=True,
            )
    print(f"\n{label}")
    print(f"found by SelfExtend {found['selfextend']}/{trials}, without extension {found['none']}/{trials}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
