"""Batch summarisation of files into a resumable JSONL of records, one per file.

A file already summarised with the same content hash and settings is skipped (:func:`plan_files`); each
new record is appended to the log as soon as it is made (:mod:`selfextend_local.records`). A file beyond
what one call holds is summarised in parts, then the parts' summaries are summarised.

A summary is written as a sequence of calls to the model (:meth:`Summarizer.steps` yields each prompt and
receives its reply), so the same logic runs one file at a time on a session of its own
(:func:`run_sequential`), many files at once in one batched context (:func:`run_batched`), or on the
workers of a Ray cluster (:mod:`selfextend_local.distributed`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..engine.checkpoint import Checkpointing, Checkpoints
from ..engine.errors import InputTooLongError, Name, SelfExtendError
from ..engine.generate import generate
from ..engine.grammar import schema_structure
from ..engine.memory import max_cells
from ..engine.model import Model
from ..engine.planning import default_setting, max_input, plan_for
from ..engine.sampling import Chunk
from ..engine.scheduler import Scheduler
from ..engine.session import open_session
from ..engine.settings import ExtendSettings, RuntimeSettings, SamplingSettings
from ..engine.slots import Request
from .documents import read_document
from .records import RecordLog, file_hash

DEFAULT_PROMPT = "Summarise the following document in a few sentences.\n\n{text}"
PART_GROUP = 16  # the largest group parts are planned for: beyond it a summary of parts reads better
COMBINE_PROMPT = "These are summaries of consecutive parts of one document. Write one summary of the whole.\n\n{text}"


def check_prompt(template: str) -> None:
    if "{text}" not in template:
        raise SelfExtendError(
            "{prompt} must contain {{text}}, where the document goes", param="prompt", prompt=Name("prompt")
        )


@dataclass(frozen=True)
class Reply:
    """What a call to the model gave: the text, its last chunk (counts, finish) and the plan it ran with."""

    text: str
    last: Chunk
    plan: str


@dataclass(frozen=True)
class Prompt:
    """One call to make: its tokens and its sampling (the last call of a summary with --schema carries the
    grammar of the schema)."""

    tokens: list[int]
    sampling: SamplingSettings


Steps = Generator[Prompt, Reply, dict]
Reader = Callable[[Path], str]


def make_signature(
    model_name: str,
    model_size: int,
    extend: ExtendSettings,
    sampling: SamplingSettings,
    prompt: str,
    schema: dict | None = None,
) -> dict:
    """What decides a summary: a record with the same signature (and content hash) is not redone."""
    return ({"schema": schema} if schema is not None else {}) | {
        "model": model_name,
        "model_size": model_size,
        **{f"extend_{k}": v for k, v in asdict(extend).items()},
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "max_tokens": sampling.max_tokens,
        "prompt": prompt,
    }


@dataclass(frozen=True)
class Summarizer:
    """Everything that decides a summary; ``signature`` is what a record must match to be reused.

    ``cells`` caps one call (the slots of a batched context); None: memory and --ctx decide.
    """

    model: Model
    extend: ExtendSettings
    runtime: RuntimeSettings
    sampling: SamplingSettings
    prompt: str = DEFAULT_PROMPT
    cells: int | None = None
    schema: dict | None = None  # the summary is JSON that validates against it
    checkpointing: Checkpointing | None = None  # long readings checkpointed (and resumed) in a disk cache

    def signature(self) -> dict:
        info = self.model.info
        return make_signature(
            self.model.path.name, info.size_bytes, self.extend, self.sampling, self.prompt, self.schema
        )

    def sampling_for(self, final: bool) -> SamplingSettings:
        if not final or self.schema is None:
            return self.sampling
        return replace(self.sampling, **schema_structure(self.schema).fields())

    def _tokens(self, template: str, text: str) -> list[int]:
        content = template.replace("{text}", text)
        if self.model.info.chat_template:
            return self.model.chat_tokens([{"role": "user", "content": content}])
        return self.model.tokenize(content)

    def reach(self) -> int:
        """Tokens one call may hold: these settings' reach (or G=16's), within --ctx, the slots and memory."""
        _, window = default_setting(self.model.info, self.extend)
        limits = [max_input(self.model.info.n_ctx_train, self.extend.group or PART_GROUP, window)]
        limits += [c for c in (self.runtime.ctx, self.cells) if c]
        fits = max_cells(self.model.info, self.runtime.kv_type, self.runtime.gpu_layers > 0)
        return min(limits + ([fits] if fits is not None else []))

    def _one_call(self, n_tokens: int) -> bool:
        n_new = self.sampling.max_tokens
        if n_tokens + n_new > self.reach():
            return False
        try:
            plan_for(self.model, n_tokens + n_new, self.extend, self.runtime, generate=n_new, room=self.cells)
        except InputTooLongError:
            return False
        return True

    def steps(self, text: str, template: str | None = None, final: bool = True) -> Steps:
        """The calls that summarise ``text``: yields each :class:`Prompt`, receives its :class:`Reply`,
        returns the record's fields. Too long for one call, it goes in parts (only the last call, which
        writes the summary, is held to the schema)."""
        tokens = self._tokens(template or self.prompt, text)
        if not self._one_call(len(tokens)):
            return (yield from self._in_parts(text, len(tokens)))
        reply = yield Prompt(tokens, self.sampling_for(final))
        return {
            "summary": self._summary(reply, final),
            "prompt_tokens": len(tokens),
            "summary_tokens": reply.last.generated_tokens,
            "method": "direct",
            "parts": 1,
            "plan": reply.plan,
        }

    def _in_parts(self, text: str, n_tokens: int) -> Steps:
        overhead = len(self._tokens(self.prompt, "")) + self.sampling.max_tokens
        reach = self.reach()
        if 4 * overhead > reach:  # parts' summaries would not be shorter than the parts
            raise InputTooLongError(
                "the document has {n} tokens and one call holds {reach}: too few for parts with {max_tokens} "
                "{value}; lower {max_tokens} or raise {ctx}",
                param="max_tokens",
                n=n_tokens,
                reach=reach,
                value=self.sampling.max_tokens,
                max_tokens=Name("max_tokens"),
                ctx=Name("ctx"),
            )
        size = reach - overhead - 64
        doc = self.model.tokenize(text, add_special=False)
        pieces = [self.model.detokenize(doc[i : i + size]) for i in range(0, len(doc), size)]
        parts = []
        for piece in pieces:
            parts.append((yield from self.steps(piece, final=False))["summary"])
        joined = "\n\n".join(f"Part {i + 1}: {s}" for i, s in enumerate(parts))
        combined = yield from self.steps(joined, COMBINE_PROMPT)
        return {**combined, "prompt_tokens": n_tokens, "method": "parts", "parts": len(pieces)}

    def _summary(self, reply: Reply, final: bool) -> str | object:
        """The summary's text, or (with a schema) the JSON value it holds."""
        if not final or self.schema is None:
            return reply.text.strip()
        try:
            return json.loads(reply.text)
        except ValueError as exc:
            cut = reply.last.finish_reason == "length"
            raise SelfExtendError(
                "the summary is not complete JSON ({detail})" + ("; raise {max_tokens}" if cut else ""),
                param="max_tokens" if cut else "schema",
                detail=exc,
                max_tokens=Name("max_tokens"),
            ) from None

    def call(self, prompt: Prompt) -> Reply:
        """One call on a session of its own, sized for it."""
        n_new = prompt.sampling.max_tokens
        tokens = prompt.tokens
        with open_session(self.model, len(tokens) + n_new, self.extend, self.runtime, generate=n_new) as session:
            text, last = generate(session, tokens, prompt.sampling, checkpoints=self.checkpoints(tokens))
            return Reply(text, last, session.plan.describe())

    def checkpoints(self, tokens: list[int]) -> Checkpoints | None:
        return self.checkpointing(tokens) if self.checkpointing is not None else None

    def longest_call(self, files: list[Path]) -> int:
        """Tokens the longest call over ``files`` may need: the largest file (a token is at least a byte),
        512 for the prompt around it, and the summary; at most what one call holds with the family's
        setting (a longer file goes in parts)."""
        from ..engine.capacity import default_cells

        largest = max((f.stat().st_size for f in files if f.is_file()), default=0)
        return min(largest + 512 + self.sampling.max_tokens, default_cells(self.model, self.extend))

    def summarize_text(self, text: str, template: str | None = None) -> dict:
        """The record's fields for ``text``, one call after another."""
        steps = self.steps(text, template)
        try:
            prompt = next(steps)
            while True:
                prompt = steps.send(self.call(prompt))
        except StopIteration as done:
            return done.value


