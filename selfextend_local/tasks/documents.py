"""Reading documents: plain text and Markdown always; HTML and PDF with an optional library.

Every read is bounded: only regular files are opened (a FIFO would block, a device never ends), and a
file or stream larger than the limit is refused before any work, in one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..engine.errors import BadInputError
from ..extras import require

HTML = {".html", ".htm", ".xhtml"}
PDF = {".pdf"}
MAX_TEXT_BYTES = 16 << 20  # about 4M tokens: beyond what any SelfExtend setting reaches, even in parts
MAX_FILE_BYTES = 64 << 20  # HTML and PDF carry markup and fonts besides their text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def check_regular_file(path: str | Path, limit: int = MAX_TEXT_BYTES, what: str = "file") -> int:
    """The size of ``path``; a one-line error unless it is a regular file of at most ``limit`` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BadInputError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise BadInputError(f"{path} is a directory; pass a file")
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{path} is not a regular file (a FIFO, socket or device); pass a file")
    if info.st_size > limit:
        raise BadInputError(f"{path} is {info.st_size / (1 << 20):.1f} MiB; files over {_mib(limit)} are refused")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"cannot read {path}: permission denied")
    return info.st_size


def read_bounded(stream: BinaryIO, limit: int, name: str) -> bytes:
    """At most ``limit`` bytes from ``stream``; a one-line error if it holds more."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise BadInputError(f"{name} holds more than {_mib(limit)}; inputs over that are refused")
    return data


def decode_text(data: bytes, name: str) -> str:
    if b"\0" in data[:8192]:
        raise BadInputError(f"{name} looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{name} is not UTF-8 text (invalid byte at offset {exc.start})") from None


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


def _pdf_text(path: Path) -> str:
    PdfReader = require("pypdf", "reading PDF").PdfReader
    try:
        return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except Exception as exc:  # pypdf raises many kinds of errors for damaged files
        raise BadInputError(f"{path} is not a readable PDF ({exc})") from exc


def read_document(path: str | Path) -> str:
    """The text of a document, or a one-line error saying what is wrong with the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    check_regular_file(path, MAX_FILE_BYTES if suffix in PDF | HTML else MAX_TEXT_BYTES, "document")
    if suffix in PDF:
        text = _pdf_text(path)
    else:
        with path.open("rb") as f:
            data = read_bounded(f, MAX_FILE_BYTES, str(path))
        if suffix in HTML:
            if b"\0" in data[:8192]:
                raise BadInputError(f"{path} looks like a binary file, not text")
            text = _html_text(data)
        else:
            text = decode_text(data, str(path))
    if len(text.encode("utf-8", errors="replace")) > MAX_TEXT_BYTES:
        raise BadInputError(f"{path} holds more than {_mib(MAX_TEXT_BYTES)} of text; split it")
    if not text.strip():
        raise BadInputError(f"{path} is empty")
    return text
