"""Helpers for the tests and the measurement scripts: a free port, a real server in a subprocess, files.

One copy of each, so a test and a benchmark start the server the same way. Uses httpx (the ``[test]``
extra), imported only when a server is started.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "selfextend_local.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout: float = 120, quiet: bool = False) -> tuple[subprocess.Popen, str]:
    """``selfextend-local serve ARGS`` on a free loopback port; returns the process and its base URL once
    ``/health`` answers. Raises RuntimeError with the server's output if it exits or never answers."""
    import httpx

    port = free_port()
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), *args], stdout=output, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    said = proc.communicate()[0] if not quiet else ""
    raise RuntimeError(f"the server did not start: {said}")


def stop_server(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def make_text_files(folder: Path, n: int = 4, chars: int = 1500, offset: int = 0) -> list[Path]:
    """``n`` files of consecutive ``chars``-character slices of the pinned pydoc text."""
    from .tasks.corpus import pydoc_text

    text = pydoc_text()
    files = []
    for i in range(n):
        path = folder / f"doc{i}.txt"
        start = offset + i * chars
        path.write_text(text[start : start + chars])
        files.append(path)
    return files


def tiny_pdf(text: str, to_unicode: str | None = None) -> bytes:
    """A one-page PDF showing ``text`` (ASCII) in Helvetica; ``to_unicode``: the UTF-16 hex its font's
    ToUnicode map gives the first character code (the others follow), as a damaged or hostile PDF may."""
    content = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    font = b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica" + (b"/ToUnicode 6 0 R" if to_unicode else b"") + b">>"
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 300 100]/Contents 4 0 R/Resources<</Font<</F1 5 0 R>>>>>>",
        b"<</Length %d>>stream\n" % len(content) + content + b"\nendstream",
        font,
    ]
    if to_unicode:
        cmap = (
            "/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /X def 1 begincodespacerange "
            f"<00> <FF> endcodespacerange 1 beginbfrange <00> <FF> <{to_unicode}> endbfrange endcmap "
            "CMapName currentdict /CMap defineresource pop end end"
        ).encode()
        objects.append(b"<</Length %d>>stream\n" % len(cmap) + cmap + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
