"""Reading at depth against this machine's arithmetic limit: the CPU's fp32 FMA peak (and bf16 dot peak where
it has AVX512_BF16) from a small C benchmark, then a long text read under SelfExtend G16 W1024 with f16,
q8_0 and q4_0 caches, each in a process of its own: tokens/s and effective Gflop/s by 8k bucket, and their
share of the fp32 peak; and a profile at the deepest bucket of where the reading's time goes (perf's
cpu-clock samples of the reading process, by function, grouped).

A prompt token at position p costs 2 * (weights' parameters outside the embedding) flops for the matmuls and
4 * n_head * head_dim * n_layer * p for attention (Q*K and softmax*V over the p cells before it): for the
bundled SmolLM2-135M, 0.21 Gflop and 69,120 * p flops.

--kernels picks flash-attention kernels to compare side by side, by the value of GGML_CPU_FA_KERNEL each
reading process gets (see patches/0005: "tiled" is patch 0003's kernel, "gqa" the fifth patch's). With
--alternate they take turns chunk by chunk within one reading in one process instead (the build reads the
variable at every op), so both meet the same depths, the same process and the same moment of the machine;
each bucket's figures are then each kernel's over its own chunks.

    python scripts/ceiling.py --tokens 32768 --types f16,q8_0,q4_0 --out docs/ceiling.json
    python scripts/ceiling.py --tokens 32768 --types q8_0 --kernels tiled,gqa --profile
    python scripts/ceiling.py --tokens 32768 --types q8_0 --kernels tiled,gqa --alternate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import save, table

GROUP, WINDOW, BUCKET = 16, 1024, 8192
PEAK_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define N 12
static long iters = 200000000L / N;
static void *fp32(void *out) {
    __m512 a[N], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-9f);
    for (int i = 0; i < N; i++) a[i] = _mm512_set1_ps((float)i);
    for (long k = 0; k < iters; k++) {
        _Pragma("GCC unroll 16")
        for (int i = 0; i < N; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    }
    float s = 0; for (int i = 0; i < N; i++) s += _mm512_reduce_add_ps(a[i]);
    *(float *)out = s; return NULL;
}
#ifdef __AVX512BF16__
static void *bf16(void *out) {
    __m512 a[N]; __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3380);
    for (int i = 0; i < N; i++) a[i] = _mm512_set1_ps((float)i);
    for (long k = 0; k < iters; k++) {
        _Pragma("GCC unroll 16")
        for (int i = 0; i < N; i++) a[i] = _mm512_dpbf16_ps(a[i], x, y);
    }
    float s = 0; for (int i = 0; i < N; i++) s += _mm512_reduce_add_ps(a[i]);
    *(float *)out = s; return NULL;
}
#endif
static double run(void *(*f)(void *), int threads) {
    pthread_t t[64]; float out[64]; struct timespec s, e;
    clock_gettime(CLOCK_MONOTONIC, &s);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, f, &out[i]);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &e);
    return (e.tv_sec - s.tv_sec) + 1e-9 * (e.tv_nsec - s.tv_nsec);
}
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    double flops = (double)iters * N * threads;
    printf("fp32 %.1f\n", flops * 32 / run(fp32, threads) / 1e9);
#ifdef __AVX512BF16__
    printf("bf16 %.1f\n", flops * 64 / run(bf16, threads) / 1e9);
#endif
    return 0;
}
"""


def peak(threads: int) -> dict[str, float]:
    """Gflop/s of fp32 FMA (and bf16 dot products) on ``threads`` threads, best of three runs."""
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "peak.c", Path(tmp) / "peak"
        source.write_text(PEAK_C)
        flags = ["-O3", "-march=native", "-pthread"]  # (the accumulators must stay in registers)
        subprocess.run(["gcc", *flags, str(source), "-o", str(binary)], check=True)
        best: dict[str, float] = {}
        for _ in range(3):
            for line in subprocess.run([str(binary), str(threads)], capture_output=True, text=True).stdout.split("\n"):
                if line:
                    kind, value = line.split()
                    best[kind] = max(best.get(kind, 0.0), float(value))
        return best


