"""Regenerate docs/RESULTS.md (and its plots and raw JSON) from measurements taken now, on this machine.

    python scripts/make_results.py                      # everything (about an hour on two CPU cores)
    python scripts/make_results.py --sections ppl,ladder  # re-measure some sections, keep the others

Sections: probe, reference, ppl, passkey, ladder. Raw figures go to docs/results.json; each run replaces
the sections it measured and keeps the rest, and the Markdown is rebuilt from the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from selfextend_local.corpus import long_tokens
from selfextend_local.engine import load_model
from selfextend_local.info import format_table
from selfextend_local.planning import Plan
from selfextend_local.session import Session
from selfextend_local.settings import RuntimeSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"
RAW = DOCS / "results.json"
SECTIONS = ("probe", "reference", "ppl", "passkey", "ladder")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_probe(model) -> dict:
    plan = Plan(4, 64, "neighbor", "auto", 256, model.info.n_ctx_train, "probe")
    with Session(model, plan, RuntimeSettings()) as s:
        probe = s.divider.probe
    return {"native_correct": probe.native_correct, "kl": probe.kl, "describe": probe.describe()}


def engine_logits(model, tokens, group, window, schedule, batch=32):
    out = []
    plan = Plan(group, window, schedule, "auto", 1024, model.info.n_ctx_train, "reference")
    with Session(model, plan, RuntimeSettings(batch=batch)) as s:
        s.ingest(tokens, on_logits=lambda off, lg: out.append(lg))
    return np.concatenate(out)


def measure_reference(model) -> dict:
    from selfextend_local.metrics import kl_divergence
    from selfextend_local.reference import ReferenceModel

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


def measure_ppl(model, n_tokens: int) -> dict:
    from selfextend_local.perplexity import compare_methods, ppl_plot

    tokens = long_tokens(model, n_tokens)
    report = compare_methods(
        model,
        tokens,
        ["none", "linear", "yarn", "neighbor", "llamacpp"],
        4,
        2048,
        RuntimeSettings(),
        bucket=2048,
        progress_for=lambda m: lambda d, t: None,
    )
    ppl_plot(report, str(DOCS / "ppl.png"))
    return report


def measure_passkey(model, lengths, depths, seeds) -> dict:
    from selfextend_local import passkey as pk

    trials = pk.grid(lengths, depths, list(range(seeds)), ["digits"])
    results = pk.run(
        model,
        ["none", "linear", "yarn", "neighbor", "llamacpp"],
        trials,
        4,
        2048,
        RuntimeSettings(),
        on_result=lambda r: say(f"passkey {r['method']} {r['length']} {r['depth']}: {r['correct']}"),
    )
    pk.heatmap(results, str(DOCS / "passkey.png"))
    return {"group": 4, "window": 2048, "results": results}


def measure_ladder(model, n_tokens: int) -> dict:
    from selfextend_local.convert import LADDER, quantize, rewrite_gguf
    from selfextend_local.model import Model
    from selfextend_local.validate import Thresholds, compare_logits, summarize, verdict

    with tempfile.TemporaryDirectory() as tmp:
        (f16,) = rewrite_gguf(model.path, Path(tmp) / "ref-F16.gguf", to_f16=True)
        files = [quantize(f16, Path(tmp) / f"ref-{q}.gguf", q) for q in LADDER]
        reference = Model(f16)
        candidates = [Model(p) for p in files]
        tokens = long_tokens(reference, n_tokens)
        plan = Plan(4, 2048, "neighbor", "auto", -(-n_tokens // 256) * 256, reference.info.n_ctx_train, "ladder")
        arrays = compare_logits(candidates, reference, tokens, plan, RuntimeSettings())
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


def render(raw: dict) -> str:
    m = raw["machine"]
    out = [
        "# Results",
        "",
        f"Measured by `python scripts/make_results.py` on {m['date']}: {m['cpu']}, {m['threads']} threads, "
        f"llama-cpp-python {m['llama_cpp']}, model {m['model']} (no GPU was available for these runs). "
        "Text: the pydoc topic help (`pydoc_data.topics`). Every figure below is regenerated by that script.",
        "",
    ]
    if probe := raw.get("probe"):
        out += [
            "## llama.cpp's `seq_div`",
            "",
            f"Probe: {probe['describe']}. With `--division auto` the engine "
            "divides by `seq_add` emulation on this build.",
            "",
        ]
    if ref := raw.get("reference"):
        s, f = ref["sanity"], ref["fidelity"]
        out += [
            "## The numpy reference (the paper's exact attention)",
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
        from selfextend_local.perplexity import ppl_rows

        out += [
            f"## Perplexity at {ppl['tokens']:,} tokens (training context 8,192)",
            "",
            f"SelfExtend G={ppl['group']} W={ppl['window']}; linear and YaRN scale by "
            f"{ppl['tokens'] / 8192:.2f} through llama.cpp's context parameters. Columns after 'overall' are "
            f"{ppl['bucket']}-token buckets of target positions.",
            "",
            "```",
            format_table(ppl_rows(ppl)),
            "```",
            "",
            "![perplexity by position](ppl.png)",
            "",
        ]
    if pk := raw.get("passkey"):
        from selfextend_local.passkey import accuracy_table

        out += [
            "## Pass-key retrieval (CPU)",
            "",
            f"Five-digit keys, greedy, SelfExtend G={pk['group']} W={pk['window']}; the longest length that "
            "fits in a few minutes per trial on two cores. Cells: correct/trials.",
            "",
            "```",
            format_table(accuracy_table(pk["results"])),
            "```",
            "",
            "![pass-key heatmap](passkey.png)",
            "",
        ]
    if lad := raw.get("ladder"):
        t = lad["thresholds"]
        out += [
            f"## Quantization ladder against the F16 reference, {lad['tokens']:,} tokens",
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
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--ppl-tokens", type=int, default=12288)
    parser.add_argument("--ladder-tokens", type=int, default=9216)
    parser.add_argument("--passkey-lengths", default="4096,10240")
    parser.add_argument("--passkey-depths", default="0.2,0.5,0.8")
    parser.add_argument("--passkey-seeds", type=int, default=1)
    args = parser.parse_args()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    model = load_model(None)
    raw = json.loads(RAW.read_text()) if RAW.exists() else {}
    import llama_cpp

    raw["machine"] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": RuntimeSettings().threads,
        "llama_cpp": llama_cpp.__version__,
        "model": model.path.name,
    }
    DOCS.mkdir(exist_ok=True)
    jobs = {
        "probe": lambda: measure_probe(model),
        "reference": lambda: measure_reference(model),
        "ppl": lambda: measure_ppl(model, args.ppl_tokens),
        "passkey": lambda: measure_passkey(
            model,
            [int(x) for x in args.passkey_lengths.split(",")],
            [float(x) for x in args.passkey_depths.split(",")],
            args.passkey_seeds,
        ),
        "ladder": lambda: measure_ladder(model, args.ladder_tokens),
    }
    for name in wanted:
        say(f"measuring {name}")
        start = time.perf_counter()
        raw[name] = jobs[name]()
        say(f"{name} took {time.perf_counter() - start:.0f} s")
        RAW.write_text(json.dumps(raw, indent=1))
        (DOCS / "RESULTS.md").write_text(render(raw) + "\n")
    print(render(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
