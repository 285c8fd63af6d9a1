"""The browser page: ``GET /`` (the chat page and the live view of the engine) and its static files
under ``/static/``, shipped in the package (no build step, no CDN: it works offline).

Neither needs the API key (the page asks for it and sends it with every API call it makes);
``GET /engine/state`` serves the live view's snapshot (``live_view.py``) and does need it.
"""

from __future__ import annotations

import pathlib

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from jaxpaged.server.context import context_of
from jaxpaged.server.errors import APIError

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere, and nothing else may frame it.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


async def engine_state(request: Request) -> Response:
    """The latest live-view snapshot of the engine (503 before the engine thread made one)."""
    view = context_of(request).engine.live_view
    snapshot = view.latest if view is not None else None
    if snapshot is None:
        raise APIError(503, "the engine thread has not described itself yet", code="not_ready")
    return JSONResponse(snapshot, headers={"cache-control": "no-store"})


def ui_routes() -> list[Route | Mount]:
    return [
        Route("/", index, methods=["GET"]),
        Route("/engine/state", engine_state, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
