"""Regenerate docs/RESULTS.md (and its plots and raw JSON) from measurements taken now, on this machine.

    python scripts/make_results.py                      # everything (about an hour on two CPU cores)
    python scripts/make_results.py --sections ppl,ladder  # re-measure some sections, keep the others
    python scripts/make_results.py --gpu-layers 99 --sections probe,bench,ppl,passkey \
        --group 8 --window 1024 --ppl-tokens 32768 --ppl-bucket 4096 \
        --passkey-lengths 16384,32768 --passkey-seeds 3 --passkey-kinds digits,word   # on a CUDA build

Sections: probe, reference, ppl, passkey, ladder, bench. Raw figures go to docs/results.json; each run
replaces the sections it measured and keeps the rest, and the Markdown is rebuilt from the JSON. A run
with --gpu-layers keeps its figures apart (under "gpu", plots named *-gpu.png), so CPU and GPU results
sit side by side, each from its own machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from selfextend_local.engine.planning import Plan, align_cells
from selfextend_local.engine.session import Session
from selfextend_local.engine.settings import RuntimeSettings
from selfextend_local.locate import load_model
from selfextend_local.tasks.corpus import long_tokens
from selfextend_local.tasks.info import format_table

DOCS = Path(__file__).resolve().parents[1] / "docs"
RAW = DOCS / "results.json"
SECTIONS = ("probe", "reference", "ppl", "passkey", "ladder", "bench")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_probe(model, runtime) -> dict:
    plan = Plan(4, 64, "neighbor", "auto", 256, model.info.n_ctx_train, "probe")
    with Session(model, plan, runtime) as s:
        probe = s.divider.probe
    return {"native_correct": probe.native_correct, "kl": probe.kl, "describe": probe.describe()}


def engine_logits(model, tokens, group, window, schedule, batch=32):
    out = []
    plan = Plan(group, window, schedule, "auto", 1024, model.info.n_ctx_train, "reference")
    with Session(model, plan, RuntimeSettings(batch=batch)) as s:
        s.ingest(tokens, on_logits=lambda off, lg: out.append(lg))
    return np.concatenate(out)


def measure_reference(model) -> dict:
    from selfextend_local.engine.metrics import kl_divergence
    from selfextend_local.evaluation.reference import ReferenceModel

    ref = ReferenceModel(model.path)
    tokens = long_tokens(model, 300)
    want, got = ref.logits(tokens), engine_logits(model, tokens, 1, 128, "neighbor")
    sanity = {
        "tokens": 300,
        "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl_divergence(want, got).mean()),
    }
    tokens = long_tokens(model, 600)
    exact = ref.logits(tokens, group=4, window=128)
    fidelity = {"tokens": 600, "group": 4, "window": 128, "batch": 32, "methods": {}}
    for name, g, sched in [("none", 1, "neighbor"), ("neighbor", 4, "neighbor"), ("llamacpp", 4, "llamacpp")]:
        got = engine_logits(model, tokens, g, 128, sched)
        kl = kl_divergence(exact, got)
        fidelity["methods"][name] = {
            "mean_kl": float(kl.mean()),
            "mean_kl_beyond_window": float(kl[128:].mean()),
            "top1_agreement": float((exact.argmax(-1) == got.argmax(-1)).mean()),
        }
    return {"sanity": sanity, "fidelity": fidelity}


METHODS = ["none", "linear", "yarn", "neighbor", "llamacpp"]


def measure_ppl(model, runtime, n_tokens: int, group: int, window: int, bucket: int, plot: str) -> dict:
    from selfextend_local.evaluation.perplexity import compare_methods, ppl_plot

    tokens = long_tokens(model, n_tokens)
    report = compare_methods(
        model,
        tokens,
        METHODS,
        group,
        window,
        runtime,
        bucket=bucket,
        progress_for=lambda m: lambda d, t: None,
    )
    ppl_plot(report, str(DOCS / plot))
    return {**report, "plot": plot}


def measure_passkey(model, runtime, lengths, depths, seeds, kinds, group: int, window: int, plot: str) -> dict:
    from selfextend_local import passkey as pk

    trials = pk.grid(lengths, depths, list(range(seeds)), kinds)
    results = pk.run(
        model,
        METHODS,
        trials,
        group,
        window,
        runtime,
        on_result=lambda r: say(f"passkey {r['method']} {r['length']} {r['depth']} {r['variant']}: {r['correct']}"),
    )
    pk.heatmap(results, str(DOCS / plot))
    return {"group": group, "window": window, "kinds": kinds, "results": results, "plot": plot}


def measure_bench(runtime, n_tokens: int, group: int, window: int) -> dict:
    """scripts/bench_ingest.py in a child process (whole-prompt mode on a GPU, lockstep on a CPU)."""
    mode = "whole" if runtime.gpu_layers else "lockstep"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, str(Path(__file__).with_name("bench_ingest.py")), "--tokens", str(n_tokens)]
        command += ["--group", str(group), "--window", str(window), "--gpu-layers", str(runtime.gpu_layers)]
        command += ["--mode", mode, "--repeats", "3", "--per-position", "--json", str(out)]
        subprocess.run(command, check=True, stdout=sys.stderr)
        report = json.loads(out.read_text())
    return {"group": group, "window": window, "mode": mode, "tokens_per_second": report["tokens_per_second"]}


def measure_ladder(model, runtime, n_tokens: int) -> dict:
    from selfextend_local.engine.model import Model
    from selfextend_local.evaluation.convert import LADDER, quantize, rewrite_gguf
    from selfextend_local.evaluation.validate import Thresholds, compare_logits, summarize, verdict

    with tempfile.TemporaryDirectory() as tmp:
        (f16,) = rewrite_gguf(model.path, Path(tmp) / "ref-F16.gguf", to_f16=True)
        files = [quantize(f16, Path(tmp) / f"ref-{q}.gguf", q) for q in LADDER]
        reference = Model(f16)
        candidates = [Model(p) for p in files]
        tokens = long_tokens(reference, n_tokens)
        plan = Plan(4, 2048, "neighbor", "auto", align_cells(n_tokens), reference.info.n_ctx_train, "ladder")
        arrays = compare_logits(candidates, reference, tokens, plan, runtime)
        sizes = {q: p.stat().st_size for q, p in zip(LADDER, files)}
    rows = {}
    for q, a in zip(LADDER, arrays):
        stats = summarize(a)
        rows[q] = {
            **stats,
            "size_bytes": sizes[q],
            "validate_default": "PASS" if not verdict(stats, Thresholds()) else "FAIL",
        }
    return {"tokens": n_tokens, "group": 4, "window": 2048, "thresholds": Thresholds().__dict__, "levels": rows}


def machine_line(m: dict) -> str:
    where = f"{m['gpu']} ({m['gpu_layers']} layers offloaded), " if m.get("gpu") else ""
    return (
        f"Measured by `python scripts/make_results.py{m.get('flags', '')}` on {m['date']}: {where}"
        f"{m['cpu']}, {m['threads']} threads, Python {m.get('python', '3.11')}, llama-cpp-python {m['llama_cpp']}, "
        f"model {m['model']}."
    )


def render(raw: dict) -> str:
    out = [
        "# Results",
        "",
        "Every figure below is measured, and regenerated, by `scripts/make_results.py`; the raw numbers are in "
        "`results.json`. Text: the pydoc topic help (`pydoc_data.topics`).",
        "",
        "## On the CPU",
        "",
        machine_line(raw["machine"]),
        "",
    ]
    out += render_part(raw, "CPU", "the longest length that fits in a few minutes per trial on two cores")
    if gpu := raw.get("gpu"):
        out += ["## On the GPU", "", machine_line(gpu["machine"]), ""]
        if note := gpu["machine"].get("note"):
            out += [note, ""]
        out += render_part(gpu, "GPU", "lengths as in the table")
    out += render_kv(_load(DOCS / "kv.json")) + render_kv_quality(_load(DOCS / "kv_quality.json"))
    out += render_fa_kernel(_load(DOCS / "fa_kernel.json")) + render_fa_kl(_load(DOCS / "fa_kernel_kl.json"))
    out += render_long_read(_load(DOCS / "long_read.json"), "long_read.png")
    out += render_long_read(_load(DOCS / "long_read-f16.json"), "long_read-f16.png")
    out += render_long_read(_load(DOCS / "long_read-g32.json"), "long_read-g32.png")
    out += render_short_context(_load(DOCS / "short_context.json")) + render_peer(_load(DOCS / "peer.json"))
    out += render_grammar(_load(DOCS / "grammar.json")) + render_page(_load(DOCS / "page.json"))
    out += render_kshift(_load(DOCS / "kshift.json"))
    out += render_ceiling(_load(DOCS / "ceiling.json")) + render_alternating(_load(DOCS / "ceiling-alternating.json"))
    out += render_fa_op(_load(DOCS / "fa_op.json"))
    out += render_checkpoints(_load(DOCS / "checkpoints.json"))
    out += render_checkpoints(_load(DOCS / "checkpoints-32k.json"), "checkpoints-32k.json")
    out += render_beside(_load(DOCS / "beside.json"))
    drafts = ("drafts-short.json", "drafts-short-q8_0.json", "drafts-short-4.json", "drafts.json", "drafts-q8_0.json")
    drafts += ("drafts-4.json",)
    out += render_drafts([_load(DOCS / name) for name in drafts])
    out += render_depth(_load(DOCS / "depth.json"))
    return "\n".join(out)


def _load(path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def render_kv(kv: dict | None) -> list[str]:
    """The KV cache types under SelfExtend, from docs/kv.json (`python scripts/bench_kv.py --json docs/kv.json`)."""
    if not kv:
        return []
    rows = kv["results"]
    base = rows["f16"]
    out = [
        "## KV cache types under SelfExtend (CPU)",
        "",
        f"Measured by `{kv.get('command', 'python scripts/bench_kv.py --json docs/kv.json')}` on {kv['date']}, "
        f"llama-cpp-python {kv['llama_cpp']}: neighbor G4 W2048, {kv['tokens']:,} tokens of the pydoc text. "
        "Perplexity of the first 12,288 tokens and of the 2,048 after 8k, 16k and 24k where the text reaches "
        "(every key there has been moved by each grouping step before it); a pass-key and a name hidden in ~12k "
        f"tokens at depths {kv.get('depths', '0.25,0.5,0.75')}; the KV bytes of the 12k state as llama.cpp "
        f"serialises it; the K-shift probe's KL; {_kv_speed(kv.get('speed_repeats', 2))}.",
        "",
        "| cache | PPL 12k | vs f16 | after 8k | after 16k | after 24k | pass-key | name | KV bytes vs f16 | "
        "ingestion vs f16 | probe KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        after = " | ".join(f"{r['after'][k]:.2f}" if k in r["after"] else "-" for k in ("8k", "16k", "24k"))
        speed = r.get("ingest_tps_12k"), base.get("ingest_tps_12k")
        ratio = f"{speed[0] / speed[1]:.3f}" if all(speed) else "-"
        kl = f"{r['probe_kl']:.4f}" if r.get("probe_kl") is not None else "-"
        out.append(
            f"| {name} | {r['ppl_12k']:.3f} | {r['ppl_12k'] / base['ppl_12k']:.4f} | {after} | "
            f"{r.get('passkey', '-')} | {r.get('name', '-')} | {r['kv_bytes_12k'] / base['kv_bytes_12k']:.3f} | "
            f"{ratio} | {kl} |"
        )
    out += ["", "Per 2,048-token bucket up to 12k:", "", "```"]
    out += [f"{name:18s} " + "  ".join(f"{p:7.2f}" for p in r["buckets_12k"]) for name, r in rows.items()]
    return out + ["```", ""]


def _kv_speed(repeats: int) -> str:
    if repeats:
        return f"ingestion tokens/s at 12k, the types side by side in lockstep (fastest of {repeats} per chunk)"
    return "ingestion tokens/s of each 12k perplexity run, one after another on a quiet machine (not lockstep)"


WHO = ("selfextend-local", "llama-server")


def render_peer(peer: dict | None) -> list[str]:
    """Our server beside llama.cpp's own, from docs/peer.json (`python scripts/bench_peer.py --json ...`)."""
    if not peer:
        return []
    out = [
        "## Against llama.cpp's own server (CPU)",
        "",
        f"Measured by `python scripts/bench_peer.py --json docs/peer.json` on {peer['date']}: {peer['model']}, "
        f"`serve --parallel {peer['parallel']}` against `llama-server -np {peer['parallel']}` built from the same "
        f"patched llama.cpp, {peer['threads']} threads, the same streaming chat load ({peer['max_tokens']} tokens, "
        f"greedy, {peer['seconds']:.0f} s a cell), {peer['repeats']} rounds with the two servers alternating; "
        "tok/s is each server's median, the ratio the median of the rounds' own ratios, TTFT percentiles over "
        "every request of all rounds; tokens as each reply's usage counts them, TTFT to the first chunk with text.",
        "",
        "| clients | ours tok/s | llama-server tok/s | ours / llama-server | ours TTFT p50 / p99 | "
        "llama-server TTFT p50 / p99 | requests (ours / theirs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in peer["summary"]:
        ours, theirs = s["ours"], s["peer"]
        out.append(
            f"| {s['clients']} | {ours['tps']:.1f} | {theirs['tps']:.1f} | {s['ratio']:.2f} | "
            f"{ours['ttft'][0]:.3f} / {ours['ttft'][1]:.3f} s | {theirs['ttft'][0]:.3f} / {theirs['ttft'][1]:.3f} s | "
            f"{ours['requests']} / {theirs['requests']} |"
        )
    rounds = "; ".join(
        f"{s['clients']} client{'s' if s['clients'] > 1 else ''}: ours {s['ours']['tps_each']}, "
        f"llama-server {s['peer']['tps_each']}"
        for s in peer["summary"]
    )
    speeds = ", ".join(
        f"{n} sequence{'s' if int(n) > 1 else ''}: {v:.1f} tok/s" for n, v in peer["batched_bench"].items()
    )
    failed = {who: sum(r["requests"] - r["ok"] for r in peer["rows"] if r["who"] == who) for who in WHO}
    failures = (
        f" Requests that failed, not counted: ours {failed['selfextend-local']}, llama-server "
        f"{failed['llama-server']} (each at once, in 1-2 ms: it had closed the kept-alive connection; the "
        "client goes on with its next request)."
    )
    out += [
        "",
        f"Each round's tok/s: {rounds}.{failures}",
        "",
        f"llama-batched-bench generation (the kernels' ceiling): {speeds}.",
        "",
    ]
    return out + ([peer["note"], ""] if peer.get("note") else [])


def render_kv_quality(quality: dict | None) -> list[str]:
    """What each cache type costs in perplexity, with and without SelfExtend (`python scripts/kv_quality.py`)."""
    if not quality:
        return []
    table = quality["perplexity"]
    cases = list(table["f16"])
    out = [
        "## What each KV cache type costs in quality (CPU)",
        "",
        f"Measured by `{quality.get('command', 'python scripts/kv_quality.py')}` on {quality['date']}, "
        f"llama-cpp-python {quality['llama_cpp']}: perplexity of the pydoc text, against f16's.",
        "",
        "| cache | " + " | ".join(cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for kv, row in table.items():
        cells = " | ".join(f"{row[c]:.4f} ({row[c] / table['f16'][c] - 1:+.2%})" for c in cases)
        out.append(f"| {kv} | {cells} |")
    if stock := quality.get("stock_kernel"):
        out += ["", f"With the stock flash-attention kernel (`{stock['command']}`):", ""]
        for kv, row in stock["perplexity"].items():
            ours = table.get(kv, {})
            out += [
                f"- {kv}: "
                + "; ".join(f"{c} {row[c]:.4f} (ours {ours[c]:.4f}, {ours[c] / row[c] - 1:+.3%})" for c in row)
            ]
    return out + [""]


def render_fa_kl(kl: dict | None) -> list[str]:
    """Our kernel's next-token logits against the stock kernel's (`python scripts/fa_kernel_kl.py`)."""
    if not kl:
        return []
    out = [
        f"Next-token logits of our kernel ({_kl_kernel(kl)}) against the stock kernel's on the same cache "
        f"(every cached token written by the stock kernel; {kl['positions']} positions after {kl['cache']:,} "
        "cached tokens; mean KL), "
        "beside llama.cpp's own floor (its decode against its prefill's first row, stock kernel), measured by "
        f"`python scripts/fa_kernel_kl.py --json docs/fa_kernel_kl.json` on {kl['date']}:",
        "",
        "| weights | cache | decode | prefill | floor |",
        "|---|---|---|---|---|",
    ]
    for weights, rows in kl["mean_kl"].items():
        for kv, got in rows.items():
            out.append(f"| {weights} | {kv} | {got['decode']:.1e} | {got['prefill']:.1e} | {got['floor']:.1e} |")
    return out + [""]


def render_fa_kernel(fa: dict | None) -> list[str]:
    """Flash attention on a quantized cache, stock against patched (`python scripts/bench_fa_kernel.py`)."""
    if not fa:
        return []
    cell = {(tuple(r["case"]), r["kernel"]): r["tok_s"] for r in fa["engine"]}
    out = [
        "## Flash attention on a quantized KV cache, stock kernel and ours (CPU)",
        "",
        f"Measured by `{fa.get('command', 'python scripts/bench_fa_kernel.py')}` on {fa['date']}, "
        f"{fa['threads']} threads: ingestion in lockstep (every runner the same 512-token chunks in turn, each "
        f"chunk's best of {fa['repeats']}), the stock kernel through `GGML_CPU_FA_CONVERT=0` in the same process; "
        "decode: 64 greedy tokens after an 8k prompt.",
        "",
        "| case | f16 | q8_0 stock | q8_0 ours | q8_0 ours / f16 | q4_0 stock | q4_0 ours | q4_0 ours / f16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(tuple(r["case"][:2]) for r in fa["engine"]):
        f16 = cell.get(((*case, "f16"), "patched"))
        values = [cell.get(((*case, kv), k)) for kv in ("q8_0", "q4_0") for k in ("stock", "patched")]
        if not f16 or not all(values):
            continue
        label = f"decode at {case[1]:,}" if case[0] == "decode" else f"ingest {case[0]:,}"
        label += f" (G{case[1]} W2048)" if case[0] != "decode" and case[1] > 1 else ""
        q8s, q8p, q4s, q4p = values
        out.append(f"| {label} | {f16} | {q8s} | {q8p} | {q8p / f16:.2f} | {q4s} | {q4p} | {q4p / f16:.2f} |")
    if ppl := fa.get("perplexity"):
        out += [
            "",
            "12k perplexity under G4 W2048: "
            + "; ".join(
                f"{kv} stock {ppl[f'{kv}/stock']:.4f}, ours {ppl[f'{kv}/patched']:.4f} "
                f"({(ppl[f'{kv}/patched'] / ppl[f'{kv}/stock'] - 1) * 100:+.3f}%)"
                for kv in ("q8_0", "q4_0")
            )
            + ".",
        ]
    if bench := fa.get("llama_bench"):
        by = {(r["case"], r["kv"], r["kernel"]): r["tok_s"] for r in bench}
        out += [
            "",
            "llama.cpp's own `llama-bench -fa 1 -ctk T -ctv T`, built from the same sdist with patches "
            "0001-0002 (stock kernel) and with 0003, tok/s:",
            "",
            "| case | f16 | q8_0 stock -> ours | q4_0 stock -> ours |",
            "|---|---|---|---|",
        ]
        for case in dict.fromkeys(r["case"] for r in bench):
            out.append(
                f"| {case} | {by[(case, 'f16', 'patched')]} | {by[(case, 'q8_0', 'stock')]} -> "
                f"{by[(case, 'q8_0', 'patched')]} | {by[(case, 'q4_0', 'stock')]} -> {by[(case, 'q4_0', 'patched')]} |"
            )
    return out + [""]


def _kl_kernel(kl: dict) -> str:
    ours = kl.get("ours", "tiled")
    return "patch 0005's GQA tiles for a prefill" if ours == "gqa" else "patch 0003's tiles for a prefill"


def render_long_read(long: dict | None, plot: str) -> list[str]:
    """A ~100k-token read with q8_0 and f16 (`python scripts/long_read.py`), its plot in ``plot``."""
    if not long:
        return []
    command = long.get("command") or (
        f"python scripts/long_read.py --tokens {long['results'][0]['tokens']} --json docs/long_read.json "
        "--plot docs/long_read.png"
    )
    out = [
        f"## The long end: {long['results'][0]['tokens']:,} tokens read once, "
        f"{', '.join(r['kv_type'] for r in long['results'])} G{long['group']} (CPU)",
        "",
        f"Measured by `{command}` on {long['date']}: SelfExtend G{long['group']} W{long['window']}, each type in "
        "a process of its own (with --segment-minutes, a process a segment: each stops at a chunk's end with the "
        "reading's checkpoint written, the next resumes from it; the wall time is the segments' reading time, "
        "the restores included). Peak RSS: the largest of the segments', and beside it what the process held "
        "over Python and its libraries (the model, the KV cache, llama.cpp's compute buffers and the logits of "
        "a chunk, every token's kept for the perplexity). Buffers predicted: a chunk's logits three times over "
        "(llama.cpp's compute buffer holds them as a tensor, its output buffer keeps them, the script copies "
        "them); the predicted total is the KV bytes, the model and those.",
        "",
        "| cache | wall time | segments | tok/s | perplexity | peak RSS | over Python | KV bytes predicted | model "
        "| buffers predicted | over Python / predicted total |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in long["results"]:
        over = r["peak_rss_bytes"] - r["base_rss_bytes"] if "base_rss_bytes" in r else None
        buffers = r.get("predicted_buffer_bytes")
        total = r["predicted_kv_bytes"] + r["model_bytes"] + (buffers or 0)
        out.append(
            f"| {r['kv_type']} | {r['seconds'] / 60:.1f} min | {r.get('segments', 1)} | {r['tok_s']} | {r['ppl']} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {'-' if over is None else f'{over / 2**30:.2f} GiB'} | "
            f"{r['predicted_kv_bytes'] / 2**30:.2f} GiB | {r['model_bytes'] / 2**20:.0f} MiB | "
            f"{'-' if buffers is None else f'{buffers / 2**30:.2f} GiB'} | "
            f"{'-' if over is None or buffers is None else f'{over / total:.2f}'} |"
        )
    out += ["", "By 8k bucket (tok/s read; perplexity of the bucket's tokens):", "", "```"]
    for r in long["results"]:
        out.append(f"{r['kv_type']:5s} tok/s " + " ".join(f"{b['tok_s']:6.1f}" for b in r["tok_s_by_bucket"]))
        out.append(f"{r['kv_type']:5s} ppl   " + " ".join(f"{b['ppl']:6.2f}" for b in r["ppl_by_bucket"]))
    out.append("```")
    out += _long_read_time_left(long, plot.replace(".png", ".json"))
    return out + ["", f"![Reading speed and perplexity by position]({plot})", ""]


def render_short_context(short: dict | None) -> list[str]:
    """The long read's buckets read again after a short context (`python scripts/short_context.py`)."""
    if not short:
        return []
    out = [
        f"### The long read's buckets after {short['context']:,} tokens",
        "",
        f"Measured by `{short['command']}` on {short['date']} ({short['kv_type']}, G{short['group']} "
        f"W{short['window']}): each bucket's targets read again with only {short['context']:,} tokens before "
        "them. Lower in the long read: the depth helped; higher: at that depth the model does worse than with "
        "a short context, whatever the text.",
        "",
        "| bucket from | long read | short context | long / short |",
        "|---|---|---|---|",
    ]
    for b in short["buckets"]:
        out.append(f"| {b['from']:,} | {b['long']:.2f} | {b['short']:.2f} | {b['long'] / b['short']:.2f} |")
    return out + [""]


def _long_read_time_left(long: dict, name: str) -> list[str]:
    """The time left the product would have shown during each reading, from its chunks' marks."""
    from bench_checkpoints import estimates

    rows = []
    for r in long["results"]:
        for e in estimates([tuple(m) for m in r.get("marks", [])], r["tokens"]):
            shown = "-" if e["shown"] is None else f"{e['shown']:.0f} ({(e['shown'] - e['true']) / e['true']:+.1%})"
            linear = f"{e['linear']:.0f} ({(e['linear'] - e['true']) / e['true']:+.1%})"
            rows.append(f"| {r['kv_type']} | {e['at']:.0%} | {e['true']:.0f} | {shown} | {linear} |")
    if not rows:
        return []
    return [
        "",
        "The time left the CLI, the page and the API would have shown during the reading (engine/eta.py's cost "
        f"model fed the reading's own progress: `python scripts/bench_checkpoints.py --marks docs/{name}`), "
        "against the time it then really took, and the average rate's estimate:",
        "",
        "| cache | at | really left (s) | shown (s, error) | average rate's (s, error) |",
        "|---|---|---|---|---|",
        *rows,
    ]


def render_grammar(grammar: dict | None) -> list[str]:
    """One client's grammar beside another's stream (`python scripts/bench_grammar.py --json ...`)."""
    if not grammar:
        return []
    base = grammar["median"]["plain"]
    out = [
        "## One client's grammar, another client's speed (CPU)",
        "",
        f"Measured by `python scripts/bench_grammar.py --json docs/grammar.json` on {grammar['date']}: client A's "
        f"decode tok/s (median) beside client B, {grammar['rounds']} rounds of {grammar['seconds']:.0f} s, "
        "alternating.",
        "",
        "| client B | A's tok/s | of beside plain B |",
        "|---|---|---|",
    ]
    out += [f"| {name} | {v:.1f} | {v / base:.2f} |" for name, v in grammar["median"].items()]
    return out + [""]


def render_page(page: dict | None) -> list[str]:
    if not page:
        return []
    return [
        "## Reading through the page (CPU)",
        "",
        f"Measured by `python scripts/bench_page.py --json docs/page.json` on {page['date']}: the same "
        f"{page['tokens']:,}-token document read by `qa` and through the page's API, {page['rounds']} rounds, the "
        f"two back to back and alternating first: qa {page['qa']} tok/s, the page {page['page']} tok/s; the page / qa "
        f"in each round {page['ratios']}, median {page['median']:.3f}."
        + (f" {page['note']}" if page.get("note") else ""),
        "",
    ]


def render_kshift(kshift: dict | None) -> list[str]:
    """The K-shift of the moved cells against every cell's (`python scripts/bench_kshift.py --json ...`)."""
    if not kshift:
        return []
    out = [
        "## A K-shift of the moved cells only (CPU)",
        "",
        f"Measured by `python scripts/bench_kshift.py --json docs/kshift.json` on {kshift['date']}, one process, "
        "alternating (LLAMA_KV_SHIFT_ALL_CELLS=1 gives llama.cpp's K-shift of every cell on our build). One "
        "K-shift of 1,024 cells, added to a one-token decode (ms, median), by slots x cells a slot:",
        "",
        "| cache | shape | every cell | moved cells |",
        "|---|---|---|---|",
    ]
    for kv_type, f in kshift["types"].items():
        for shape, ms in f["one_shift_ms"].items():
            out.append(f"| {kv_type} | {shape} | {ms['every cell']:.1f} | {ms['moved cells']:.1f} |")
    if note := kshift.get("one_shift_note"):
        out += ["", f"({note}.)"]
    if kshift["rounds"]:
        out += [
            "",
            f"A {kshift['tokens']:,}-token document read under G4 W2048 into one slot of the server's shape "
            f"(tok/s, best of {kshift['rounds']}; every run in brackets):",
            "",
            "| cache | every cell | moved cells | ratio |",
            "|---|---|---|---|",
        ]
        for kv_type, f in kshift["types"].items():
            every, moved = f["reading_tok_s"]["every cell"], f["reading_tok_s"]["moved cells"]
            runs = [f"{max(r):.1f} ({', '.join(f'{x:.1f}' for x in r)})" for r in (every, moved)]
            out.append(f"| {kv_type} | {runs[0]} | {runs[1]} | {max(moved) / max(every):.2f} |")
    return out + [""]


def render_part(raw: dict, where: str, lengths: str) -> list[str]:
    out: list[str] = []
    if probe := raw.get("probe"):
        out += [
            f"### llama.cpp's `seq_div` ({where})",
            "",
            f"Probe: {probe['describe']}. With `--division auto` the engine "
            + ("uses the native call." if probe["native_correct"] else "divides by `seq_add` emulation on this build."),
            "",
        ]
    if ref := raw.get("reference"):
        s, f = ref["sanity"], ref["fidelity"]
        out += [
            "### The numpy reference (the paper's exact attention)",
            "",
            f"Sanity, no extension, {s['tokens']} tokens: top-1 agreement with llama.cpp "
            f"{s['top1_agreement']:.3f}, mean KL {s['mean_kl']:.4f} (llama.cpp computes with quantized "
            "activations; the reference in float32).",
            "",
            f"Fidelity, {f['tokens']} tokens, G={f['group']} W={f['window']}, engine chunks of {f['batch']}: "
            "KL from the exact SelfExtend reference to each llama.cpp run.",
            "",
        ]
        rows = [["llama.cpp run", "mean KL", "mean KL beyond W", "top-1 agreement"]]
        for name, r in f["methods"].items():
            rows.append(
                [name, f"{r['mean_kl']:.4f}", f"{r['mean_kl_beyond_window']:.4f}", f"{r['top1_agreement']:.3f}"]
            )
        out += ["```", format_table(rows), "```", ""]
    if ppl := raw.get("ppl"):
        from selfextend_local.evaluation.perplexity import ppl_rows

        out += [
            f"### Perplexity at {ppl['tokens']:,} tokens ({where}; training context 8,192)",
            "",
            f"SelfExtend G={ppl['group']} W={ppl['window']}; linear and YaRN scale by "
            f"{ppl['tokens'] / 8192:.2f} through llama.cpp's context parameters. Columns after 'overall' are "
            f"{ppl['bucket']}-token buckets of target positions.",
            "",
            "```",
            format_table(ppl_rows(ppl)),
            "```",
            "",
            f"![perplexity by position]({ppl.get('plot', 'ppl.png')})",
            "",
        ]
    if pk := raw.get("passkey"):
        from selfextend_local.evaluation.passkey import accuracy_table

        kinds = pk.get("kinds", ["digits"])
        what = "five-digit keys" + (" and one-word needles" if "word" in kinds else "")
        out += [
            f"### Pass-key retrieval ({where})",
            "",
            f"{what.capitalize()}, greedy, SelfExtend G={pk['group']} W={pk['window']}; {lengths}. "
            "Cells: correct/trials.",
            "",
            "```",
            format_table(accuracy_table(pk["results"])),
            "```",
            "",
            f"![pass-key heatmap]({pk.get('plot', 'passkey.png')})",
            "",
        ]
    if lad := raw.get("ladder"):
        t = lad["thresholds"]
        out += [
            f"### Quantization ladder against the F16 reference, {lad['tokens']:,} tokens",
            "",
            "The F16 reference is the bundled Q4_1 model dequantized (`convert dequantize`); each level is "
            f"quantized from it (`convert quantize`). SelfExtend neighbor G={lad['group']} W={lad['window']} on "
            f"both sides. `validate` defaults: --max-kl {t['max_kl']} --min-top1 {t['min_top1']}.",
            "",
        ]
        rows = [["level", "size", "mean KL", "p99 KL", "top-1", "PPL ratio", "validate"]]
        for q, r in lad["levels"].items():
            rows.append(
                [
                    q,
                    f"{r['size_bytes'] / 2**20:.1f} MiB",
                    f"{r['mean_kl']:.4f}",
                    f"{r['p99_kl']:.3f}",
                    f"{r['top1_agreement']:.3f}",
                    f"{r['ppl_ratio']:.3f}",
                    r["validate_default"],
                ]
            )
        out += ["```", format_table(rows), "```", ""]
    if bench := raw.get("bench"):
        tps = bench["tokens_per_second"]
        plain = tps["engine plain"]
        mode = "whole prompt in one call" if bench["mode"] == "whole" else "lockstep chunks"
        out += [
            f"### Ingestion speed ({where}, `scripts/bench_ingest.py`, {mode}, fastest of 3)",
            "",
        ]
        rows = [["method", "tokens/s", "ratio to engine plain"]]
        rows += [[name, f"{v:.0f}", f"{v / plain:.3f}"] for name, v in tps.items()]
        out += ["```", format_table(rows), "```", ""]
    return out


def render_ceiling(ceiling: dict | None) -> list[str]:
    """Reading at depth against the machine's peak, kernels side by side (`python scripts/ceiling.py`)."""
    if not ceiling:
        return []
    from ceiling import buckets

    peak = ceiling["peak"]
    out = [
        f"## Reading at depth against the machine's limit: {ceiling['tokens']:,} tokens (CPU)",
        "",
        f"Measured by `python scripts/ceiling.py {ceiling.get('flags', '')}` on {ceiling['when']}: the fp32 FMA "
        f"peak of both cores {peak['fp32']:.0f} Gflop/s (bf16 dot products {peak.get('bf16', 0):.0f}), then the "
        f"pydoc text read under SelfExtend G{ceiling['group']} W{ceiling['window']}, each cache type and kernel "
        "in a process of its own (tiled: patch 0003's flash attention, the kernel before; gqa: patch 0005's). "
        "Gflop/s counts the weights' matmuls and attention (4 x heads x head size x layers x position).",
        "",
        "| cache | kernel | "
        + " | ".join(f"{b['from'] // 1024}-{b['to'] // 1024}k" for b in buckets(ceiling["runs"][0], peak["fp32"]))
        + " |",
        "|---|---|" + "---|" * len(buckets(ceiling["runs"][0], peak["fp32"])),
    ]
    for run in ceiling["runs"]:
        cells = [
            f"{b['tok_s']:.1f} tok/s, {b['gflops']:.0f} Gflop/s ({b['share']:.2f})" for b in buckets(run, peak["fp32"])
        ]
        out.append(f"| {run['kv_type']} | {run['kernel']} | " + " | ".join(cells) + " |")
    if any(run.get("ppl") for run in ceiling["runs"]):
        out += ["", "Perplexity of the whole text and by 8k bucket:", "", "```"]
        for run in ceiling["runs"]:
            by = " ".join(f"{b['ppl']:.4f}" for b in run["ppl_by_bucket"])
            out.append(f"{run['kv_type']:5s} {run['kernel']:6s} {run['ppl']:.4f}   {by}")
        out.append("```")
    profiled = [run for run in ceiling["runs"] if run.get("profile")]
    if profiled:
        out += [
            "",
            "Where the last bucket's time goes (perf's cpu-clock samples of the reading process, by the functions' "
            "names; the GQA kernel's own functions are static, perf cannot name them, so they count as other):",
            "",
        ]
        for run in profiled:
            shares = ", ".join(f"{p['where']} {p['share']}%" for p in run["profile"])
            out.append(f"- {run['kv_type']}, {run['kernel']}: {shares}")
    return out + [""]


def render_alternating(ceiling: dict | None) -> list[str]:
    """Two kernels taking turns chunk by chunk in one reading (`python scripts/ceiling.py --alternate`)."""
    if not ceiling:
        return []
    from ceiling import buckets

    peak, run = ceiling["peak"], ceiling["runs"][0]
    kernels = list(ceiling["by_kernel"])
    by = {k: buckets(run, peak["fp32"], k) for k in kernels}
    names = [b["name"] for b in by[kernels[0]]]
    out = [
        f"The same kernels taking turns a chunk each within one {ceiling['tokens']:,}-token {run['kv_type']} reading, "
        f"in one process (`python scripts/ceiling.py {ceiling.get('flags', '')}`, {ceiling['when']}; the build "
        "reads GGML_CPU_FA_KERNEL at every op), so both meet the same depths in the same process; each bucket's "
        "figures are each kernel's over its own chunks:",
        "",
        "| cache | kernel | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for k in kernels:
        cells = [f"{b['tok_s']:.1f} tok/s, {b['gflops']:.0f} Gflop/s ({b['share']:.2f})" for b in by[k]]
        out.append(f"| {run['kv_type']} | {k} | " + " | ".join(cells) + " |")
    first, last = by[kernels[0]], by[kernels[-1]]
    ratios = [f"{b['tok_s'] / a['tok_s']:.2f}x" for a, b in zip(first, last)]
    out.append(f"| | {kernels[-1]} / {kernels[0]} | " + " | ".join(ratios) + " |")
    return out + [""]


def render_fa_op(op: dict | None) -> list[str]:
    """One layer's flash attention with each kernel (`python scripts/bench_fa_op.py`)."""
    if not op:
        return []
    out = [
        "## One layer's flash attention, kernel by kernel (CPU)",
        "",
        f"Measured by `python scripts/bench_fa_op.py --out docs/fa_op.json` on {op['when']}, {op['threads']} "
        "threads, the bundled model's shape (9 query heads on 3 KV heads of 64), random Q, K and V, causal; the "
        "kernels in turn on the same op (median ms; f16's stock kernel is the tiled one):",
        "",
        "| cache | cells | tokens | stock | tiled (0003) | gqa (0005) | gqa Gflop/s | tiled / gqa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in op["results"]:
        ms = r["ms"]
        stock = f"{ms['stock']:.1f}" if "stock" in ms else "-"
        out.append(
            f"| {r['kind']} | {r['n_kv']:,} | {r['n_q']} | {stock} | {ms['tiled']:.1f} | {ms['gqa']:.1f} | "
            f"{r['gflops']['gqa']:.0f} | {ms['tiled'] / ms['gqa']:.2f} |"
        )
    return out + [""]


def render_checkpoints(cp: dict | None, name: str = "checkpoints.json") -> list[str]:
    """A long reading with and without checkpoints, and its time left (`python scripts/bench_checkpoints.py`)."""
    from bench_checkpoints import HEADER

    if not cp:
        return []
    out = [
        f"## A long reading's checkpoints and time left: {cp['tokens']:,} tokens, {cp['kv_type']} (CPU)",
        "",
        f"Measured by `python scripts/bench_checkpoints.py --tokens {cp['tokens']} --kv-type {cp['kv_type']} "
        f"--rounds {len(cp['rounds'])} --out docs/{name}` on {cp['when']}: SelfExtend G16 W1024, "
        f"checkpoints every {cp['every']:g} s (the default), the two readings alternating; the median of the "
        f"rounds' with / without is {cp['ratio']:.3f}.",
        "",
        "| round | without (s) | with (s) | with / without | checkpoints | MiB written | writing (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(cp["rounds"], 1):
        a, b = r["without"], r["with"]
        out.append(
            f"| {i} | {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.3f} | {b['writes']} | "
            f"{b['bytes'] / 2**20:,.0f} | {b['write_seconds']:.1f} |"
        )
    out += [
        "",
        "The time left shown (the reading's cost model, as the CLI, the page and the API show it) against the time "
        "it then really took, and beside it the average rate's estimate, the same cost model fitted in hindsight to "
        "the whole reading (where the run kept it) and, where the run kept it, the cost model started from the "
        "ratio of its two terms that the reading before it ended with (engine/paces.py: what a second reading of "
        "the same setup shows):",
        "",
    ]
    width = max(len(row) for row in cp["time_left"])
    out += ["| " + " | ".join(HEADER[:width]) + " |", "|---" * width + "|"]
    for row in cp["time_left"]:
        cells = [f"{c:.1f}" if isinstance(c, float) else str(c) for c in row]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def render_beside(beside: dict | None) -> list[str]:
    """A chat beside a reading (`python scripts/bench_beside.py`)."""
    if not beside:
        return []
    out = [
        "## A chat beside a reading (CPU)",
        "",
        f"Measured by `python scripts/bench_beside.py --out docs/beside.json` on {beside['when']}: the server "
        "(`serve --parallel 2 --no-cache`) reads a ~9k-token document alone, answers a streamed chat alone, then "
        "both: the chat starts once the reading is a quarter in. Chat decode tok/s; the reading's tok/s over its "
        "whole length, and while the chat streamed.",
        "",
        "| round | document tokens | chat alone | chat beside | reading alone | reading beside | reading during "
        "the chat |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(beside["rounds"], 1):
        a, b = r["alone"], r["beside"]
        out.append(
            f"| {i} | {a['tokens']:,} | {a['chat']:.1f} | {b['chat']:.1f} | {a['reading']:.1f} | {b['reading']:.1f} | "
            f"{b['during']:.1f} |"
        )
    out += [
        "",
        f"Median of the rounds' ratios: chat beside / alone {beside['chat_ratio']:.3f}; reading beside / alone "
        f"{beside['reading_ratio']:.3f}; reading while the chat streamed / alone {beside['during_ratio']:.3f}.",
        "",
    ]
    return out


def render_drafts(runs: list[dict | None]) -> list[str]:
    """Decode with and without drafts from the prompt, ours and llama-server's (`python scripts/bench_drafts.py`)."""
    runs = [r for r in runs if r]
    if not runs:
        return []
    out = ["## Drafts from the prompt (CPU)", ""]
    for run in runs:
        peer = run.get("peer_spec")
        header = "| load | round | off | on | on / off | drafted kept |"
        if peer:
            header += " peer off | peer on | peer on / off | peer kept | ours on / peer on |"
        out += [
            f"Measured by `python scripts/bench_drafts.py` on {run['when']} ({run['model']}; {run['clients']} "
            f"client(s), --parallel {run['parallel']}, {run.get('kv_type', 'f16')} cache, draft up to {run['draft']}, "
            f"{run['rounds']} rounds of {run['requests']} requests a load, {run['max_tokens']} tokens greedy; the "
            f"quote load's document {run['doc_tokens']:,} tokens under SelfExtend; llama-server, built from the same "
            f"sources: {'`--spec-type ' + peer + '`' if peer else 'not run'}). Decode tok/s from each server's "
            "timings:",
            "",
            header,
            "|---" * header.count(" | ") + "|---|",
        ]
        for load in ("quote", "free", "summary"):
            for row in run.get(load, {}).get("rows", []):
                line = f"| {load} | {row[0]} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.3f} | {row[4]} |"
                if len(row) > 5:
                    line += f" {row[5]:.1f} | {row[6]:.1f} | {row[7]:.3f} | {row[8]} | {row[9]:.3f} |"
                out.append(line)
        medians = []
        for load in ("quote", "free", "summary"):
            if load in run:
                names = {"ours_on_off": "on / off", "peer_on_off": "peer on / off", "ours_vs_peer": "ours / peer"}
                shown = ", ".join(f"{label} {run[load][key]:.3f}" for key, label in names.items() if key in run[load])
                medians.append(f"{load}: {shown}")
        out += ["", f"Medians of the rounds' ratios: {'; '.join(medians)}.", ""]
    return out


def render_depth(depth: dict | None) -> list[str]:
    """llama.cpp's llama-bench at depth, stock kernel sources and ours (`python scripts/bench_depth.py`)."""
    if not depth:
        return []
    out = [
        "## llama-bench at depth, stock and patched sources (CPU)",
        "",
        f"Measured by `{depth['command']}` on {depth['when']}: llama.cpp's own llama-bench, `-fa 1 -p 512 -n 0 "
        "-d DEPTH`, built from the same sdist with our patches but the flash-attention kernels (stock) and with "
        "all of them (patched), tok/s:",
        "",
        "| cache | depth | stock | patched | patched / stock |",
        "|---|---|---|---|---|",
    ]
    for r in depth["results"]:
        stock, patched = r["median"]["stock"], r["median"]["patched"]
        out.append(f"| {r['kv']} | {r['depth']:,} | {stock:.1f} | {patched:.1f} | {patched / stock:.2f} |")
    return out + [""]


def redraw(raw: dict) -> int:
    """Plots from the stored figures (for a run whose process could not draw them, say)."""
    from selfextend_local.evaluation.passkey import heatmap
    from selfextend_local.evaluation.perplexity import ppl_plot

    for part in (raw, raw.get("gpu", {})):
        if ppl := part.get("ppl"):
            ppl_plot(ppl, str(DOCS / ppl.get("plot", "ppl.png")))
        if pk := part.get("passkey"):
            heatmap(pk["results"], str(DOCS / pk.get("plot", "passkey.png")))
    (DOCS / "RESULTS.md").write_text(render(raw) + "\n")
    return 0


def gpu_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "GPU"
    return names.splitlines()[0].split(" (")[0].split(": ", 1)[-1] if names.strip() else "GPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(s for s in SECTIONS if s != "bench"))
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--group", type=int, default=4, help="SelfExtend group for ppl, passkey and bench")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--ppl-tokens", type=int, default=12288)
    parser.add_argument("--ppl-bucket", type=int, default=2048)
    parser.add_argument("--ladder-tokens", type=int, default=9216)
    parser.add_argument("--bench-tokens", type=int, default=32768)
    parser.add_argument("--passkey-lengths", default="4096,10240")
    parser.add_argument("--passkey-depths", default="0.2,0.5,0.8")
    parser.add_argument("--passkey-seeds", type=int, default=1)
    parser.add_argument("--passkey-kinds", default="digits")
    parser.add_argument("--plots-only", action="store_true", help="redraw the plots from results.json, measure nothing")
    args = parser.parse_args()
    if args.plots_only:
        return redraw(json.loads(RAW.read_text()))
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    runtime = RuntimeSettings(gpu_layers=args.gpu_layers)
    model = load_model(None, runtime)
    raw = json.loads(RAW.read_text()) if RAW.exists() else {}
    part = raw.setdefault("gpu", {}) if args.gpu_layers else raw
    suffix = "-gpu" if args.gpu_layers else ""
    import llama_cpp

    flags = " ".join(sys.argv[1:])
    part["machine"] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": runtime.threads,
        "llama_cpp": llama_cpp.__version__,
        "model": model.path.name,
        "python": platform.python_version(),
        "flags": f" {flags}" if flags else "",
        **({"gpu": gpu_name(), "gpu_layers": args.gpu_layers} if args.gpu_layers else {}),
    }
    DOCS.mkdir(exist_ok=True)
    G, W = args.group, args.window
    jobs = {
        "probe": lambda: measure_probe(model, runtime),
        "reference": lambda: measure_reference(model),
        "ppl": lambda: measure_ppl(model, runtime, args.ppl_tokens, G, W, args.ppl_bucket, f"ppl{suffix}.png"),
        "passkey": lambda: measure_passkey(
            model,
            runtime,
            [int(x) for x in args.passkey_lengths.split(",")],
            [float(x) for x in args.passkey_depths.split(",")],
            args.passkey_seeds,
            args.passkey_kinds.split(","),
            G,
            W,
            f"passkey{suffix}.png",
        ),
        "ladder": lambda: measure_ladder(model, runtime, args.ladder_tokens),
        "bench": lambda: measure_bench(runtime, args.bench_tokens, G, W),
    }
    for name in wanted:
        say(f"measuring {name}")
        start = time.perf_counter()
        part[name] = jobs[name]()
        say(f"{name} took {time.perf_counter() - start:.0f} s")
        RAW.write_text(json.dumps(raw, indent=1))
        (DOCS / "RESULTS.md").write_text(render(raw) + "\n")
    print(render(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
