"""An on-disk cache of ingested documents: the KV state plus the schedule state that goes with it.

An entry is keyed by the model file, the SelfExtend settings, the KV cache type, the llama.cpp build and
the document's tokens. Layout: magic, header length, JSON header, the tokens, llama.cpp's sequence
state, and a checksum of everything before it, so no byte of an entry (header included) is used
unchecked. Entries are written to a temporary file (``.tmp-*.part``, never taken for an entry) and
renamed; a truncated, corrupt or mismatched entry is deleted and rebuilt, never used. The folder is
bounded in size: the least recently used entries go first, and temporary files left by a crash are
removed once they are old enough that no live writer can own them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SXKV2\n"
DEFAULT_LIMIT = 4 << 30  # bytes
CACHE_ENV = "SELFEXTEND_LOCAL_CACHE"
MAX_HEADER = 1 << 20
DIGEST = 16
STALE_TEMP_SECONDS = 6 * 3600  # far longer than writing any entry takes
_TEMP_PREFIX, _TEMP_SUFFIX = ".tmp-", ".part"
_BLOCK = 8 << 20


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
    """What a cached document restores: the tokens, the schedule state and llama.cpp's sequence state."""

    tokens: list[int]
    schedule_state: dict[str, int]
    state: bytearray
    meta: dict


@dataclass(frozen=True)
class Listed:
    path: Path
    size: int
    last_used: float
    meta: dict


def _remove(path: Path) -> None:
    """Delete a file, or the directory someone put where an entry belongs; never raise."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _read_exact(f, n: int, hasher) -> bytearray:
    out = bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        k = f.readinto(view[got : got + _BLOCK])
        if not k:
            raise ValueError("truncated entry")
        got += k
    hasher.update(out)
    return out


def _read_header(f, size: int) -> tuple[dict, bytes]:
    start = f.read(len(MAGIC) + 8)
    if len(start) < len(MAGIC) + 8 or start[: len(MAGIC)] != MAGIC:
        raise ValueError("not a cache entry")
    (header_len,) = struct.unpack("<Q", start[len(MAGIC) :])
    if header_len > min(MAX_HEADER, size):
        raise ValueError("implausible header")
    raw = f.read(header_len)
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("bad header")
    return meta, start + raw


class KVCache:
    """A folder of cache entries with LRU eviction down to ``limit`` bytes."""

    def __init__(self, root: Path | None = None, limit: int = DEFAULT_LIMIT) -> None:
        self.root = root or default_dir()
        self.limit = limit

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.kv"

    def get(self, identity: dict) -> Entry | None:
        """The entry for ``identity``, or None; a damaged or mismatched entry is deleted."""
        path = self._path(self.key(identity))
        try:
            entry = self._read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, struct.error, MemoryError):
            self.discard(identity)
            return None
        if entry.meta.get("identity") != identity:
            self.discard(identity)
            return None
        try:
            os.utime(path)  # mark as recently used
        except OSError:
            pass
        return entry

    def discard(self, identity: dict) -> None:
        """Delete the entry for ``identity`` (one that failed to restore, say)."""
        _remove(self._path(self.key(identity)))

    def _read(self, path: Path) -> Entry:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            meta, head = _read_header(f, size)
            n_tokens, n_state = int(meta["n_tokens"]), int(meta["state_bytes"])
            if len(head) + 4 * n_tokens + n_state + DIGEST != size or n_tokens < 0 or n_state < 0:
                raise ValueError("the entry's size does not match its header")
            hasher = hashlib.blake2b(head, digest_size=DIGEST)
            tokens = np.frombuffer(_read_exact(f, 4 * n_tokens, hasher), dtype=np.int32)
            state = _read_exact(f, n_state, hasher)
            if f.read(DIGEST + 1) != hasher.digest():
                raise ValueError("checksum mismatch")
        return Entry(tokens.tolist(), meta["schedule_state"], state, meta)

    def put(self, identity: dict, tokens: list[int], schedule_state: dict[str, int], state, info: dict) -> Path:
        """Store an entry (temporary file, then rename), then evict down to the size limit.

        ``state`` is any bytes-like object; it is written as it is, not copied. Raises CacheWriteError.
        """
        token_bytes = np.asarray(tokens, dtype=np.int32).tobytes()
        state = memoryview(state).cast("B")
        meta = {
            "identity": identity,
            "n_tokens": len(tokens),
            "state_bytes": len(state),
            "schedule_state": schedule_state,
            "created": time.time(),
            **info,
        }
        header = json.dumps(meta).encode()
        path = self._path(self.key(identity))
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
            with os.fdopen(fd, "wb") as f:
                hasher = hashlib.blake2b(digest_size=DIGEST)
                for part in (MAGIC + struct.pack("<Q", len(header)) + header, token_bytes):
                    f.write(part)
                    hasher.update(part)
                for start in range(0, len(state), _BLOCK):
                    block = state[start : start + _BLOCK]
                    f.write(block)
                    hasher.update(block)
                f.write(hasher.digest())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            raise CacheWriteError(f"the document cache was not written to {self.root}: {exc.strerror or exc}") from exc
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    def entries(self) -> list[Listed]:
        """Entries, most recently used first (their headers only); temporary files are not entries."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.glob("*.kv"):
            if path.name.startswith("."):
                continue
            try:
                with path.open("rb") as f:
                    meta, _ = _read_header(f, os.fstat(f.fileno()).st_size)
                stat = path.stat()
            except (OSError, ValueError, struct.error):
                continue
            out.append(Listed(path, stat.st_size, stat.st_mtime, meta))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def _stale_temporaries(self, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
        now = time.time()
        stale = []
        for path in self.root.glob(f"{_TEMP_PREFIX}*"):
            try:
                if now - path.stat().st_mtime > max_age:
                    stale.append(path)
            except OSError:
                continue
        return stale

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the folder fits the limit, and stale temporaries."""
        removed = self._stale_temporaries()
        for path in removed:
            _remove(path)
        listed = self.entries()
        total = sum(e.size for e in listed)
        for entry in reversed(listed):
            if total <= self.limit:
                break
            if entry.path == keep:
                continue
            _remove(entry.path)
            total -= entry.size
            removed.append(entry.path)
        return removed

    def clear(self) -> int:
        """Delete every entry (and temporaries old enough to be leftovers); returns how many entries went."""
        if not self.root.is_dir():
            return 0
        entries = [p for p in self.root.glob("*.kv") if not p.name.startswith(".")]
        for path in entries + self._stale_temporaries():
            _remove(path)
        return len(entries)
