"""The page at ``/``: a chat, and long documents dropped in, read with a progress bar, and asked about.

Static files inside the package (``selfextend_local/web``): no CDN, no build step, nothing fetched from
elsewhere (the page's Content-Security-Policy allows only this server). The page itself is served without
the API key; it asks for the key, and every call it makes carries it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .http import APIError

FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _file(name: str) -> bytes:
    return resources.files("selfextend_local").joinpath("web", name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_file(name), media_type=f"{FILES[name]}; charset=utf-8", headers=HEADERS)


router = APIRouter()


@router.get("/")
async def index() -> Response:
    return _serve("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in FILES or name == "index.html":
        raise APIError(404, f"no file {name!r}", code="not_found")
    return _serve(name)
