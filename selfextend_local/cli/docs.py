"""``qa``, ``summarize`` and ``cache``: long documents, many files, and the ingested-document cache."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .display import (
    IngestProgress,
    ctrl_c_stops,
    line_editing,
    log,
    note,
    read_line,
    render_stream,
    say_resuming,
    stats_line,
    stopped_reading,
)
from .options import (
    cache_dir_option,
    cache_size_option,
    checkpoint_option,
    checkpointing_options,
    extend_options,
    log_options,
    model_option,
    open_cache,
    runtime_options,
    sampling_options,
)
from .run import describe_session, load_for_cli


def _read(doc) -> str:
    """Read (or restore) the document with a bar, saying where a resumed reading starts and, on Ctrl-C, how
    far it got and whether the same command resumes it."""
    from ..engine.errors import Interrupted
    from ..engine.paces import pace_of

    if doc.checkpoints is not None:
        doc.checkpoints.on_restore = say_resuming
    progress = IngestProgress("reading document", pace=pace_of(doc.session))
    try:
        with ctrl_c_stops() as stop:
            return doc.load(progress, stop)
    except Interrupted:
        progress.close()
        kept = doc.checkpoints.written if doc.checkpoints is not None else 0
        raise Interrupted(stopped_reading(progress.done, len(doc.doc_tokens), kept)) from None
    finally:
        _warn(doc)


def _warn(doc) -> None:
    for warning in doc.take_warnings():
        log(f"warning: {warning}")


def _answer(qa, question: str) -> None:
    from ..engine.paces import pace_of

    ask = lambda progress, stop: qa.ask(question, progress, stop)  # noqa: E731
    last = render_stream(ask, "reading document", pace_of(qa.session))
    if last is not None:
        note(stats_line(last, qa.session.plan.describe()))
    _warn(qa)


@click.command()
@click.option(
    "--doc",
    "-d",
    "doc_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The document: text or Markdown; HTML and PDF with the [docs] extra.",
)
@click.argument("question", required=False)
@click.option("--question", "-q", "more", multiple=True, help="Another question (repeatable).")
@click.option("--interactive", "-i", is_flag=True, help="Keep asking questions about the document.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the ingested-document cache.")
@cache_dir_option
@cache_size_option
@checkpoint_option
@model_option
@runtime_options
@extend_options
@sampling_options
@log_options
def qa(
    doc_path,
    question,
    more,
    interactive,
    no_cache,
    cache_dir,
    cache_size,
    checkpoint_every,
    model,
    runtime,
    extend,
    sampling,
    verbose,
) -> None:
    """Answer QUESTION (and each -q) about a document far longer than the model's context.

    The document is ingested once; its state is cached on disk, so later questions, in this run or a later
    one, ingest only the question. A long reading is checkpointed as it goes: interrupted (Ctrl-C, a crash),
    the same command resumes it.
    """
    from ..engine.errors import BadInputError
    from ..tasks.documents import read_document
    from ..tasks.qa import DocumentQA

    questions = [q for q in ([question] if question else []) + list(more)]
    if any(not q.strip() for q in questions):
        raise BadInputError("a question is empty")
    if not questions and not interactive:
        raise BadInputError("ask a question (an argument or -q), or use --interactive")
    text = read_document(doc_path)
    cache = None if no_cache else open_cache(cache_dir, cache_size)
    llm = load_for_cli(model, runtime, verbose)
    with DocumentQA(llm, text, extend, runtime, sampling, cache, checkpoint_every) as doc:
        describe_session(doc.session)
        start = time.perf_counter()
        source = _read(doc)
        seconds = time.perf_counter() - start
        n_doc = len(doc.doc_tokens)
        how = "restored from the cache" if source == "cache" else f"ingested at {n_doc / max(seconds, 1e-9):,.0f} tok/s"
        log(f"document: {n_doc:,} tokens ({how} in {seconds:.1f} s)")
        for i, q in enumerate(questions):
            if len(questions) > 1:
                click.echo(f"{'' if i == 0 else chr(10)}Q: {q}")
            _answer(doc, q)
        with line_editing("qa"):
            while interactive:
                try:
                    line = read_line("? ").strip()
                except EOFError:
                    break
                except KeyboardInterrupt:
                    log("")
                    continue
                if line in ("/exit", "/quit"):
                    break
                if line:
                    _answer(doc, line)
    _warn(doc)  # the entry is written when the document is closed


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL file of records (appended; files already done are skipped).",
)
@click.option(
    "--prompt",
    "prompt_template",
    default=None,
    help="Instructions with {text} where the document goes. Default: a few-sentence summary.",
)
@click.option(
    "--schema",
    "schema_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A JSON schema: each summary is JSON that validates against it, stored parsed in the record.",
)
@click.option("--retry-failed", is_flag=True, help="Summarise again the files whose record is an error.")
@click.option(
    "--parallel",
    "-p",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Files summarised at once, decoded together in one context (with --ray: in each worker).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray workers: alone, start or join a local Ray; 'auto', the running cluster; or HOST:PORT.",
)
@click.option("--workers", type=click.IntRange(1, 4096), default=None, help="Ray workers. Default: CPUs / --threads.")
@click.option("--gpus", type=click.FloatRange(0, 64), default=0.0, help="GPUs for each Ray worker.")
@click.option(
    "--ray-timeout",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="Seconds to reach the Ray cluster before giving up.",
)
@checkpointing_options
@model_option
@runtime_options
@extend_options
@sampling_options
@log_options
def summarize(
    files,
    out,
    prompt_template,
    schema_path,
    retry_failed,
    parallel,
    ray_address,
    workers,
    gpus,
    ray_timeout,
    checkpointing,
    model,
    runtime,
    extend,
    sampling,
    verbose,
) -> None:
    """Summarise FILES into one JSONL record each (path, hash, settings, summary, tokens, seconds, error).

    Resumable: files already summarised with the same content and settings are skipped. A file that fails
    gets an error record and the run goes on; the exit code is 1 when any file has an error record. With
    --parallel N, N files are in flight at once and records are written as each completes. With --ray, the
    files are summarised by Ray workers (each loads the model once; --threads is per worker, 1 by default)
    and this process writes the records as they arrive. A long file's reading is checkpointed as it goes
    (not on Ray): the same command resumes an interrupted one.
    """
    from ..tasks.records import RecordLog
    from ..tasks.summarize import DEFAULT_PROMPT, Summarizer, check_prompt, plan_files, run

    template = prompt_template or DEFAULT_PROMPT
    check_prompt(template)
    schema = _read_schema(schema_path) if schema_path else None
    _make_folder(out.parent)
    if ray_address is not None:
        from ..serving.distributed import Job
        from .ray import RayOptions, summarize_on_ray

        job = Job(model, extend, sampling, template, runtime, parallel, schema)
        summarize_on_ray(RayOptions(ray_address, workers, gpus, ray_timeout), job, files, out, retry_failed, _report)
        return
    with RecordLog(out) as record_log:
        llm = load_for_cli(model, runtime, verbose)
        summarizer = Summarizer(llm, extend, runtime, sampling, template, schema=schema, checkpointing=checkpointing)
        if schema is not None:
            from ..engine.sampling import check_grammar

            check_grammar(llm.vocab, summarizer.sampling_for(final=True).grammar)
        todo = plan_files(summarizer.signature(), list(files), record_log, retry_failed)
        with _scheduler_for(summarizer, parallel, [path for path, _ in todo]) as scheduler:
            _report(run(summarizer, todo, scheduler), record_log, files, len(todo), out)


def _read_schema(path: Path) -> dict:
    """The JSON schema for --schema, checked now (one line if it cannot be read or turned into a grammar)."""
    import json

    from ..engine.errors import BadInputError
    from ..engine.grammar import schema_structure
    from ..tasks.documents import read_text_file

    try:
        schema = json.loads(read_text_file(path))
    except ValueError as exc:
        raise BadInputError(f"--schema {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise BadInputError(f"--schema {path} must hold a JSON object (a JSON schema)")
    schema_structure(schema)
    return schema


def _scheduler_for(summarizer, parallel: int, files):
    """A scheduler of ``parallel`` slots sized for the longest file's call, or nothing for one at a time."""
    from contextlib import nullcontext

    if parallel == 1 or not files:
        return nullcontext(None)
    from ..engine import scheduler

    model, runtime = summarizer.model, summarizer.runtime
    chosen = scheduler.size(model, runtime, summarizer.extend, parallel, summarizer.longest_call(files))
    made = scheduler.Scheduler.create(model, runtime, capacity=chosen)
    note(f"batched: {made.slots} slots of {made.cells:,} cells")
    return made


