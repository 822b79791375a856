"""Flash attention on a quantized KV cache, stock kernel against ours (patches/0003), side by side in one run.

On the engine (the installed build must carry the patch; GGML_CPU_FA_CONVERT=0 sends quantized K/V back to
the stock per-row kernel, read at every flash-attention op, so both run in this one process on the same
weights, alternating):
- ingestion tok/s of f16, q8_0 and q4_0 at 2k, 4k and 8k tokens without extension, and at 12k under
  SelfExtend G4 W2048 (f16 takes the same kernel either way: measured once a round, the reference);
- decode tok/s at 8k (64 greedy tokens after the 8k prompt);
- with --perplexity, the 12k perplexity under G4 W2048 of q8_0 and q4_0 with each kernel.
And with llama.cpp's own llama-bench (-fa 1 -ctk T -ctv T), built from the same sdist twice, with patches
0001-0002 (stock kernel) and with all three (cached in ~/.cache/selfextend-local/fa-bench/KEY):
prompt tok/s at the same lengths and decode tok/s at a depth of 8k.

    python scripts/bench_fa_kernel.py                         # about an hour on two cores
    python scripts/bench_fa_kernel.py --lengths 2048,4096 --skip-llama-bench --repeats 1
    python scripts/bench_fa_kernel.py --bench-lengths 2048,4096 --bench-depth 4096 --json docs/fa_kernel.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

from selfextend_local import llama_build
from selfextend_local.engine.build import TILED_QUANTIZED_FA, patch_level
from selfextend_local.engine.generate import stream_generate
from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import RuntimeSettings, SamplingSettings, default_threads
from selfextend_local.evaluation.perplexity import token_nlls
from selfextend_local.locate import load_model
from selfextend_local.paths import bundled_model
from selfextend_local.tasks.corpus import long_tokens

TYPES = ("f16", "q8_0", "q4_0")
EXTENDED = (12288, 4, 2048)  # tokens, G, W
KERNELS = {"stock": "0", "patched": "1"}
DECODE_AT, DECODE_TOKENS = 8192, 64


def kernel(name: str) -> None:
    os.environ["GGML_CPU_FA_CONVERT"] = KERNELS[name]


def session(model, kv: str, n: int, group: int = 1, window: int = 2048) -> Session:
    """A session sized for ``n`` tokens and a short reply."""
    plan = Plan(group, window, "neighbor", "auto", align_cells(n + DECODE_TOKENS), model.info.n_ctx_train, "bench")
    return Session(model, plan, RuntimeSettings(kv_type=kv))


RUNNERS = {"f16": ("f16", "patched"), **{f"{kv}/{k}": (kv, k) for kv in TYPES[1:] for k in KERNELS}}


def lockstep(model, tokens, group: int, window: int, repeats: int) -> dict[str, float]:
    """tok/s of every runner (a type and a kernel), fed the same 512-token chunks in turn, who goes first
    rotating; each chunk's best time over ``repeats`` passes (so a slow moment of this shared machine
    costs every runner alike, and a pass's worst chunks do not count)."""
    best: dict[str, list[float]] = {}
    for r in range(repeats):
        sessions = {name: session(model, kv, len(tokens), group, window) for name, (kv, _) in RUNNERS.items()}
        names = list(sessions)
        try:
            for k, offset in enumerate(range(0, len(tokens), 512)):
                part = tokens[offset : offset + 512]
                for name in names[(k + r) % len(names) :] + names[: (k + r) % len(names)]:
                    kernel(RUNNERS[name][1])
                    start = time.perf_counter()
                    sessions[name].ingest(part)
                    took = time.perf_counter() - start
                    times = best.setdefault(name, [])
                    if len(times) <= k:
                        times.append(took)
                    else:
                        times[k] = min(times[k], took)
        finally:
            for s in sessions.values():
                s.close()
    return {name: len(tokens) / sum(times) for name, times in best.items()}