# -- which files, and the records ------------------------------------------------------------------


def plan_files(
    signature: dict, files: list[Path], log: RecordLog, retry_failed: bool = False
) -> list[tuple[Path, str | None]]:
    """The files to summarise, with their hashes: those without a record of the same content and settings
    (``signature``; and, with ``retry_failed``, those whose record is an error). Stale records are dropped
    from the log."""
    todo, stale = [], set()
    for path in files:
        key, digest = str(path), file_hash(path)
        old = log.find(key)
        if old and old.get("sha256") == digest and old.get("settings") == signature:
            if not (retry_failed and old.get("error")):
                continue
        if old:
            stale.add(key)
        todo.append((path, digest))
    log.drop(stale)
    return todo


def new_record(path: Path, digest: str | None, signature: dict) -> dict:
    return {"path": str(path), "sha256": digest, "settings": signature}


def finish_record(record: dict, fields: dict | None, error: str | None, seconds: float) -> dict:
    record.update(fields or {"summary": None})
    record["error"] = error
    record["seconds"] = round(seconds, 3)
    return record


def run_sequential(
    summarizer: Summarizer, todo: list[tuple[Path, str | None]], reader: Reader = read_document
) -> Iterator[dict]:
    """One file after another, each call on a session of its own; yields each record. ``reader`` gives a
    file's text (default: read it here)."""
    signature = summarizer.signature()
    for path, digest in todo:
        start = time.perf_counter()
        record = new_record(path, digest, signature)
        try:
            fields = summarizer.summarize_text(reader(path))
            yield finish_record(record, fields, None, time.perf_counter() - start)
        except SelfExtendError as exc:
            yield finish_record(record, None, str(exc), time.perf_counter() - start)