def _report(records, record_log, files, total: int, out: Path) -> None:
    """Append each record as it comes, with progress over the files; exit 1 while error records remain."""
    progress = IngestProgress("summarising", unit="files", rate_unit="files/min", per_minute=True, costly=False)
    failed = done = 0
    start = time.perf_counter()
    for record in records:
        record_log.append(record)
        done += 1
        failed += bool(record["error"])
        if record["error"]:
            log(f"{record['path']}: {record['error']}")
        progress(done, total)
    progress.close()
    skipped = len(files) - done
    minutes = (time.perf_counter() - start) / 60
    rate = f" in {minutes * 60:.1f} s ({done / minutes:.1f} files/min)" if done and minutes > 0 else ""
    earlier = len(record_log.failed([str(f) for f in files])) - failed
    log(f"{done} summarised ({failed} failed){rate}, {skipped} already done; records in {out}")
    if earlier:
        log(f"{earlier} files failed in an earlier run and still have error records; --retry-failed tries them again")
    if failed or earlier:
        sys.exit(1)


def _make_folder(folder: Path) -> None:
    from ..engine.errors import BadInputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the folder {folder} for --out: {exc.strerror or exc}") from None


@click.group()
def cache() -> None:
    """The cache of ingested documents used by `qa`."""


@cache.command("list")
@cache_dir_option
def cache_list(cache_dir: Path | None) -> None:
    """List cached documents, most recently used first."""
    import time

    from ..engine.kvcache import KVCache
    from ..tasks.info import format_table, human_size

    store = KVCache(cache_dir)
    rows = [["key", "size", "last used", "tokens", "model", "settings"]]
    for e in store.entries():
        ident = e.meta.get("identity", {})
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        rows.append(
            [
                e.path.stem[:12],
                human_size(e.size),
                used,
                f"{e.meta.get('n_tokens', 0):,}",
                e.meta.get("model_name", "?"),
                f"G{ident.get('group')} W{ident.get('window')} {ident.get('schedule')}",
            ]
        )
    click.echo(format_table(rows, align_left=True))
    for warning in store.warnings:
        log(f"warning: {warning}")
    click.echo(f"\n{len(rows) - 1} entries in {store.root}", err=True)


@cache.command("clear")
@cache_dir_option
def cache_clear(cache_dir: Path | None) -> None:
    """Delete every cached document."""
    from ..engine.kvcache import KVCache

    store = KVCache(cache_dir)
    removed = store.clear()
    for warning in store.warnings:
        log(f"warning: {warning}")
    log(f"removed {removed} entries from {store.root}")