def decode_rates(model, tokens, kv: str) -> dict[str, float]:
    """Greedy decode after an 8k prompt with each kernel, on one ingestion (the prompt read once)."""
    out = {}
    greedy = SamplingSettings(temperature=0, max_tokens=DECODE_TOKENS)
    with session(model, kv, len(tokens)) as s:
        kernel("patched")
        s.ingest(tokens[:-1])
        for name in KERNELS:
            kernel(name)
            chunks = list(stream_generate(s, tokens, greedy))
            out[name] = chunks[-1].generate_tps
            s.truncate(len(tokens) - 1)
    return out


def engine_rows(model, lengths: list[int], repeats: int) -> list[dict]:
    """Ingestion in lockstep at each length (and under SelfExtend), then decode at 8k."""
    rows = []
    for n, group, window in [(n, 1, 2048) for n in lengths] + [EXTENDED]:
        for name, rate in lockstep(model, long_tokens(model, n), group, window, repeats).items():
            kv, which = RUNNERS[name]
            rows.append({"case": [n, group, kv], "kernel": which, "tok_s": round(rate, 1)})
            print(f"ingest {n} G{group} {name}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    for _ in range(repeats):
        for kv in TYPES:
            for which, rate in decode_rates(model, long_tokens(model, DECODE_AT), kv).items():
                rows.append({"case": ["decode", DECODE_AT, kv], "kernel": which, "tok_s": round(rate, 1)})
    best: dict[tuple, dict] = {}
    for row in rows:  # decode: the best of the repeats
        key = (tuple(row["case"]), row["kernel"])
        if key not in best or row["tok_s"] > best[key]["tok_s"]:
            best[key] = row
    return list(best.values())


def perplexities(model) -> dict:
    """12k perplexity under G4 W2048 of each quantized type, with each kernel."""
    n, group, window = EXTENDED
    tokens = long_tokens(model, n)
    out = {}
    for kv in TYPES[1:]:
        for name in KERNELS:
            kernel(name)
            with session(model, kv, n, group, window) as s:
                out[f"{kv}/{name}"] = float(np.exp(token_nlls(s, tokens).mean()))
            print(f"ppl {kv} {name}: {out[f'{kv}/{name}']:.4f}", file=sys.stderr, flush=True)
    return out


# -- llama-bench, stock and patched ---------------------------------------------------------------------


def bench_dir() -> Path:
    digest = hashlib.sha256(llama_build.KNOWN_VERSION.encode())
    for name, data in llama_build.patches():
        digest.update(name.encode() + data)
    return llama_build.cache_root().parent / "fa-bench" / digest.hexdigest()[:16]


def build_bench(out: Path, patches: list[tuple[str, bytes]]) -> Path:
    """llama-bench from the sdist with ``patches`` (cmake, that target only), cached in ``out``."""
    binary = out / "llama-bench"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(prefix="selfextend-fa-") as tmp:
        sdist = llama_build.download_sdist(llama_build.KNOWN_VERSION, Path(tmp))
        source = llama_build.extract(sdist, Path(tmp) / "src")
        for _, data in patches:
            subprocess.run(["patch", "-p1", "--forward", "--batch", "--silent"], input=data, cwd=source, check=True)
        tree, build = source / "vendor" / "llama.cpp", Path(tmp) / "build"
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
        print(f"building llama-bench ({len(patches)} patches) once, cached in {out}", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *flags], check=True, capture_output=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", "llama-bench"], check=True)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-bench", binary)
    return binary


def llama_bench(binary: Path, kv: str, args: list[str], repeats: int = 2) -> float:
    cmd = [str(binary), "-m", str(bundled_model()), "-fa", "1", "-ctk", kv, "-ctv", kv, "-t", str(default_threads())]
    # No warm-up pass: it would read every prompt a third time; the model is already in the page cache.
    cmd += [*args, "-r", str(repeats), "--no-warmup", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)[0]["avg_ts"])