@dataclass(eq=False)
class _Task:
    """A file in flight in the batched run: its steps, and the reply being collected."""

    record: dict
    steps: Steps
    start: float
    parts: list[str] = field(default_factory=list)
    last: Chunk | None = None
    error: str | None = None
    plan: str = ""

    def on_chunk(self, chunk: Chunk) -> None:
        self.parts.append(chunk.text)
        if chunk.finish_reason is not None:
            self.last = chunk

    def on_error(self, exc: Exception) -> None:
        self.error = str(exc)

    @property
    def answered(self) -> bool:
        return self.last is not None or self.error is not None

    def finish(self, fields: dict | None, error: str | None) -> dict:
        return finish_record(self.record, fields, error, time.perf_counter() - self.start)


class _Batched:
    """Many files at once: every call is a request to ``scheduler``, and a file has one call in flight at
    a time (as many files are begun as there are slots)."""

    def __init__(self, summarizer: Summarizer, scheduler: Scheduler, reader: Reader) -> None:
        self.summarizer = replace(summarizer, cells=scheduler.cells)
        self.scheduler = scheduler
        self.reader = reader
        self.signature = self.summarizer.signature()

    def records(self, todo: list[tuple[Path, str | None]]) -> Iterator[dict]:
        waiting = deque(todo)
        running: list[_Task] = []
        while waiting or running:
            while waiting and len(running) < self.scheduler.slots:
                task, record = self._begin(*waiting.popleft())
                if record is not None:
                    yield record
                else:
                    running.append(task)
            self.scheduler.advance()
            for task in [t for t in running if t.answered]:
                record = task.finish(None, task.error) if task.error else self._advance(task, self._reply(task))
                if record is not None:
                    running.remove(task)
                    yield record

    def _begin(self, path: Path, digest: str | None) -> tuple[_Task, dict | None]:
        task = _Task(new_record(path, digest, self.signature), iter(()), time.perf_counter())
        try:
            task.steps = self.summarizer.steps(self.reader(path))
        except SelfExtendError as exc:
            return task, finish_record(task.record, None, str(exc), 0.0)
        return task, self._advance(task, None)

    @staticmethod
    def _reply(task: _Task) -> Reply:
        return Reply("".join(task.parts), task.last, task.plan)

    def _advance(self, task: _Task, reply: Reply | None) -> dict | None:
        """Feed the reply to the task's steps: submit its next call, or return its finished record."""
        try:
            prompt = next(task.steps) if reply is None else task.steps.send(reply)
            self._submit(task, prompt)
            return None
        except StopIteration as done:
            return task.finish(done.value, None)
        except SelfExtendError as exc:
            return task.finish(None, str(exc))

    def _submit(self, task: _Task, prompt: Prompt) -> None:
        task.parts, task.last = [], None
        extend = self.summarizer.extend
        request = Request(prompt.tokens, prompt.sampling, extend, on_chunk=task.on_chunk, on_error=task.on_error)
        request.checkpoints = self.summarizer.checkpoints(prompt.tokens)
        self.scheduler.submit(request)  # planned now; a call that cannot be served raises here
        task.plan = request.plan.describe()


def run_batched(
    summarizer: Summarizer, todo: list[tuple[Path, str | None]], scheduler: Scheduler, reader: Reader = read_document
) -> Iterator[dict]:
    """Many files at once in ``scheduler``'s slots; yields each record as its file completes (completion order)."""
    return _Batched(summarizer, scheduler, reader).records(todo)


def run(
    summarizer: Summarizer, todo: list[tuple[Path, str | None]], scheduler=None, reader: Reader = read_document
) -> Iterator[dict]:
    """The records of ``todo``: together in ``scheduler``'s slots, else one file at a time."""
    if scheduler is not None:
        return run_batched(summarizer, todo, scheduler, reader)
    return run_sequential(summarizer, todo, reader)
