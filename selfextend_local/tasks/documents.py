"""Reading documents: plain text and Markdown always; HTML and PDF with an optional library.

Every read is bounded: only regular files are opened (a FIFO would block, a device never ends), and a
file or stream larger than the limit is refused before any work, in one line.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..engine.errors import BadInputError, Name
from ..extras import require

HTML = {".html", ".htm", ".xhtml"}
PDF = {".pdf"}
MAX_TEXT_BYTES = 16 << 20  # about 4M tokens: beyond what any SelfExtend setting reaches, even in parts
MAX_FILE_BYTES = 64 << 20  # HTML and PDF carry markup and fonts besides their text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def check_regular_file(
    path: str | Path, limit: int = MAX_TEXT_BYTES, what: str | Name = "file", param: str | None = None
) -> int:
    """The size of ``path``; a one-line error unless it is a regular file of at most ``limit`` bytes.
    ``what`` names the file in the error (a setting's :class:`Name`, or a word); ``param`` is its setting."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BadInputError("{what} not found: {path}", param=param, what=what, path=path) from None
    except OSError as exc:
        raise BadInputError("cannot read {path}: {why}", param=param, path=path, why=exc.strerror or exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise BadInputError("{path} is a directory; pass a file", param=param, path=path)
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(
            "{path} is not a regular file (a FIFO, socket or device); pass a file", param=param, path=path
        )
    if info.st_size > limit:
        raise BadInputError(
            "{path} is {mib:.1f} MiB; files over {limit} are refused",
            param=param,
            path=path,
            mib=info.st_size / (1 << 20),
            limit=_mib(limit),
        )
    if not os.access(path, os.R_OK):
        raise BadInputError("cannot read {path}: permission denied", param=param, path=path)
    return info.st_size


def read_bounded(stream: BinaryIO, limit: int, name: str) -> bytes:
    """At most ``limit`` bytes from ``stream``; a one-line error if it holds more."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise BadInputError(
            "{name} holds more than {limit}; inputs over that are refused", name=name, limit=_mib(limit)
        )
    return data


def decode_text(data: bytes, name: str) -> str:
    if b"\0" in data[:8192]:
        raise BadInputError("{name} looks like a binary file, not text", name=name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError("{name} is not UTF-8 text (invalid byte at offset {at})", name=name, at=exc.start) from None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file, bounded (for ``--file``)."""
    check_regular_file(path)
    with Path(path).open("rb") as f:
        return decode_text(read_bounded(f, MAX_TEXT_BYTES, str(path)), str(path))


def _html_text(data: bytes) -> str:
    BeautifulSoup = require("bs4", "reading HTML").BeautifulSoup
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style"]):
        tag.decompose()
    return soup.get_text("\n")


def _pdf_text(data: bytes, name: str) -> str:
    PdfReader = require("pypdf", "reading PDF").PdfReader
    try:
        return "\n\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages)
    except Exception as exc:  # pypdf raises many kinds of errors for damaged files
        raise BadInputError("{name} is not a readable PDF ({why})", name=name, why=str(exc)[:200]) from exc


def clean_text(text: str) -> str:
    """Text as it is kept: without NUL characters (never content, and a mark in prompts built around a
    document) and with lone surrogates (a PDF's ToUnicode map, an HTML character reference) replaced, so
    it can be written as UTF-8."""
    return text.replace("\x00", "").encode("utf-8", errors="replace").decode("utf-8")


def document_text(data: bytes, suffix: str, name: str) -> str:
    """The text of a document's bytes, read as ``suffix`` says (.pdf, .html, else UTF-8 text); errors name
    the document as ``name`` (the user's own name for it, never a temporary path)."""
    if suffix in PDF:
        text = _pdf_text(data, name)
    elif suffix in HTML:
        if b"\0" in data[:8192]:
            raise BadInputError("{name} looks like a binary file, not text", name=name)
        text = _html_text(data)
    else:
        text = decode_text(data, name)
    text = clean_text(text)
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise BadInputError("{name} holds more than {limit} of text; split it", name=name, limit=_mib(MAX_TEXT_BYTES))
    if not text.strip():
        raise BadInputError("{name} is empty", name=name)
    return text


def read_document(path: str | Path) -> str:
    """The text of a document, or a one-line error saying what is wrong with the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    check_regular_file(path, MAX_FILE_BYTES if suffix in PDF | HTML else MAX_TEXT_BYTES, "document")
    with path.open("rb") as f:
        data = read_bounded(f, MAX_FILE_BYTES, str(path))
    return document_text(data, suffix, str(path))
