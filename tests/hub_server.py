"""A stand-in for the Hugging Face hub on 127.0.0.1: the file-listing and file endpoints huggingface-hub uses.

Serves ``GET /api/models/OWNER/NAME/tree/REV`` (the listing, with LFS sizes and SHA-256) and
``HEAD``/``GET /OWNER/NAME/resolve/REV/PATH`` (with X-Repo-Commit, ETag/X-Linked-Etag, Content-Length,
Accept-Ranges and Range support). Test knobs: cut a transfer after N bytes, fail every later transfer,
serve corrupt bytes, require a token (a gated repository).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, Path]
    token: str | None = None  # gated: requests need "Authorization: Bearer <token>"
    sha: dict[str, str] = field(default_factory=dict)

    def sha256(self, name: str) -> str:
        if name not in self.sha:
            self.sha[name] = hashlib.sha256(self.files[name].read_bytes()).hexdigest()
        return self.sha[name]


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` goes into HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_after: int | None = None  # cut the next file transfer after this many bytes
        self.fail_transfers = False  # answer every file GET with 500 (after a cut: leave a partial file)
        self.corrupt: set[str] = set()  # serve these files with one byte flipped
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, files: dict[str, Path], token: str | None = None) -> None:
        self.repos[repo] = Repo(files, token)

    def ranges(self) -> list[str]:
        return [r for method, path, r in self.requests if method == "GET" and r]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                self._route(head=False)

            def do_HEAD(self) -> None:
                self._route(head=True)

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    return self._tree(f"{parts[2]}/{parts[3]}")
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), head)
                self._error(404, "EntryNotFound", "no such endpoint")

            def _repo(self, name: str) -> Repo | None:
                repo = hub.repos.get(name)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {name} not found")
                    return None
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    self._error(401, "GatedRepo", f"Access to model {name} is restricted")
                    return None
                return repo

            def _tree(self, name: str) -> None:
                repo = self._repo(name)
                if repo is None:
                    return
                entries = [
                    {
                        "type": "file",
                        "oid": hashlib.sha1(path.encode()).hexdigest(),
                        "size": local.stat().st_size,
                        "path": path,
                        "lfs": {"oid": repo.sha256(path), "size": local.stat().st_size, "pointerSize": 134},
                    }
                    for path, local in repo.files.items()
                ]
                entries.append({"type": "file", "oid": "0" * 40, "size": 12, "path": "README.md"})
                body = json.dumps(entries).encode()
                self._send(200, {"Content-Type": "application/json"}, body)

            def _file(self, name: str, file: str, head: bool) -> None:
                repo = self._repo(name)
                if repo is None:
                    return
                if file not in repo.files:
                    self._error(404, "EntryNotFound", f"{file} does not exist")
                    return
                data = repo.files[file].read_bytes()
                sha = repo.sha256(file)
                if file in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                headers = {
                    "X-Repo-Commit": COMMIT,
                    "ETag": f'"{sha}"',
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                }
                if head:
                    self._send(200, {**headers, "Content-Length": str(len(data))}, b"", head=True)
                    return
                if hub.fail_transfers:
                    self._error(500, None, "transfer failed")
                    return
                start, status = 0, 200
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if hub.cut_after is not None:
                    cut, hub.cut_after = hub.cut_after, None
                    self.send_response(status)
                    for key, value in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self._send(status, headers, body)

            def _error(self, status: int, code: str | None, message: str) -> None:
                headers = {"Content-Type": "application/json", "X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, headers, json.dumps({"error": message}).encode())

            def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool = False) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        return Handler