def llama_bench_rows(lengths: list[int], depth: int) -> list[dict]:
    everything = llama_build.patches()
    stock = [p for p in everything if not p[0].startswith(("0003", "0005"))]  # 0005 builds on 0003
    binaries = {
        "stock": build_bench(bench_dir() / "stock", stock),
        "patched": build_bench(bench_dir() / "patched", everything),
    }
    rows = []
    for kv in TYPES:
        for case, args in [(f"prompt {n}", ["-p", str(n), "-n", "0"]) for n in lengths] + [
            (f"decode at {depth}", ["-p", "0", "-n", str(DECODE_TOKENS), "-d", str(depth)])
        ]:
            for name, binary in binaries.items():
                rows.append({"case": case, "kv": kv, "kernel": name, "tok_s": round(llama_bench(binary, kv, args), 1)})
                print(f"llama-bench {case} {kv} {name}: {rows[-1]['tok_s']}", file=sys.stderr, flush=True)
    return rows


# -- the report ------------------------------------------------------------------------------------------


def report(engine: list[dict], bench: list[dict], ppl: dict) -> None:
    table = {(tuple(r["case"]), r["kernel"]): r["tok_s"] for r in engine}
    print("\nthe engine (ours), tok/s; ratio to f16 with each kernel")
    print(f"{'case':<22} {'type':<6} {'stock':>8} {'patched':>8} {'gain':>6} {'stock/f16':>10} {'patched/f16':>12}")
    for case in dict.fromkeys(tuple(r["case"][:2]) for r in engine):
        f16 = table.get(((*case, "f16"), "patched"))
        for kv in TYPES[1:]:
            stock, ours = table.get(((*case, kv), "stock")), table.get(((*case, kv), "patched"))
            if stock and ours and f16:
                label = (
                    f"{'decode at' if case[0] == 'decode' else 'ingest'} {case[1] if case[0] == 'decode' else case[0]}"
                )
                label += f" G{case[1]}" if case[0] != "decode" and case[1] > 1 else ""
                cells = f"{stock:>8.1f} {ours:>8.1f} {ours / stock:>6.2f} {stock / f16:>10.2f} {ours / f16:>12.2f}"
                print(f"{label:<22} {kv:<6} {cells}")
    if bench:
        by = {(r["case"], r["kv"], r["kernel"]): r["tok_s"] for r in bench}
        print("\nllama-bench -fa 1 (llama.cpp's own tool), tok/s")
        for case in dict.fromkeys(r["case"] for r in bench):
            cells = "  ".join(f"{kv} {by[(case, kv, 'stock')]:.1f} -> {by[(case, kv, 'patched')]:.1f}" for kv in TYPES)
            print(f"{case:<16} {cells}")
    if ppl:
        for kv in TYPES[1:]:
            stock, ours = ppl[f"{kv}/stock"], ppl[f"{kv}/patched"]
            change = (ours / stock - 1) * 100
            print(f"12k perplexity under G4 W2048, {kv}: stock {stock:.4f}, patched {ours:.4f} ({change:+.3f}%)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--perplexity", action="store_true")
    parser.add_argument("--skip-llama-bench", action="store_true")
    parser.add_argument("--bench-lengths", default=None, help="llama-bench's prompt lengths (default: --lengths)")
    parser.add_argument("--bench-depth", type=int, default=DECODE_AT, help="llama-bench's decode depth")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if patch_level(llama_cpp.__version__) < TILED_QUANTIZED_FA:
        raise SystemExit(
            f"llama-cpp-python {llama_cpp.__version__} lacks the patch: run python -m selfextend_local.llama_build"
        )
    lengths = [int(n) for n in args.lengths.split(",")]
    bench_lengths = [int(n) for n in (args.bench_lengths or args.lengths).split(",")]
    command = "python scripts/bench_fa_kernel.py " + " ".join(sys.argv[1:])
    setup = {"date": time.strftime("%Y-%m-%d"), "command": command.strip(), "threads": default_threads()}
    setup |= {"repeats": args.repeats, "llama_cpp": llama_cpp.__version__}
    figures = {**setup, "engine": [], "llama_bench": [], "perplexity": {}}

    def keep() -> None:  # after each part, so a long run stopped early keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))

    model = load_model()
    figures["engine"] = engine_rows(model, lengths, args.repeats)
    keep()
    if args.perplexity:
        figures["perplexity"] = perplexities(model)
        keep()
    if not args.skip_llama_bench:
        figures["llama_bench"] = llama_bench_rows(bench_lengths, args.bench_depth)
        keep()
    report(figures["engine"], figures["llama_bench"], figures["perplexity"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
