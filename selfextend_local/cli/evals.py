"""``passkey``, ``ppl``, ``validate`` and ``convert``: see whether extension works and what quantization costs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .display import IngestProgress, log
from .options import log_options, model_option, runtime_options
from .run import load_for_cli


def _ints(text: str, name: str) -> list[int]:
    from ..engine.errors import BadInputError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"{name} takes comma-separated whole numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise BadInputError(f"{name} needs positive numbers, got {text!r}")
    return values


def _depths(text: str) -> list[float]:
    from ..engine.errors import BadInputError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"--depths takes comma-separated fractions, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise BadInputError(f"--depths are fractions between 0 and 1, got {text!r}")
    return values


def _write(path: Path | None, text: str) -> None:
    """Write a result file through a temporary name, so an interrupt leaves no half-written file."""
    if path is None:
        return
    import os
    import tempfile

    path = Path(os.path.realpath(path))  # through a link to the file it names, never replacing the link
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    log(f"wrote {path}")


def _check_plotting(plot: Path | None) -> None:
    """With --plot, fail now (not after the whole run) if matplotlib is missing."""
    if plot is not None:
        from ..extras import pyplot

        pyplot()


group_window = [
    click.option("--group", "-g", type=click.IntRange(1), default=None, help="SelfExtend G. Default: the family's."),
    click.option("--window", "-w", type=click.IntRange(1), default=None, help="SelfExtend W. Default: the family's."),
]
methods_option = click.option(
    "--methods",
    default="none,linear,yarn,neighbor,llamacpp",
    show_default=True,
    help="Methods side by side: none, linear (RoPE), yarn, neighbor, llamacpp.",
)
out_file = click.Path(dir_okay=False, path_type=Path)


def _with(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorator


@click.command()
@click.option("--lengths", default="4096,8192,12288", show_default=True, help="Prompt lengths in tokens.")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, help="Needle depths (0 start, 1 end).")
@click.option("--seeds", type=click.IntRange(1), default=2, show_default=True, help="Trials per length and depth.")
@click.option("--variants", default="digits", show_default=True, help="digits (5-digit key), word (one-word needle).")
@methods_option
@_with(group_window)
@click.option("--json", "json_path", type=out_file, default=None, help="Write every trial to this JSON file.")
@click.option("--plot", type=out_file, default=None, help="Draw the heatmap (needs matplotlib).")
@model_option
@runtime_options
@log_options
def passkey(lengths, depths, seeds, variants, methods, group, window, json_path, plot, model, runtime, verbose):
    """The paper's pass-key retrieval test over lengths x depths x seeds, methods side by side."""
    from ..engine.errors import BadInputError
    from ..evaluation import passkey as pk
    from ..evaluation.baselines import default_setting, parse_methods
    from ..tasks.info import format_table

    chosen = parse_methods(methods)
    _check_plotting(plot)
    kinds = [v.strip() for v in variants.split(",") if v.strip()]
    if not kinds or any(v not in pk.VARIANTS for v in kinds):
        raise BadInputError(f"--variants: choose from {', '.join(pk.VARIANTS)}")
    trials = pk.grid(_ints(lengths, "--lengths"), _depths(depths), list(range(seeds)), kinds)
    llm = load_for_cli(model, runtime, verbose)
    setting = default_setting(llm, max(t.length for t in trials), group, window)
    log(f"{len(trials)} trials x {len(chosen)} methods; SelfExtend G{setting.group} W{setting.window}")

    def show(r: dict) -> None:
        mark = "ok " if r["correct"] else "MISS"
        log(
            f"  {mark} {r['method']:9s} {r['variant']:6s} {r['length']:>6} depth {r['depth']:.2f}: {r['output'][:40]!r}"
        )

    results = pk.run(llm, chosen, trials, setting.group, setting.window, runtime, show)
    click.echo(format_table(pk.accuracy_table(results)))
    _write(json_path, json.dumps({"group": setting.group, "window": setting.window, "results": results}, indent=1))
    if plot:
        pk.heatmap(results, str(plot))
        log(f"wrote {plot}")


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--tokens", "n_tokens", type=click.IntRange(2), default=None, help="Use the first N tokens.")
@click.option("--bucket", type=click.IntRange(1), default=2048, show_default=True, help="Tokens per position bucket.")
@methods_option
@_with(group_window)
@click.option("--csv", "csv_path", type=out_file, default=None)
@click.option("--json", "json_path", type=out_file, default=None)
@click.option("--plot", type=out_file, default=None, help="Plot perplexity against position (needs matplotlib).")
@model_option
@runtime_options
@log_options
def ppl(file, n_tokens, bucket, methods, group, window, csv_path, json_path, plot, model, runtime, verbose):
    """Perplexity of FILE, overall and per position bucket, for several methods in one run."""
    from ..engine.errors import BadInputError
    from ..evaluation.baselines import default_setting, parse_methods
    from ..evaluation.perplexity import compare_methods, ppl_csv, ppl_plot, ppl_rows
    from ..tasks.documents import read_document
    from ..tasks.info import format_table

    chosen = parse_methods(methods)
    _check_plotting(plot)
    text = read_document(file)
    llm = load_for_cli(model, runtime, verbose)
    tokens = llm.tokenize(text)
    if n_tokens:
        if len(tokens) < n_tokens:
            raise BadInputError(f"{file} has {len(tokens)} tokens, fewer than --tokens {n_tokens}")
        tokens = tokens[:n_tokens]
    setting = default_setting(llm, len(tokens), group, window)
    report = compare_methods(
        llm, tokens, chosen, setting.group, setting.window, runtime, bucket, progress_for=lambda m: IngestProgress(m)
    )
    click.echo(format_table(ppl_rows(report)))
    _write(json_path, json.dumps(report, indent=1))
    _write(csv_path, ppl_csv(report))
    if plot:
        ppl_plot(report, str(plot))
        log(f"wrote {plot}")


