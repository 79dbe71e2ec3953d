"""The web dashboard: ``GET /`` and its static files (HTML, CSS, JS modules) from ``service/dashboard/``.

These routes carry no key check: the files hold no data, only the page that asks for the key and then
calls the API with it (every data call goes through the normal auth). They are left out of the OpenAPI
schema, which describes the API, not the page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
# The page runs only its own files and talks only to this server; no other site may frame it (a
# framed cancel button could be clicked through a decoy page).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server serves its new page at once
}
# The only files served: what the folder holds at import time, by name (no paths, so nothing outside it).
ASSETS = {path.name: path for path in DASHBOARD_DIR.iterdir() if path.suffix in MEDIA_TYPES}

router = APIRouter(include_in_schema=False)


def _serve(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> FileResponse:
    return _serve(ASSETS["index.html"])


@router.api_route("/dashboard/{name}", methods=["GET", "HEAD"])
def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(404, f"the dashboard has no file {name!r}")
    return _serve(path)
