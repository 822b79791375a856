"""An on-disk cache of ingested documents: the KV state plus the schedule state that goes with it.

An entry is keyed by the model file, the SelfExtend settings, the KV cache type, the llama.cpp build and
the document's tokens. Entries are written to a temporary file and renamed; each carries a checksum, so a
truncated, corrupt or mismatched entry is detected, deleted and rebuilt, never used. The folder is
bounded in size: the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SXKV1\n"
DEFAULT_LIMIT = 4 << 30  # bytes
CACHE_ENV = "SELFEXTEND_LOCAL_CACHE"


def default_dir() -> Path:
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "selfextend-local" / "kv"


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tokens_digest(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """What a cached document restores: the tokens, the schedule state and llama.cpp's sequence state."""

    tokens: list[int]
    schedule_state: dict[str, int]
    state: bytes
    meta: dict


@dataclass(frozen=True)
class Listed:
    path: Path
    size: int
    last_used: float
    meta: dict


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
        except (OSError, ValueError, KeyError, json.JSONDecodeError, struct.error):
            path.unlink(missing_ok=True)
            return None
        if entry.meta.get("identity") != identity:
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # mark as recently used
        return entry

    def _read(self, path: Path) -> Entry:
        with path.open("rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a cache entry")
            (header_len,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(header_len))
            tokens = np.frombuffer(f.read(4 * meta["n_tokens"]), dtype=np.int32)
            state = f.read(meta["state_bytes"])
            if f.read(1):
                raise ValueError("trailing data")
        if len(tokens) != meta["n_tokens"] or len(state) != meta["state_bytes"]:
            raise ValueError("truncated entry")
        if _checksum(tokens.tobytes() + state) != meta["checksum"]:
            raise ValueError("checksum mismatch")
        return Entry(tokens.tolist(), meta["schedule_state"], state, meta)

    def put(self, identity: dict, tokens: list[int], schedule_state: dict[str, int], state: bytes, info: dict) -> Path:
        """Store an entry (temporary file, then rename), then evict down to the size limit."""
        self.root.mkdir(parents=True, exist_ok=True)
        token_bytes = np.asarray(tokens, dtype=np.int32).tobytes()
        meta = {
            "identity": identity,
            "n_tokens": len(tokens),
            "state_bytes": len(state),
            "schedule_state": schedule_state,
            "checksum": _checksum(token_bytes + state),
            "created": time.time(),
            **info,
        }
        header = json.dumps(meta).encode()
        path = self._path(self.key(identity))
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".kv")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                f.write(token_bytes)
                f.write(state)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.evict(keep=path)
        return path

    def entries(self) -> list[Listed]:
        """Entries, most recently used first (their headers only)."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.glob("*.kv"):
            try:
                with path.open("rb") as f:
                    if f.read(len(MAGIC)) != MAGIC:
                        continue
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    meta = json.loads(f.read(header_len))
                stat = path.stat()
            except (OSError, ValueError, struct.error):
                continue
            out.append(Listed(path, stat.st_size, stat.st_mtime, meta))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the folder fits the limit."""
        removed = []
        listed = self.entries()
        total = sum(e.size for e in listed)
        for entry in reversed(listed):
            if total <= self.limit:
                break
            if entry.path == keep:
                continue
            entry.path.unlink(missing_ok=True)
            total -= entry.size
            removed.append(entry.path)
        return removed

    def clear(self) -> int:
        """Delete every entry (and leftovers of interrupted writes); returns how many entries went."""
        if not self.root.is_dir():
            return 0
        count = 0
        for path in list(self.root.glob("*.kv")) + list(self.root.glob(".tmp-*")):
            path.unlink(missing_ok=True)
            count += path.suffix == ".kv" and not path.name.startswith(".tmp-")
        return count
