"""Options shared by several commands, defined once: each has one name and one default everywhere, the
default being the settings dataclass's own (:mod:`~..engine.settings`), as are the bounds (checked when the
dataclass is made: an out-of-range value is a one-line error naming the option)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

import click

from ..engine.settings import (
    CHECKPOINT_SECONDS,
    DIVISIONS,
    FLASH_ATTN,
    KV_TYPES,
    MAX_CHECKPOINT_SECONDS,
    MAX_DRAFT,
    SCHEDULES,
    ExtendSettings,
    RuntimeSettings,
    SamplingSettings,
)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["selfextend.debug"] = True
    return value


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["selfextend.verbose"] = True
    return value


def _set_llama_log(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["selfextend.llama_log"] = True
    return value


def _bundle(name: str, options: list, build: Callable[..., object]) -> Callable:
    """Add ``options`` to a command and hand it one object built from their values, as ``name``.

    ``build``'s parameter names are the options' names.
    """
    keys = list(inspect.signature(build).parameters)

    def decorator(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            values = {key: kwargs.pop(key) for key in keys}
            kwargs[name] = build(**values)
            return f(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorator


model_option = click.option(
    "--model",
    "-m",
    default=None,
    metavar="MODEL",
    help="A .gguf path, a local model name, a known name, or REPO:QUANT (downloads). Default: bundled SmolLM2-135M.",
)

runtime_options = _bundle(
    "runtime",
    [
        click.option("--ctx", type=int, default=None, help="Context cells to allocate. Default: what the input needs."),
        click.option("--threads", type=int, default=None, help="CPU threads. Default: the cores available."),
        click.option(
            "--gpu-layers",
            type=int,
            default=RuntimeSettings.gpu_layers,
            show_default=True,
            help="Layers to offload (CUDA/Metal builds).",
        ),
        click.option(
            "--batch",
            type=int,
            default=RuntimeSettings.batch,
            show_default=True,
            help="Prompt tokens per decode (chunk size).",
        ),
        click.option(
            "--kv-type",
            type=click.Choice(KV_TYPES),
            default=RuntimeSettings.kv_type,
            show_default=True,
            help="KV cache type (K and V); q8_0 and q4_0 hold about 1.9x and 3.6x the tokens of f16.",
        ),
        click.option(
            "--flash-attn",
            type=click.Choice(FLASH_ATTN),
            default=RuntimeSettings.flash_attn,
            show_default=True,
            help="llama.cpp's flash attention (needed to quantize V).",
        ),
    ],
    lambda ctx, threads, gpu_layers, batch, kv_type, flash_attn: RuntimeSettings(
        ctx=ctx,
        gpu_layers=gpu_layers,
        batch=batch,
        kv_type=kv_type,
        flash_attn=flash_attn,
        **({"threads": threads} if threads is not None else {}),
    ),
)

extend_options = _bundle(
    "extend",
    [
        click.option("--group", "-g", type=int, default=None, help="Group size G. Default: planned for the input."),
        click.option("--window", "-w", type=int, default=None, help="Neighbor window W. Default: planned."),
        click.option(
            "--schedule",
            type=click.Choice(SCHEDULES),
            default=ExtendSettings.schedule,
            show_default=True,
            help="Position schedule: ours (neighbor) or llama.cpp's completion tool (llamacpp).",
        ),
        click.option(
            "--division",
            type=click.Choice(DIVISIONS),
            default=ExtendSettings.division,
            show_default=True,
            help="Position division: probe and choose (auto), llama.cpp's seq_div, or seq_add emulation.",
        ),
    ],
    lambda group, window, schedule, division: ExtendSettings(group, window, schedule, division),
)

draft_option = click.option(
    "--draft",
    type=int,
    default=SamplingSettings.draft,
    show_default=True,
    metavar="N",
    help=f"Draft up to N tokens a step from the prompt and reply (a quote of the document), checked in the same "
    f"decode: the reply is unchanged, and comes faster where it copies. 0 turns it off; at most {MAX_DRAFT}.",
)

sampling_options = _bundle(
    "sampling",
    [
        click.option(
            "--temperature",
            "--temp",
            type=float,
            default=SamplingSettings.temperature,
            show_default=True,
            help="0 means greedy.",
        ),
        click.option("--top-k", type=int, default=SamplingSettings.top_k, show_default=True, help="0 turns top-k off."),
        click.option("--top-p", type=float, default=SamplingSettings.top_p, show_default=True),
        click.option("--seed", type=int, default=None, help="Random seed. Default: a fresh one each run."),
        click.option(
            "--max-tokens",
            "-n",
            type=int,
            default=SamplingSettings.max_tokens,
            show_default=True,
            help="Most tokens to generate.",
        ),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        draft_option,
    ],
    lambda temperature, top_k, top_p, seed, max_tokens, stop, draft: SamplingSettings(
        temperature, top_k, top_p, seed, max_tokens, tuple(stop), draft=draft
    ),
)


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where ingested documents are cached. Default: ~/.cache/selfextend-local/kv ($SELFEXTEND_LOCAL_CACHE).",
)
cache_size_option = click.option(
    "--cache-size",
    type=float,
    default=4.0,
    show_default=True,
    help="Cache size limit in GiB (least recently used go).",
)
checkpoint_option = click.option(
    "--checkpoint-every",
    type=click.FloatRange(0, MAX_CHECKPOINT_SECONDS),
    default=CHECKPOINT_SECONDS,
    show_default=True,
    help="Seconds of a long reading between its checkpoints in the cache (0: after every chunk); the same "
    "command resumes an interrupted reading from the newest one. None with --no-cache.",
)


MAX_CACHE_GIB = 1 << 16


def open_cache(cache_dir: Path | None, cache_size: float):
    from ..engine.kvcache import KVCache
    from ..engine.settings import check_range

    check_range("cache_size", cache_size, 0, MAX_CACHE_GIB, low_open=True)
    return KVCache(cache_dir, int(cache_size * (1 << 30)))


checkpointing_options = _bundle(
    "checkpointing",
    [
        click.option("--no-cache", is_flag=True, help="No checkpoints of a long reading."),
        cache_dir_option,
        cache_size_option,
        checkpoint_option,
    ],
    lambda no_cache, cache_dir, cache_size, checkpoint_every: _checkpointing(
        None if no_cache else open_cache(cache_dir, cache_size), checkpoint_every
    ),
)


def _checkpointing(cache, every: float):
    from ..engine.checkpoint import Checkpointing

    return Checkpointing(cache, every)


def log_options(f: Callable) -> Callable:
    """--verbose, --llama-log and --debug: our details, llama.cpp's own log, tracebacks on errors."""
    f = click.option(
        "--llama-log",
        is_flag=True,
        expose_value=False,
        callback=_set_llama_log,
        is_eager=True,
        help="Show llama.cpp's own log on stderr.",
    )(f)
    f = click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_set_debug,
        is_eager=True,
        help="Show tracebacks on errors.",
    )(f)
    return click.option(
        "--verbose",
        "-v",
        is_flag=True,
        callback=_set_verbose,
        help="Show the plan, the division in use and speed figures.",
    )(f)
