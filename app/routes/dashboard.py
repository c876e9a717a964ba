"""The web dashboard: GET / and its static files (plain HTML, CSS and native ES modules under
static/js/, main.js first, shipped in the package).

No build step and no CDN, so it works offline. The page talks only to the v1 REST API of the same
origin with the user's API key; this module serves files and nothing else (no auth needed to load
the page itself, every data call is authenticated by the API).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything the page needs comes from this origin; no inline script, no framing by other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with each release; revalidate so an upgrade is picked up at once.
    "Cache-Control": "no-cache",
}

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return _file(STATIC_DIR / "index.html")


@router.get("/static/{name:path}")
def static(name: str) -> FileResponse:
    path = (STATIC_DIR / name).resolve()
    # Only plain files inside static/, and only the kinds we ship (no traversal, no directory listing).
    if not path.is_relative_to(STATIC_DIR) or not path.is_file() or path.suffix not in MEDIA_TYPES:
        raise HTTPException(status_code=404, detail="not found")
    return _file(path)


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)
