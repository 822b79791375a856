"""Reading documents: plain text and Markdown always; HTML and PDF with an optional library."""

from __future__ import annotations

from pathlib import Path

from .errors import BadInputError

HTML = {".html", ".htm", ".xhtml"}
PDF = {".pdf"}


def _need(package: str, kind: str) -> BadInputError:
    return BadInputError(
        f"reading {kind} needs the {package} package: pip install 'selfextend-local[docs]' "
        "(or convert the file to text)"
    )


def _html_text(data: bytes) -> str:
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        raise _need("beautifulsoup4", "HTML") from None
    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style"]):
        tag.decompose()
    return soup.get_text("\n")


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise _need("pypdf", "PDF") from None
    try:
        return "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except Exception as exc:  # pypdf raises many kinds of errors for damaged files
        raise BadInputError(f"{path} is not a readable PDF ({exc})") from exc


def read_document(path: str | Path) -> str:
    """The text of a document, or a one-line error saying what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"document not found: {path}")
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; pass a file")
    suffix = path.suffix.lower()
    if suffix in PDF:
        text = _pdf_text(path)
    else:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            raise BadInputError(f"{path} looks like a binary file, not text")
        if suffix in HTML:
            text = _html_text(data)
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise BadInputError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise BadInputError(f"{path} is empty")
    return text
