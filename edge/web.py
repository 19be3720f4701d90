"""The browser face of the edge: the chat page (`/`), the operators' dashboard
(`/dashboard`), their static files (`/static/...`) and the dashboard's live feed
(`/api/dashboard/events`, SSE).

This module owns serving those files safely: only the files shipped in edge/static/ (read
once at start, no path from the request reaches the file system), each with its content
type and a Content-Security-Policy that allows scripts, styles and connections from this
origin only (no inline script or style, nothing from elsewhere, no framing). The pages need
no API key to load; what they call does (the chat routes with a client key, the admin
routes with the admin token, both sent as `Authorization: Bearer`, never in a URL).
See docs/operations.md "The chat page and the dashboard".
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from edge.dashboard_feed import DashboardFeed
from protocols.sse import PING, frame

STATIC = Path(__file__).parent / "static"

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # small files, changed by an upgrade: revalidate instead of serving a stale script
    "Cache-Control": "no-cache",
}


def load_static(folder: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) for every file of the folder with a known type."""
    files = {}
    for path in sorted(folder.iterdir()):
        kind = TYPES.get(path.suffix)
        if path.is_file() and kind is not None:
            files[path.name] = (path.read_bytes(), kind)
    return files


HISTORY_FRAME = 60  # samples per history frame (~80 KB)


class WebRoutes:
    def __init__(self, edge, files: dict[str, tuple[bytes, str]] | None = None):
        self.edge = edge
        self.files = files if files is not None else load_static()
        self.feed = DashboardFeed(edge)

    def _file(self, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            body = b'{"error": {"code": "not_found", "message": "no such file"}}'
            return Response(body, status_code=404, media_type="application/json", headers=SECURITY_HEADERS)
        content, kind = found
        return Response(content, media_type=kind, headers=SECURITY_HEADERS)

    async def chat_page(self, request: Request) -> Response:
        return self._file("chat.html")

    async def dashboard_page(self, request: Request) -> Response:
        return self._file("dashboard.html")

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    async def events(self, request: Request) -> Response:
        """The dashboard's feed: the kept history first, then one snapshot a second."""
        feed = self.feed
        queue = feed.subscribe()

        async def stream():
            try:
                yield PING
                # In frames of HISTORY_FRAME samples: the server writes the next frame only
                # once the client has read enough of the last, so a viewer that never reads
                # holds about one frame here, not the ten minutes (~800 KB) of one frame of all.
                snapshots = list(feed.history)
                for start in range(0, max(len(snapshots), 1), HISTORY_FRAME):
                    part = {"type": "history", "interval_s": feed.interval_s}
                    part["snapshots"] = snapshots[start : start + HISTORY_FRAME]
                    yield frame({**part, "append": True} if start else part)
                while True:
                    snapshot = await queue.get()
                    if snapshot is None:  # the gateway stops
                        yield frame(
                            {"type": "error", "code": "shutting_down", "message": "the gateway is shutting down"}
                        )
                        return
                    yield frame({"type": "snapshot", "snapshot": snapshot})
            finally:
                feed.unsubscribe(queue)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream; charset=utf-8", headers=headers)


def routes(edge) -> list[Route]:
    web = WebRoutes(edge)
    return [
        Route("/", web.chat_page, methods=["GET", "HEAD"]),
        Route("/dashboard", web.dashboard_page, methods=["GET", "HEAD"]),
        Route("/static/{name}", web.static, methods=["GET", "HEAD"]),
        Route("/api/dashboard/events", web.events, methods=["GET"]),
    ]
