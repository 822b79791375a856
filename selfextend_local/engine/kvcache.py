"""An on-disk cache of ingested documents: the KV state plus the schedule state that goes with it.

An entry is keyed by the model file, the SelfExtend settings, the KV cache type, the llama.cpp build and
the document's tokens. Layout: llama.cpp's own sequence-state file (written and read by llama.cpp a layer
at a time, so neither costs a copy of the state in memory), then our JSON header, its length, a checksum of
every byte before it, and a magic footer. No byte of an entry is used unchecked: the checksum is verified
(streaming) before llama.cpp reads the file. Entries are written to a temporary file (``.tmp-*.part``,
never taken for an entry) and renamed; a truncated, corrupt or mismatched entry is deleted and rebuilt,
never used. The folder is bounded in size: the least recently used entries go first, and temporary files
left by a crash are removed once they are old enough that no live writer can own them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SXKV3\n"
DEFAULT_LIMIT = 4 << 30  # bytes
CACHE_ENV = "SELFEXTEND_LOCAL_CACHE"
MAX_HEADER = 1 << 20
DIGEST = 16
TRAILER = 8 + DIGEST + len(MAGIC)  # header length, checksum, magic
STALE_TEMP_SECONDS = 6 * 3600  # far longer than writing any entry takes
_TEMP_PREFIX, _TEMP_SUFFIX = ".tmp-", ".part"
_BLOCK = 8 << 20
_ENTRY_NAME = re.compile(r"^[0-9a-f]{32}\.kv$")
STATE_MAGIC = struct.pack("<I", 0x67677371)  # llama.cpp's LLAMA_STATE_SEQ_MAGIC ('ggsq'): a state file's first bytes


def default_dir() -> Path:
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "selfextend-local" / "kv"


def tokens_digest(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


class CacheWriteError(OSError):
    """An entry could not be written (read-only folder, disk full, a directory in the way)."""


@dataclass(frozen=True)
class Entry:
    """A verified entry: llama.cpp reads the state from ``state_path`` (the same file that was checked)."""

    meta: dict
    state_path: str

    @property
    def schedule_state(self) -> dict[str, int]:
        return self.meta["schedule_state"]


@dataclass(frozen=True)
class Listed:
    path: Path
    size: int
    last_used: float
    meta: dict


def _recognised(path: Path) -> str | None:
    """Why ``path`` is not a file this cache wrote (None when it is one): only regular files named like an
    entry or a temporary, that end with our trailer or (cut short by a crash) start as llama.cpp's state
    file, are ever deleted."""
    try:
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # (nothing can be there: the folder is a file)
        return "it is gone"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISREG(info.st_mode):
        return "a directory" if stat.S_ISDIR(info.st_mode) else "a link or special file"
    if not (_ENTRY_NAME.match(path.name) or _is_temporary(path)):
        return "not named like a cache entry"
    try:
        with path.open("rb") as f:
            head = f.read(len(STATE_MAGIC))
            if info.st_size >= len(MAGIC):
                f.seek(info.st_size - len(MAGIC))
            tail = f.read(len(MAGIC))
    except OSError as exc:
        return exc.strerror or str(exc)
    if tail == MAGIC or head == STATE_MAGIC or (_is_temporary(path) and info.st_size == 0):
        return None
    return "not a file this cache wrote"


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(_TEMP_PREFIX) and path.name.endswith(_TEMP_SUFFIX)


def _hash_range(f, end: int, hasher) -> None:
    f.seek(0)
    left = end
    while left:
        block = f.read(min(_BLOCK, left))
        if not block:
            raise ValueError("truncated entry")
        hasher.update(block)
        left -= len(block)


def _read_trailer(f, size: int) -> tuple[dict, int, bytes]:
    """The header, where the header starts, and the stored checksum; ValueError for anything else."""
    if size < TRAILER:
        raise ValueError("not a cache entry")
    f.seek(size - TRAILER)
    tail = f.read(TRAILER)
    if tail[-len(MAGIC) :] != MAGIC:
        raise ValueError("not a cache entry")
    (header_len,) = struct.unpack("<Q", tail[:8])
    if header_len > min(MAX_HEADER, size - TRAILER):
        raise ValueError("implausible header")
    start = size - TRAILER - header_len
    f.seek(start)
    meta = json.loads(f.read(header_len))
    if not isinstance(meta, dict):
        raise ValueError("bad header")
    return meta, start, tail[8 : 8 + DIGEST]


class KVCache:
    """A folder of cache entries with LRU eviction down to ``limit`` bytes.

    It deletes only regular files it wrote and can recognise; anything else in the folder (a directory
    named like an entry, a link, another program's file) is left alone, with a line in :attr:`warnings`.
    """

    def __init__(self, root: Path | None = None, limit: int = DEFAULT_LIMIT) -> None:
        self.root = root or default_dir()
        self.limit = limit
        self.warnings: list[str] = []

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.kv"

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def _remove(self, path: Path) -> bool:
        """Delete ``path`` if it is a file this cache wrote; else leave it, with a warning. Never raises."""
        why = _recognised(path)
        if why == "it is gone":
            return False
        if why is not None:
            self._warn(f"{path} is {why}; the document cache left it alone")
            return False
        try:
            path.unlink()
        except OSError as exc:
            self._warn(f"could not delete {path}: {exc.strerror or exc}")
            return False
        return True

    def has(self, identity: dict) -> bool:
        """Whether an entry for ``identity`` is there (not verified: :meth:`open` does that)."""
        return _recognised(self._path(self.key(identity))) is None

    @contextmanager
    def open(self, identity: dict) -> Iterator[Entry | None]:
        """The verified entry for ``identity`` while the block runs, or None; a damaged or mismatched
        entry of ours is deleted (and said so). The file stays open, so the bytes llama.cpp reads are the
        ones checked."""
        path = self._path(self.key(identity))
        why = _recognised(path)
        if why == "it is gone":
            yield None
            return
        if why is not None:
            self._warn(f"{path} is {why}; the document cache left it alone and will not use it")
            yield None
            return
        try:
            f = path.open("rb")
        except OSError as exc:
            self._warn(f"cannot read the cached document {path}: {exc.strerror or exc}")
            yield None
            return
        with f:
            try:
                meta = self._verify(f)
                if meta.get("identity") != identity:
                    raise ValueError("it belongs to another document")
            except (OSError, ValueError, KeyError, TypeError, struct.error, MemoryError) as exc:
                self._discard_damaged(path, exc)
                yield None
                return
            try:
                os.utime(path)  # mark as recently used
            except OSError:
                pass
            same_file = f"/proc/self/fd/{f.fileno()}"
            yield Entry(meta, same_file if os.path.exists(same_file) else str(path))

    def _discard_damaged(self, path: Path, exc: Exception) -> None:
        if self._remove(path):
            self._warn(f"the cached state of this document was damaged ({exc}); it was deleted and will be rebuilt")

    def _verify(self, f) -> dict:
        size = os.fstat(f.fileno()).st_size
        meta, header_start, stored = _read_trailer(f, size)
        if not isinstance(meta.get("n_tokens"), int) or not isinstance(meta.get("schedule_state"), dict):
            raise ValueError("the header lacks what a restore needs")
        hasher = hashlib.blake2b(digest_size=DIGEST)
        _hash_range(f, size - DIGEST - len(MAGIC), hasher)
        if hasher.digest() != stored or header_start <= 0:
            raise ValueError("checksum mismatch")
        return meta

    def remove(self, identity: dict) -> bool:
        """Delete the entry for ``identity`` (one superseded: a reading's checkpoint once it is done)."""
        return self._remove(self._path(self.key(identity)))

    def discard(self, identity: dict, reason: str = "llama.cpp would not restore it") -> None:
        """Delete the entry for ``identity`` (one that failed to restore, say)."""
        self._discard_damaged(self._path(self.key(identity)), ValueError(reason))

    def put(
        self,
        identity: dict,
        write_state: Callable[[Path], None],
        n_tokens: int,
        schedule_state: dict[str, int],
        info: dict,
    ) -> Path:
        """Store an entry: ``write_state(path)`` writes llama.cpp's state file, we append the header and
        the checksum, then rename; then evict down to the size limit. Raises CacheWriteError."""
        meta = {
            "identity": identity,
            "n_tokens": n_tokens,
            "schedule_state": schedule_state,
            "created": time.time(),
            **info,
        }
        path = self._path(self.key(identity))
        why = _recognised(path)
        if why not in (None, "it is gone"):
            raise CacheWriteError(f"the document cache was not written: {path} is {why}, and was left alone")
        self._write(path, write_state, json.dumps(meta).encode())
        self.evict(keep=path)
        return path

    def _write(self, path: Path, write_state: Callable[[Path], None], header: bytes) -> None:
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
            os.close(fd)
            write_state(Path(tmp))
            with open(tmp, "r+b") as f:
                hasher = hashlib.blake2b(digest_size=DIGEST)
                _hash_range(f, os.fstat(f.fileno()).st_size, hasher)
                tail = header + struct.pack("<Q", len(header))
                hasher.update(tail)
                f.seek(0, os.SEEK_END)
                f.write(tail + hasher.digest() + MAGIC)
            os.replace(tmp, path)
            tmp = None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CacheWriteError(f"the document cache was not written to {self.root}: {reason}") from exc
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)

    def _candidates(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*.kv") if not p.name.startswith("."))

    def entries(self) -> list[Listed]:
        """Entries, most recently used first (their headers only). Temporary files are not entries, and
        whatever else is named like one is left out, with a warning."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self._candidates():
            why = _recognised(path)
            try:
                if why is not None:
                    raise ValueError(why)
                with path.open("rb") as f:
                    meta, _, _ = _read_trailer(f, os.fstat(f.fileno()).st_size)
                stat_ = path.stat()
            except (OSError, ValueError, struct.error) as exc:
                self._warn(f"{path} is not a usable cache entry ({exc}); left alone")
                continue
            out.append(Listed(path, stat_.st_size, stat_.st_mtime, meta))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def _stale_temporaries(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        now = time.time()
        stale = []
        for path in self.root.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            try:
                if now - path.lstat().st_mtime > max_age:
                    stale.append(path)
            except OSError:
                continue
        return stale

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the folder fits the limit, and stale temporaries."""
        removed = [p for p in self._stale_temporaries() if self._remove(p)]
        listed = self.entries()
        total = sum(e.size for e in listed)
        for entry in reversed(listed):
            if total <= self.limit:
                break
            if entry.path == keep:
                continue
            if self._remove(entry.path):
                total -= entry.size
                removed.append(entry.path)
        return removed

    def clear(self) -> int:
        """Delete every entry (and temporaries old enough to be leftovers); returns how many entries went.
        Anything else in the folder stays, with a warning."""
        if not self.root.is_dir():
            return 0
        entries = [e.path for e in self.entries()]
        for path in self._stale_temporaries():
            self._remove(path)
        return sum(self._remove(path) for path in entries)
