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
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .documents import read_document
from .engine import open_session
from .errors import InputTooLongError, SelfExtendError
from .generate import generate
from .model import Model
from .planning import default_window, max_input
from .registry import family_for
from .settings import ExtendSettings, RuntimeSettings, SamplingSettings

DEFAULT_PROMPT = "Summarise the following document in a few sentences.\n\n{text}"
COMBINE_PROMPT = "These are summaries of consecutive parts of one document. Write one summary of the whole.\n\n{text}"


def check_prompt(template: str) -> None:
    if "{text}" not in template:
        raise SelfExtendError("--prompt must contain {text}, where the document goes")


class RecordLog:
    """A JSONL file of records; whole-line appends, repaired on open, rewritten only by rename."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict] = self._load()

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
                records.append(json.loads(line))
            except json.JSONDecodeError:
                damaged = True
        if damaged:
            self._rewrite(records)
        return records

    def _rewrite(self, records: list[dict]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def find(self, path: str) -> dict | None:
        return next((r for r in self.records if r.get("path") == path), None)

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
        """Tokens one summary call may hold with these settings (or the family's, or G=64), within --ctx."""
        L = self.model.info.n_ctx_train
        family = family_for(self.model.info)
        window = self.extend.window or (family.window if family else default_window(L))
        reach = max_input(L, self.extend.group or 64, window)
        return min(reach, self.runtime.ctx) if self.runtime.ctx else reach

    def summarize_text(self, text: str, template: str | None = None) -> dict:
        """Summary and counts for ``text``; too long for one call, it goes in parts."""
        template = template or self.prompt
        tokens = self._tokens(template, text)
        try:
            with open_session(self.model, len(tokens) + self.sampling.max_tokens, self.extend, self.runtime) as s:
                summary, last = generate(s, tokens, self.sampling)
                plan = s.plan.describe()
        except InputTooLongError:
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
        size = max(256, self._reach() - overhead - 64)
        doc = self.model.tokenize(text, add_special=False)
        pieces = [self.model.detokenize(doc[i : i + size]) for i in range(0, len(doc), size)]
        parts = [self.summarize_text(p)["summary"] for p in pieces]
        joined = "\n\n".join(f"Part {i + 1}: {s}" for i, s in enumerate(parts))
        combined = self.summarize_text(joined, COMBINE_PROMPT)
        return {**combined, "prompt_tokens": n_tokens, "method": "parts", "parts": len(pieces)}


def file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
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
