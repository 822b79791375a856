"""The documents given to a server: stored by the hash of their bytes (nothing a client sends names a path on
the server), their text read by ``qa``'s own readers, listed newest first, removed on request.

A folder of two files a document: ``ID.txt`` (the text) and ``ID.json`` (its name, size and kind), each
written to a temporary file and renamed; the folder is bounded, least recently used documents going first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine.errors import BadInputError
from ..tasks.documents import HTML, MAX_FILE_BYTES, PDF, read_document

KINDS = {".txt": "text", ".md": "text", ".markdown": "text", **{s: "html" for s in HTML}, **{s: "pdf" for s in PDF}}
TYPES = {"text/plain": ".txt", "text/markdown": ".md", "text/html": ".html", "application/pdf": ".pdf"}
ID = re.compile(r"[0-9a-f]{32}")
DEFAULT_LIMIT = 1 << 30  # bytes of text kept


@dataclass(frozen=True)
class Stored:
    id: str
    name: str
    kind: str  # text, html or pdf
    bytes: int  # of the file given
    chars: int  # of its text
    added: float


def suffix_for(name: str, content_type: str) -> str:
    """The reader to use: the name's suffix if it has a known one, else the content type's."""
    suffix = Path(name).suffix.lower()
    if suffix in KINDS:
        return suffix
    kind = content_type.split(";")[0].strip().lower()
    if kind in TYPES:
        return TYPES[kind]
    raise BadInputError(
        "cannot tell what kind of document {name!r} is; give it a name ending in {choices}",
        param="name",
        name=name,
        choices=", ".join(sorted(KINDS)),
    )


def clean_name(name: str) -> str:
    """A name to show: its last path part, printable, at most 200 characters."""
    base = re.split(r"[\\/]", name)[-1]
    shown = "".join(c for c in base if c.isprintable())[:200].strip()
    return shown or "document"


class Library:
    def __init__(self, root: Path, limit: int = DEFAULT_LIMIT) -> None:
        self.root = root
        self.limit = limit

    def add(self, data: bytes, name: str, content_type: str) -> tuple[Stored, str]:
        """Store a document given as ``data`` (read as its name or type says); its card and its text."""
        if len(data) > MAX_FILE_BYTES:
            raise BadInputError("the document is over {most} MiB", param="body", most=MAX_FILE_BYTES >> 20)
        if not data:
            raise BadInputError("the document is empty", param="body")
        suffix = suffix_for(name, content_type)
        ident = hashlib.sha256(data).hexdigest()[:32]
        if (found := self.get(ident)) is not None:
            return found
        text = _read(data, suffix, clean_name(name))
        stored = Stored(ident, clean_name(name), KINDS[suffix], len(data), len(text), time.time())
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.root / f"{ident}.txt", text.encode("utf-8"))
        _write(self.root / f"{ident}.json", json.dumps(asdict(stored)).encode())
        self._evict(keep=ident)
        return stored, text

    def get(self, ident: str) -> tuple[Stored, str] | None:
        """A stored document's card and text, or None."""
        if not ID.fullmatch(ident):
            return None
        try:
            card = Stored(**json.loads((self.root / f"{ident}.json").read_text()))
            text = (self.root / f"{ident}.txt").read_text(encoding="utf-8")
        except (OSError, ValueError, TypeError):
            return None
        os.utime(self.root / f"{ident}.json")  # recently used
        return card, text

    def cards(self) -> list[Stored]:
        """Every stored document, newest first."""
        found = []
        for path in self.root.glob("*.json") if self.root.is_dir() else []:
            try:
                found.append(Stored(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(found, key=lambda card: card.added, reverse=True)

    def remove(self, ident: str) -> bool:
        if not ID.fullmatch(ident):
            return False
        gone = False
        for suffix in (".json", ".txt"):
            try:
                (self.root / f"{ident}{suffix}").unlink()
                gone = True
            except FileNotFoundError:
                pass
        return gone

    def _evict(self, keep: str) -> None:
        texts = sorted(self.root.glob("*.txt"), key=lambda p: (self.root / f"{p.stem}.json").stat().st_mtime)
        total = sum(p.stat().st_size for p in texts)
        for path in texts:
            if total <= self.limit:
                break
            if path.stem != keep:
                total -= path.stat().st_size
                self.remove(path.stem)


def _read(data: bytes, suffix: str, name: str) -> str:
    """The text of ``data`` through qa's readers (they read files: a temporary one, removed after)."""
    with tempfile.TemporaryDirectory(prefix="selfextend-upload-") as tmp:
        path = Path(tmp) / f"document{suffix}"
        path.write_bytes(data)
        try:
            return read_document(path)
        except BadInputError as exc:
            if suffix in PDF and "is empty" in exc.template:
                raise BadInputError(
                    "{name} has no text to read (a scanned PDF?); give its text instead", param="body", name=name
                ) from None
            fields = {**exc.fields, "path": name} if "path" in exc.fields else exc.fields  # not our temporary path
            raise type(exc)(exc.template, param="body", suggested=exc.suggested, **fields) from None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
