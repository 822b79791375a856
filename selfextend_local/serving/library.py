"""The documents given to a server: stored by the hash of their bytes (nothing a client sends names a path on
the server), their text read by ``qa``'s own readers (a PDF or HTML in a bounded child process,
:mod:`.reader`), listed newest first, removed on request.

A folder of files a document: ``ID.txt`` (the text), ``ID.json`` (its card: name, size, kind, and for each
model that has read it, its token count and digest) and ``ID.MODEL.tok`` (its tokens for that model, int32),
each written to a temporary file of its own and renamed, so that two uploads of one document at once both
store it whole, and a listing beside a removal never sees half a document. The folder is bounded, least
recently used documents going first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from email import policy
from email.parser import BytesParser
from pathlib import Path

import numpy as np

from ..engine.errors import BadInputError, cut
from ..tasks.documents import HTML, MAX_FILE_BYTES, PDF
from .reader import read_text

KINDS = {".txt": "text", ".md": "text", ".markdown": "text", **{s: "html" for s in HTML}, **{s: "pdf" for s in PDF}}
TYPES = {"text/plain": ".txt", "text/markdown": ".md", "text/html": ".html", "application/pdf": ".pdf"}
ID = re.compile(r"[0-9a-f]{32}")
KEY = re.compile(r"[0-9a-f]{16}")
DEFAULT_LIMIT = 1 << 30  # bytes of text and tokens kept on disk
PARSE_SECONDS = 60.0  # a PDF or HTML upload read for longer is refused
PARSE_BYTES = 1 << 30  # the reading process's address space


@dataclass(frozen=True)
class Stored:
    id: str
    name: str
    kind: str  # text, html or pdf
    bytes: int  # of the file given
    chars: int  # of its text
    added: float
    facts: dict = field(default_factory=dict)  # model key -> {"tokens": n, "digest": sha256 of the tokens}


@dataclass(frozen=True)
class Upload:
    """A document as a client sent it: its bytes, its name (if it gave one) and its content type."""

    data: bytes
    name: str | None
    content_type: str

    def unwrapped(self) -> Upload:
        """The file of a ``multipart/form-data`` body (a browser's form, ``curl -F``), else itself. The body
        is cut at its boundaries as bytes (a pure-Python parse of 64 MiB would hold the interpreter for
        seconds); only each part's few header lines are parsed."""
        if not self.content_type.lower().startswith("multipart/form-data"):
            return self
        boundary = _header(f"Content-Type: {self.content_type}").get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise BadInputError("the form has no boundary in its Content-Type", param="body")
        parts = []
        for part in self.data.split(b"--" + boundary.encode("latin-1", errors="replace"))[1:]:
            if part.startswith(b"--"):
                break  # the closing boundary
            head, found, body = part.partition(b"\r\n\r\n")
            if found:
                headers = _header(head.strip(b"\r\n").decode("latin-1"))
                parts.append((headers, body.removesuffix(b"\r\n")))
        chosen = next((p for p in parts if p[0].get_filename()), None) or next(iter(parts), None)
        if chosen is None:
            raise BadInputError("the form has no file in it; send the file's bytes as the body", param="body")
        headers, data = chosen
        kind = headers.get_content_type() if headers.get("content-type") else ""
        return Upload(data, self.name or headers.get_filename(), kind)

    def suffix(self) -> str:
        """The reader to use: the name's suffix if it has a known one, else the content type's, else a
        PDF's own signature; else text."""
        suffix = Path(self.name or "").suffix.lower()
        if suffix in KINDS:
            return suffix
        kind = self.content_type.split(";")[0].strip().lower()
        if kind in TYPES:
            return TYPES[kind]
        if self.data.startswith(b"%PDF-"):
            return ".pdf"
        if self.name is None or not suffix:
            return ".txt"
        raise BadInputError(
            "cannot tell what kind of document {name!r} is; give it a name ending in {choices}",
            param="name",
            name=cut(self.name),
            choices=", ".join(sorted(KINDS)),
        )


def _header(lines: str):
    return BytesParser(policy=policy.HTTP).parsebytes((lines + "\r\n\r\n").encode("latin-1", errors="replace"))


def clean_name(name: str | None) -> str:
    """A name to show: its last path part, printable, at most 200 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    shown = "".join(c for c in base if c.isprintable())[:200].strip()
    return shown or "document"


class Library:
    def __init__(
        self, root: Path, limit: int = DEFAULT_LIMIT, seconds: float = PARSE_SECONDS, memory: int = PARSE_BYTES
    ) -> None:
        self.root = root
        self.limit = limit
        self.seconds, self.memory = seconds, memory
        self.lock = threading.Lock()  # a card's read-modify-write, and the locks below
        self.adding: dict[str, threading.Lock] = {}  # one reading of a document's bytes at a time

    def add(self, upload: Upload) -> Stored:
        """Store a document (read as its name or type says); its card. The same bytes sent twice, or by
        two clients at once, are read once and stored once."""
        upload = upload.unwrapped()
        if len(upload.data) > MAX_FILE_BYTES:
            raise BadInputError("the document is over {most} MiB", param="body", most=MAX_FILE_BYTES >> 20)
        if not upload.data:
            raise BadInputError("the document is empty", param="body")
        suffix = upload.suffix()
        ident = hashlib.sha256(upload.data).hexdigest()[:32]
        with self._adding(ident):
            if (found := self.card(ident)) is not None and (self.root / f"{ident}.txt").exists():
                return found
            name = clean_name(upload.name)
            text = read_text(upload.data, suffix, name, self.seconds, self.memory)
            stored = Stored(ident, name, KINDS[suffix], len(upload.data), len(text), time.time())
            self.root.mkdir(parents=True, exist_ok=True)
            _write(self.root / f"{ident}.txt", text.encode("utf-8"))
            _write(self.root / f"{ident}.json", json.dumps(asdict(stored)).encode())
        self._evict(keep=ident)
        return stored

    def _adding(self, ident: str) -> threading.Lock:
        with self.lock:
            return self.adding.setdefault(ident, threading.Lock())

    def card(self, ident: str) -> Stored | None:
        """A stored document's card, or None."""
        if not ID.fullmatch(ident):
            return None
        try:
            return Stored(**json.loads((self.root / f"{ident}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def text(self, ident: str) -> str | None:
        """A stored document's text, or None; it counts as used."""
        if not ID.fullmatch(ident):
            return None
        try:
            text = (self.root / f"{ident}.txt").read_text(encoding="utf-8")
            os.utime(self.root / f"{ident}.json")  # recently used
        except (OSError, ValueError):
            return None
        return text

    def note(self, ident: str, key: str, facts: dict) -> Stored | None:
        """Keep what a model made of the document (its token count and digest) in its card."""
        with self.lock:
            card = self.card(ident)
            if card is None:
                return None
            card = replace(card, facts={**card.facts, key: facts})
            _write(self.root / f"{ident}.json", json.dumps(asdict(card)).encode())
        return card

    def save_tokens(self, ident: str, key: str, tokens: np.ndarray) -> None:
        if ID.fullmatch(ident) and KEY.fullmatch(key) and (self.root / f"{ident}.json").exists():
            _write(self.root / f"{ident}.{key}.tok", tokens.astype("<i4").tobytes())

    def tokens(self, ident: str, key: str) -> np.ndarray | None:
        """The document's tokens for a model, as kept on disk (None when they are not)."""
        if not (ID.fullmatch(ident) and KEY.fullmatch(key)):
            return None
        try:
            return np.frombuffer((self.root / f"{ident}.{key}.tok").read_bytes(), dtype="<i4").astype(np.int32)
        except OSError:
            return None

    def cards(self) -> list[Stored]:
        """Every stored document, newest first (a card that cannot be read, or is being removed, is left out)."""
        found = [card for path in self._files("*.json") if (card := self.card(path.stem)) is not None]
        return sorted(found, key=lambda card: card.added, reverse=True)

    def remove(self, ident: str) -> bool:
        if not ID.fullmatch(ident):
            return False
        gone = False
        for path in [self.root / f"{ident}.json", self.root / f"{ident}.txt", *self._files(f"{ident}.*.tok")]:
            try:
                path.unlink()
                gone = True
            except FileNotFoundError:
                pass
        return gone

    def _files(self, pattern: str) -> list[Path]:
        return list(self.root.glob(pattern)) if self.root.is_dir() else []

    def _evict(self, keep: str) -> None:
        sizes: dict[str, int] = {}
        for path in self._files("*.txt") + self._files("*.tok"):
            ident = path.name.split(".")[0]
            try:
                sizes[ident] = sizes.get(ident, 0) + path.stat().st_size
            except FileNotFoundError:
                continue
        total = sum(sizes.values())
        for ident in sorted(sizes, key=self._used):
            if total <= self.limit:
                break
            if ident != keep:
                total -= sizes[ident]
                self.remove(ident)

    def _used(self, ident: str) -> float:
        try:
            return (self.root / f"{ident}.json").stat().st_mtime
        except FileNotFoundError:
            return 0.0


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file of this call's own, renamed."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
