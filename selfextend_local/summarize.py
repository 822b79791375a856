"""Batch summarisation of files into a resumable JSONL of records, one per file.

Records are appended one whole line per ``write`` and synced, so an interrupt never leaves a broken line;
a torn last line from a crash is cut off when the file is opened again. A file already summarised with
the same content hash and settings is skipped. A file beyond the largest extendable length is summarised
in parts, then the parts' summaries are summarised.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .documents import check_regular_file, read_document
from .engine import open_session
from .errors import BadInputError, InputTooLongError, SelfExtendError
from .generate import generate
from .memory import ContextTooLargeError, max_cells
from .model import Model
from .planning import default_window, max_input
from .registry import family_for
from .settings import ExtendSettings, RuntimeSettings, SamplingSettings

DEFAULT_PROMPT = "Summarise the following document in a few sentences.\n\n{text}"
PART_GROUP = 16  # the largest group parts are planned for: beyond it a summary of parts reads better
COMBINE_PROMPT = "These are summaries of consecutive parts of one document. Write one summary of the whole.\n\n{text}"


def check_prompt(template: str) -> None:
    if "{text}" not in template:
        raise SelfExtendError("--prompt must contain {text}, where the document goes")


MAX_LOG_BYTES = 1 << 30


class LogInUse(SelfExtendError):
    """Another process holds the record log."""


def lock_file(path: Path, busy: str) -> int:
    """Hold an exclusive lock on ``path`` (created if need be) until the returned descriptor is closed.

    The lock goes with the process: a run that is killed leaves no stale lock behind.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BadInputError(f"cannot write in {path.parent} ({exc.strerror or exc}); choose another --out") from None
    try:
        _lock_descriptor(fd)
    except OSError:
        os.close(fd)
        raise LogInUse(f"{busy} (lock {path}); wait for it to finish or use another --out") from None
    return fd


def _lock_descriptor(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class RecordLog:
    """A JSONL file of records; whole-line appends, repaired on open, rewritten only by rename.

    One process at a time: an exclusive lock on ``PATH.lock`` is held from :meth:`open` to
    :meth:`close`, so two runs on one log can neither duplicate nor delete each other's records.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = None
        self.records: list[dict] = []

    def open(self) -> RecordLog:
        """Check that the log can be written, lock it, and read its records."""
        self._check_writable()
        self._lock = lock_file(Path(f"{self.path}.lock"), f"{self.path} is in use by another summarize run")
        try:
            self.records = self._load()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def __enter__(self) -> RecordLog:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            raise BadInputError(f"the folder of --out does not exist: {folder}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadInputError(f"cannot write in {folder} (read-only); choose another --out")
        if self.path.exists() or self.path.is_symlink():
            check_regular_file(self.path, MAX_LOG_BYTES, "--out")
            mode = self.path.stat().st_mode
            if not os.access(self.path, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise BadInputError(f"{self.path} is read-only; make it writable or choose another --out")

    def _load(self) -> list[dict]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        records, damaged = [], not raw.endswith(b"\n") and raw != b""
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a torn line, or bytes that are not UTF-8
                damaged = True
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                damaged = True
        if damaged:
            self._rewrite(records)
        return records

    def _rewrite(self, records: list[dict]) -> None:
        """Replace the log by ``records``: a temporary file with the log's own mode, then a rename."""
        mode = stat.S_IMODE(self.path.stat().st_mode) if self.path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def find(self, path: str) -> dict | None:
        return next((r for r in self.records if r.get("path") == path), None)

    def failed(self, paths: list[str]) -> list[dict]:
        """The error records among ``paths``: failures of this run and of earlier ones not retried."""
        wanted = set(paths)
        return [r for r in self.records if r.get("path") in wanted and r.get("error")]

    def drop(self, paths: set[str]) -> None:
        """Remove the records of ``paths`` (stale or to be retried), atomically."""
        kept = [r for r in self.records if r.get("path") not in paths]
        if len(kept) != len(self.records):
            self.records = kept
            self._rewrite(kept)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)


