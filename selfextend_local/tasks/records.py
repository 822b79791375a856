"""The JSONL log of summary records: whole-line appends, repaired on open, rewritten only by rename, and
held by one process at a time.

Records are appended one whole line per ``write`` and synced, so an interrupt never leaves a broken line;
a torn last line from a crash is cut off when the file is opened again. An exclusive lock on
``PATH.lock`` (taken with the OS's own locking, released by the OS when the process ends, however it ends)
keeps two runs from duplicating or deleting each other's records.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from ..engine.errors import BadInputError, Name, SelfExtendError
from .documents import check_regular_file

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
        raise BadInputError(
            "cannot write in {folder} ({why}); choose another {out}",
            param="out",
            folder=path.parent,
            why=exc.strerror or exc,
            out=Name("out"),
        ) from None
    try:
        _lock_descriptor(fd)
    except OSError:
        os.close(fd)
        raise LogInUse(
            "{busy} (lock {path}); wait for it to finish or use another {out}",
            param="out",
            busy=busy,
            path=path,
            out=Name("out"),
        ) from None
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
        # The file itself, not the name it was given: a link to the log locks (and rewrites) the same file.
        self.path = Path(os.path.realpath(path))
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
            raise BadInputError(
                "the folder of {out} does not exist: {folder}", param="out", out=Name("out"), folder=folder
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadInputError(
                "cannot write in {folder} (read-only); choose another {out}",
                param="out",
                folder=folder,
                out=Name("out"),
            )
        if self.path.exists() or self.path.is_symlink():
            check_regular_file(self.path, MAX_LOG_BYTES, Name("out"), param="out")
            mode = self.path.stat().st_mode
            if not os.access(self.path, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise BadInputError(
                    "{path} is read-only; make it writable or choose another {out}",
                    param="out",
                    path=self.path,
                    out=Name("out"),
                )

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
