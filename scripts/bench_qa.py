"""Long-document QA against the physical floor: the engine's `qa` path beside a plain llama-cpp-python loop.

For each document length, four processes, same tokens, same context size, same chunk size, in one run:

- speed:  the plain loop and the engine's ingestion in lockstep, chunk by chunk in alternating order, in one
          process (the machine's noise falls on both alike); the fastest of --repeats per chunk is kept;

- plain:  a bare llama-cpp-python loop ingests the document at positions 0..N-1 (no extension: at 16k the
          model reads garbage, but the work is the same; this is the floor of this design), then the first
          question, then decodes greedily;
- engine: DocumentQA ingests the document (SelfExtend planned for its length), answers question 1, writes
          the cache entry, answers question 2 from memory;
- disk:   a new DocumentQA restores the document from that cache entry and answers question 2.

The last three run one after another, each alone, so each one's peak RSS is its own. Printed: ingestion
tokens/s (engine / plain, from the lockstep run), decode tokens/s of each answer, time to first token of the
second question from memory and from disk, peak RSS against the KV cache plus the model.

    python scripts/bench_qa.py                 # 8k and 16k tokens
    python scripts/bench_qa.py --long          # and 24k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ("Summarise what this document explains, in detail.", "What does the assert statement do?")
ANSWER_TOKENS = 64


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def document(model, n_tokens: int) -> str:
    from selfextend_local.tasks.corpus import pydoc_text

    return model.detokenize(model.tokenize(pydoc_text(), add_special=False)[:n_tokens])


def answer(doc, question: str) -> dict:
    start = time.perf_counter()
    stamps = []
    for chunk in doc.ask(question):
        if chunk.token is not None:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "ttft": stamps[0] - start if stamps else None,
        "tokens": len(stamps),
        "decode_tps": decode,
        "after_last_token": end - stamps[-1] if stamps else None,
    }


def child_engine(args) -> dict:
    from selfextend_local.engine.kvcache import KVCache
    from selfextend_local.engine.memory import kv_bytes_per_cell
    from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.qa import DocumentQA

    model = load_model(None)
    sampling = SamplingSettings(temperature=0, max_tokens=ANSWER_TOKENS)
    cache = KVCache(Path(args.cache))
    out: dict = {}
    with DocumentQA(model, document(model, args.tokens), ExtendSettings(), RuntimeSettings(), sampling, cache) as doc:
        out["doc_tokens"] = len(doc.doc_tokens)
        out["n_ctx"] = doc.session.n_ctx
        out["plan"] = doc.session.plan.describe()
        out["division"] = doc.session.divider.name if doc.session.divider else "-"
        out["kv_bytes"] = kv_bytes_per_cell(model.info) * doc.session.n_ctx
        out["model_bytes"] = model.info.size_bytes
        if args.mode == "engine":
            start = time.perf_counter()
            assert doc.load() == "ingested"
            out["ingest_seconds"] = time.perf_counter() - start
            out["first"] = answer(doc, QUESTIONS[0])  # its tail includes writing the cache entry
            out["second"] = answer(doc, QUESTIONS[1])
        else:
            start = time.perf_counter()
            assert doc.load() == "cache"
            out["restore_seconds"] = time.perf_counter() - start
            out["second"] = answer(doc, QUESTIONS[1])
            out["second"]["ttft"] += out["restore_seconds"]
    out["peak_rss"] = peak_rss()
    return out


def child_plain(args) -> dict:
    import llama_cpp
    import numpy as np

    from selfextend_local.locate import load_model
    from selfextend_local.tasks.qa import document_prompt, question_tokens

    model = load_model(None)
    doc_tokens, after = document_prompt(model, document(model, args.tokens))
    q_tokens = question_tokens(model, QUESTIONS[0], after)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = args.ctx
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = 1
    from selfextend_local.engine.settings import default_threads

    params.n_threads = params.n_threads_batch = default_threads()
    ctx = llama_cpp.llama_init_from_model(model.handle, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    n_past = 0

    def decode(tokens: list[int]) -> None:
        nonlocal n_past
        for offset in range(0, len(tokens), 512):
            part = tokens[offset : offset + 512]
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, n_past + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(part) - 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            n_past += len(part)

    start = time.perf_counter()
    decode(doc_tokens)
    llama_cpp.llama_synchronize(ctx)
    ingest = time.perf_counter() - start
    decode(q_tokens)
    stamps = []
    for _ in range(ANSWER_TOKENS):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(model.n_vocab,))
        decode([int(logits.argmax())])
        stamps.append(time.perf_counter())
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return {
        "doc_tokens": len(doc_tokens),
        "ingest_seconds": ingest,
        "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "peak_rss": peak_rss(),
    }


def child_speed(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_ingest import BareLoop, lockstep_pass

    from selfextend_local.engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.qa import DocumentQA

    class DocumentRun:
        def __init__(self, doc) -> None:
            self.session, self.ctx = doc.session, doc.session.ctx

        def ingest(self, part: list[int], last: bool) -> None:
            self.session.ingest(part)

    model = load_model(None)
    runtime = RuntimeSettings()
    sampling = SamplingSettings(temperature=0, max_tokens=ANSWER_TOKENS)
    text = document(model, args.tokens)
    passes: dict[str, list[list[float]]] = {"plain": [], "engine": []}
    for _ in range(args.repeats):
        with DocumentQA(model, text, ExtendSettings(), runtime, sampling) as doc:
            plain = BareLoop(model, doc.session.n_ctx, runtime)
            try:
                measured = lockstep_pass(
                    {"plain": plain, "engine": DocumentRun(doc)}, doc.doc_tokens, doc.session.chunk
                )
            finally:
                plain.close()
            n = len(doc.doc_tokens)
        for name, seconds in measured.items():
            passes[name].append(seconds)
    return {name: n / sum(map(min, zip(*runs))) for name, runs in passes.items()}


def run_child(mode: str, tokens: int, cache: str, ctx: int = 0, repeats: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--tokens", str(tokens), "--cache", cache, "--ctx", str(ctx)]
    cmd += ["--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def report(n: int, speed: dict, plain: dict, engine: dict, disk: dict) -> None:
    eng_tps, plain_tps = speed["engine"], speed["plain"]
    first, second, again = engine["first"], engine["second"], disk["second"]
    floor = engine["kv_bytes"] + engine["model_bytes"]
    print(f"\n== {n:,}-token document ({engine['doc_tokens']:,} prompt tokens, context {engine['n_ctx']:,}) ==")
    print(f"engine: {engine['plan']}; division {engine['division']}")
    print(
        f"ingestion   plain {plain_tps:7.1f} tok/s   engine {eng_tps:7.1f} tok/s   engine/plain "
        f"{eng_tps / plain_tps:.3f}   (lockstep; alone: plain {plain['doc_tokens'] / plain['ingest_seconds']:.1f}, "
        f"engine {engine['doc_tokens'] / engine['ingest_seconds']:.1f})"
    )
    print(
        f"decode      plain {plain['decode_tps']:7.1f} tok/s   first answer {first['decode_tps']:7.1f} "
        f"({first['tokens']} tokens)   second {second['decode_tps']:7.1f} ({second['tokens']})   "
        f"first/second {first['decode_tps'] / max(second['decode_tps'], 1e-9):.3f}"
    )
    print(
        f"first answer: TTFT {first['ttft']:.2f} s; cache entry written after it in {first['after_last_token']:.2f} s"
    )
    print(f"second question TTFT   from memory {second['ttft']:.3f} s   from disk {again['ttft']:.3f} s")
    print(
        f"peak RSS    plain {mib(plain['peak_rss'])}   engine {mib(engine['peak_rss'])}   disk {mib(disk['peak_rss'])}"
        f"   (KV cache {mib(engine['kv_bytes'])} + model {mib(engine['model_bytes'])} = {mib(floor)}; "
        f"engine overhead {mib(engine['peak_rss'] - floor)}, plain overhead {mib(plain['peak_rss'] - floor)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--long", action="store_true", help="also 24k tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; fastest kept")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        children = {"plain": child_plain, "speed": child_speed}
        result = children.get(args.child, child_engine)(args)
        print(json.dumps(result))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")] + ([24576] if args.long else [])
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}; lockstep ingestion: fastest of {args.repeats} per chunk")
    for n in lengths:
        speed = run_child("speed", n, "", repeats=args.repeats)
        with tempfile.TemporaryDirectory() as cache:
            engine = run_child("engine", n, cache)
            disk = run_child("disk", n, cache)
            plain = run_child("plain", n, cache, engine["n_ctx"])
        report(n, speed, plain, engine, disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