@dataclass(frozen=True)
class Summarizer:
    """Everything that decides a summary; ``signature`` is what a record must match to be reused."""

    model: Model
    extend: ExtendSettings
    runtime: RuntimeSettings
    sampling: SamplingSettings
    prompt: str = DEFAULT_PROMPT

    def signature(self) -> dict:
        return {
            "model": self.model.path.name,
            "model_size": self.model.info.size_bytes,
            **{f"extend_{k}": v for k, v in asdict(self.extend).items()},
            "temperature": self.sampling.temperature,
            "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p,
            "seed": self.sampling.seed,
            "max_tokens": self.sampling.max_tokens,
            "prompt": self.prompt,
        }

    def _tokens(self, template: str, text: str) -> list[int]:
        content = template.replace("{text}", text)
        if self.model.info.chat_template:
            return self.model.chat_tokens([{"role": "user", "content": content}])
        return self.model.tokenize(content)

    def _reach(self) -> int:
        """Tokens one summary call may hold: these settings' reach (or G=16's), within --ctx and memory."""
        L = self.model.info.n_ctx_train
        family = family_for(self.model.info)
        window = self.extend.window or (family.window if family else default_window(L))
        limits = [max_input(L, self.extend.group or PART_GROUP, window)]
        limits.append(self.runtime.ctx or limits[0])
        fits = max_cells(self.model.info, self.runtime.kv_type, self.runtime.gpu_layers > 0)
        limits.append(fits if fits is not None else limits[0])
        return min(limits)

    def summarize_text(self, text: str, template: str | None = None) -> dict:
        """Summary and counts for ``text``; too long for one call, it goes in parts."""
        template = template or self.prompt
        tokens = self._tokens(template, text)
        n_new = self.sampling.max_tokens
        try:
            if len(tokens) + n_new > self._reach():
                raise InputTooLongError("beyond one call")
            with open_session(self.model, len(tokens) + n_new, self.extend, self.runtime, generate=n_new) as s:
                summary, last = generate(s, tokens, self.sampling)
                plan = s.plan.describe()
        except (InputTooLongError, ContextTooLargeError):
            return self._in_parts(text, len(tokens))
        return {
            "summary": summary.strip(),
            "prompt_tokens": len(tokens),
            "summary_tokens": last.generated_tokens,
            "method": "direct",
            "parts": 1,
            "plan": plan,
        }

    def _in_parts(self, text: str, n_tokens: int) -> dict:
        overhead = len(self._tokens(self.prompt, "")) + self.sampling.max_tokens
        reach = self._reach()
        if 4 * overhead > reach:  # parts' summaries would not be shorter than the parts
            raise InputTooLongError(
                f"the document has {n_tokens} tokens and one call holds {reach}: too few for parts with "
                f"--max-tokens {self.sampling.max_tokens}; lower --max-tokens or raise --ctx"
            )
        size = reach - overhead - 64
        doc = self.model.tokenize(text, add_special=False)
        pieces = [self.model.detokenize(doc[i : i + size]) for i in range(0, len(doc), size)]
        parts = [self.summarize_text(p)["summary"] for p in pieces]
        joined = "\n\n".join(f"Part {i + 1}: {s}" for i, s in enumerate(parts))
        combined = self.summarize_text(joined, COMBINE_PROMPT)
        return {**combined, "prompt_tokens": n_tokens, "method": "parts", "parts": len(pieces)}


def file_hash(path: Path) -> str | None:
    """SHA-256 of a regular file's bytes, or None for anything that cannot be summarised (then reading
    it gives the error record its message)."""
    try:
        check_regular_file(path, 1 << 40)
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except (OSError, SelfExtendError):
        return None


def summarize_files(
    summarizer: Summarizer,
    files: list[Path],
    log: RecordLog,
    retry_failed: bool = False,
    on_start: Callable[[Path], None] | None = None,
) -> Iterator[dict]:
    """Summarise each file not already done with the same hash and settings; yield each new record."""
    signature = summarizer.signature()
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
    for path, digest in todo:
        if on_start:
            on_start(path)
        start = time.perf_counter()
        record = {"path": str(path), "sha256": digest, "settings": signature}
        try:
            record.update(summarizer.summarize_text(read_document(path)))
            record["error"] = None
        except SelfExtendError as exc:
            record.update({"summary": None, "error": str(exc)})
        record["seconds"] = round(time.perf_counter() - start, 3)
        log.append(record)
        yield record