def flops(model, every_logit: bool = False) -> tuple[float, float]:
    """Flops of one prompt token: the weights' (outside the embedding; with ``every_logit``, the output
    layer's too), and attention's per cell before it."""
    import llama_cpp

    n_embd = llama_cpp.llama_model_n_embd(model.handle)
    n_head = llama_cpp.llama_model_n_head(model.handle)
    weights = 2.0 * (model.info.n_params - (0 if every_logit else model.n_vocab * n_embd))
    return weights, 4.0 * n_head * (n_embd // n_head) * model.info.n_layers


def read(kv: str, n_tokens: int, profile_at: int | None, perplexity: bool, turns: list[str] | None = None) -> dict:
    """In a child process: read the text with a ``kv`` cache; the (done, seconds) of every step, and with
    ``perplexity`` every token's logits (the output layer's flops counted) and the perplexity by bucket.
    Prints a line ``PROFILE`` once ``profile_at`` tokens are read (the parent then samples this process).
    With ``turns`` the kernels take turns a chunk each; ``kernels`` says which read each step."""
    from selfextend_local.engine.planning import Plan, align_cells
    from selfextend_local.engine.session import Session
    from selfextend_local.engine.settings import RuntimeSettings
    from selfextend_local.evaluation.perplexity import bucket_ppl, token_nlls
    from selfextend_local.locate import load_model
    from selfextend_local.tasks.corpus import long_tokens

    model = load_model()
    tokens = long_tokens(model, n_tokens)
    plan = Plan(GROUP, WINDOW, "neighbor", "auto", align_cells(n_tokens), model.info.n_ctx_train, "ceiling")
    marks, used = [(0, 0.0)], []
    told = [profile_at is None]

    def take_turn() -> None:
        if turns:
            os.environ["GGML_CPU_FA_KERNEL"] = turns[len(used) % len(turns)]
        used.append(os.environ.get("GGML_CPU_FA_KERNEL", "default"))

    def progress(done: int, total: int) -> None:
        marks.append((done, time.perf_counter() - start))
        take_turn()
        if not told[0] and done >= profile_at:
            print("PROFILE", flush=True)
            told[0] = True

    with Session(model, plan, RuntimeSettings(kv_type=kv)) as session:
        take_turn()
        start = time.perf_counter()
        if perplexity:
            nll = token_nlls(session, tokens, progress)
        else:
            session.ingest(tokens, progress)
    weights, per_cell = flops(model, every_logit=perplexity)
    out = {
        "kv_type": kv,
        "marks": marks,
        "kernels": used[: len(marks) - 1],
        "weights_flops": weights,
        "cell_flops": per_cell,
    }
    if perplexity:
        out["ppl"] = float(np.exp(nll.mean()))
        out["ppl_by_bucket"] = [{"from": a, "to": b, "ppl": p} for a, b, p in bucket_ppl(nll, BUCKET)]
    return out


def buckets(run: dict, peak_fp32: float, kernel: str | None = None) -> list[dict]:
    """tok/s and effective Gflop/s of each 8k bucket of a reading (with ``kernel``, over its chunks only)."""
    marks, out = run["marks"], []
    kernels = run.get("kernels") or [None] * (len(marks) - 1)
    steps = [(*marks[i], *marks[i + 1]) for i in range(len(marks) - 1) if kernel in (None, kernels[i])]
    for edge in range(BUCKET, marks[-1][0] + BUCKET, BUCKET):
        inside = [(d0, t0, d1, t1) for d0, t0, d1, t1 in steps if edge - BUCKET <= d0 and d1 <= edge]
        if not inside:
            continue
        tokens = sum(d1 - d0 for d0, _, d1, _ in inside)
        seconds = sum(t1 - t0 for _, t0, _, t1 in inside)
        work = sum(
            run["weights_flops"] * (d1 - d0) + run["cell_flops"] * (d1 * d1 - d0 * d0) / 2 for d0, _, d1, _ in inside
        )
        gflops = work / seconds / 1e9
        first, last = inside[0][0], inside[-1][2]
        out.append(
            {
                "from": first,
                "to": last,
                "name": f"{(edge - BUCKET) // 1024}-{edge // 1024}k",
                "tok_s": tokens / seconds,
                "gflops": gflops,
                "share": gflops / peak_fp32,
            }
        )
    return out


CATEGORIES = (  # a function's name -> where the reading's time goes
    ("flash attention", ("flash_attn", "simd_gemm", "soft_max")),
    ("weights' matmuls", ("mul_mat", "vec_dot", "gemm", "gemv", "quantize_row")),
    ("K-shift (rope)", ("rope",)),
    ("copies", ("cpy", "dup", "memcpy", "memmove", "get_rows", "set_rows")),
    ("threads waiting", ("barrier", "sched_yield", "spin", "futex", "ggml_graph_compute_thread")),
)


def profile(pid: int, seconds: float) -> list[dict]:
    """perf's cpu-clock samples of process ``pid`` for ``seconds``, by category of function."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        subprocess.run(
            [
                "perf",
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "-p",
                str(pid),
                "-o",
                str(data),
                "--",
                "sleep",
                str(seconds),
            ],
            capture_output=True,
        )
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--sort", "symbol", "--percent-limit", "0.1"],
            capture_output=True,
            text=True,
        ).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        share, name = float(parts[0][:-1]), " ".join(parts[2:])
        kind = next((k for k, keys in CATEGORIES if any(key in name for key in keys)), "other")
        shares[kind] = shares.get(kind, 0.0) + share
    return [{"where": k, "share": round(v, 1)} for k, v in sorted(shares.items(), key=lambda kv: -kv[1])]


def reading(
    kv: str, kernel: str | None, tokens: int, profile_at: int | None, perplexity: bool, turns: str = ""
) -> dict:
    env = {**os.environ, **({"GGML_CPU_FA_KERNEL": kernel} if kernel else {})}
    cmd = [sys.executable, __file__, "--child", kv, "--tokens", str(tokens)]
    cmd += ["--turns", turns] if turns else []
    cmd += ["--profile-at", str(profile_at)] if profile_at else []
    cmd += ["--perplexity"] if perplexity else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    found = None
    for line in proc.stdout:
        if line.strip() == "PROFILE":
            found = profile(proc.pid, 20)
        elif line.startswith("{"):
            result = json.loads(line)
    if proc.wait() != 0:
        raise SystemExit(f"the reading with {kv} failed")
    return {**result, "kernel": kernel or ("alternating" if turns else "default"), "profile": found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--kernels", default="", help="values of GGML_CPU_FA_KERNEL to compare (default: as built)")
    parser.add_argument("--profile", action="store_true", help="profile the last 8k bucket (needs perf)")
    parser.add_argument("--perplexity", action="store_true", help="every token's logits, and perplexity by bucket")
    parser.add_argument("--alternate", action="store_true", help="--kernels take turns a chunk each in one reading")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--turns", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-at", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        turns = [k for k in args.turns.split(",") if k]
        print(json.dumps(read(args.child, args.tokens, args.profile_at, args.perplexity, turns)), flush=True)
        return 0
    kernels = [k for k in args.kernels.split(",") if k] or [None]
    if args.alternate and len(kernels) < 2:
        raise SystemExit("--alternate needs two or more --kernels, e.g. --kernels tiled,gqa")
    if args.alternate and "," in args.types:
        raise SystemExit("--alternate reads one cache type at a time, e.g. --types q8_0")
    from selfextend_local.engine.settings import default_threads

    peaks = peak(default_threads())
    print(f"peak on {default_threads()} threads: " + ", ".join(f"{k} {v:,.1f} Gflop/s" for k, v in peaks.items()))
    at = args.tokens - BUCKET + 2048 if args.profile else None
    if args.alternate:
        runs = [reading(kv, None, args.tokens, at, args.perplexity, args.kernels) for kv in args.types.split(",")]
    else:
        runs = [reading(kv, k, args.tokens, at, args.perplexity) for kv in args.types.split(",") for k in kernels]
    rows = []
    for run in runs:
        for kernel in kernels if args.alternate else [None]:
            for b in buckets(run, peaks["fp32"], kernel):
                rows.append(
                    [
                        run["kv_type"],
                        kernel or run["kernel"],
                        b["name"],
                        b["tok_s"],
                        b["gflops"],
                        f"{b['share']:.2f}",
                    ]
                )
    table(["kv", "kernel", "bucket", "tok/s", "Gflop/s", "share of fp32 peak"], rows)
    if args.perplexity:
        table(
            ["kv", "kernel", "perplexity"]
            + [f"{b['from'] // 1024}-{b['to'] // 1024}k" for b in runs[0]["ppl_by_bucket"]],
            [
                [r["kv_type"], r["kernel"], f"{r['ppl']:.4f}"] + [f"{b['ppl']:.4f}" for b in r["ppl_by_bucket"]]
                for r in runs
            ],
        )
    for run in runs:
        if run["profile"]:
            print(
                f"where the time goes at {at // 1024}k+, {run['kv_type']} ({run['kernel']}): "
                + ", ".join(f"{p['where']} {p['share']}%" for p in run["profile"])
            )
    figures = {"tokens": args.tokens, "group": GROUP, "window": WINDOW, "peak": peaks, "runs": runs}
    if args.alternate:
        figures["by_kernel"] = {k: buckets(r, peaks["fp32"], k) for r in runs for k in kernels}
    save(args.out, {"flags": " ".join(sys.argv[1:]), **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