@click.command()
@click.option("--reference", "-r", required=True, type=click.Path(path_type=Path), help="The reference GGUF (F16).")
@click.option(
    "--file",
    "text_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Text to compare on. Default: the pydoc text every Python has.",
)
@click.option(
    "--tokens",
    "n_tokens",
    type=click.IntRange(64),
    default=None,
    help="Tokens to compare. Default: 1.125 x the training context (past it).",
)
@_with(group_window)
@click.option("--schedule", type=click.Choice(["neighbor", "llamacpp"]), default="neighbor", show_default=True)
@click.option("--max-kl", type=click.FloatRange(0), default=0.05, show_default=True, help="Fail above this mean KL.")
@click.option(
    "--min-top1", type=click.FloatRange(0, 1), default=0.90, show_default=True, help="Fail below this top-1 agreement."
)
@click.option(
    "--passkey-trials",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Pass-key prompts whose answers are compared.",
)
@click.option("--json", "json_path", type=out_file, default=None)
@model_option
@runtime_options
@log_options
def validate(
    reference,
    text_file,
    n_tokens,
    group,
    window,
    schedule,
    max_kl,
    min_top1,
    passkey_trials,
    json_path,
    model,
    runtime,
    verbose,
):
    """Compare --model (quantized) with --reference (F16) on the same prompts and SelfExtend settings.

    Exit code 0 when mean KL <= --max-kl and top-1 agreement >= --min-top1, else 1: usable as a gate.
    """
    from ..engine.errors import BadInputError
    from ..engine.model import Model
    from ..evaluation.validate import REPORTED, Thresholds
    from ..evaluation.validate import validate as compare
    from ..tasks.corpus import pydoc_text
    from ..tasks.documents import read_document

    candidate = load_for_cli(model, runtime, verbose)
    ref = Model(reference, gpu_layers=runtime.gpu_layers)
    L = ref.info.n_ctx_train
    n = n_tokens or L + L // 8
    tokens = ref.tokenize(read_document(text_file) if text_file else pydoc_text())
    if len(tokens) < n:
        raise BadInputError(f"the text has {len(tokens)} tokens, fewer than --tokens {n}")
    log(f"comparing {candidate.path.name} with {ref.path.name} on {n} tokens, {schedule}")
    thresholds = Thresholds(max_kl, min_top1)
    setting = (group, window, schedule)
    report = compare(
        candidate, ref, tokens[:n], setting, runtime, thresholds, passkey_trials, IngestProgress("comparing")
    )
    for key in REPORTED:
        value = report[key]
        click.echo(f"{key:18s} {'-' if value is None else f'{value:.4f}'}")
    click.echo("PASS" if report["passed"] else "FAIL: " + "; ".join(report["reasons"]))
    _write(json_path, json.dumps(report, indent=1))
    if not report["passed"]:
        sys.exit(1)


@click.group()
def convert() -> None:
    """Make reference models offline: dequantize to F16, quantize to a ladder of types."""


@convert.command("dequantize")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
def dequantize_cmd(source: Path, target: Path) -> None:
    """Write SOURCE (any GGUF) as an F16 GGUF at TARGET, every metadata key kept."""
    from ..evaluation.convert import rewrite_gguf

    if target.exists():
        from ..engine.errors import BadInputError

        raise BadInputError(f"{target} exists; remove it or choose another name")
    (out,) = rewrite_gguf(source, target, to_f16=True, progress=IngestProgress("dequantizing tensors", costly=False))
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


@convert.command("quantize")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--types", default="Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K", show_default=True, help="Quantization types.")
@click.option("--threads", type=click.IntRange(0), default=0, help="0: llama.cpp's default.")
def quantize_cmd(source: Path, out_dir: Path, types: str, threads: int) -> None:
    """Quantize SOURCE (F16/F32 GGUF) to each of --types, into OUT_DIR as STEM-TYPE.gguf."""
    from ..evaluation.convert import quantize

    names = [t.strip().upper() for t in types.split(",") if t.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.stem.removesuffix("-F16").removesuffix(".F16")
    with click.progressbar(names, label="quantizing", file=sys.stderr, item_show_func=lambda t: t or "") as bar:
        for name in bar:
            out = quantize(source, out_dir / f"{stem}-{name}.gguf", name, threads)
            log(f"\nwrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
