"""The browser pages a node serves: a list of live streams, a publisher and a player.

=========================  ===================================================================
``/``                      live streams with links to their players (see "Listing" below)
``/publish``               camera, microphone or screen to a stream, over WHIP or, for networks
                           that block UDP, a WebSocket carrying MediaRecorder WebM
``/watch/{stream}``        hls.js in low-latency mode, quality choice, latency and stall readouts;
                           ``?token=`` is carried onto the playlist URL when playback needs tokens
``/api/config``            what the pages need to know about this node (JSON, no auth)
``/static/...``            the pages' CSS and JavaScript and the vendored hls.js (``edge/web/``)
=========================  ===================================================================

Listing: stream names are listed only when playback is open (``PLAYBACK_AUTH=open``). With play
tokens, a name may be all a viewer is meant not to know, so ``/`` then lists nothing and offers a
form for a name and a token instead.

Everything is served from the package (``edge/web/``, shipped as package data); no page loads
anything from another host, and the Content-Security-Policy sent with each page says so to the
browser too. The pages are plain HTML, CSS and JavaScript: nothing is built.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web

from edge.errors import NotFound
from edge.names import validate_stream_name
from origin.live import StreamStats

WEB_ROOT = Path(__file__).with_name("web")
STREAMS_MARK = "<!--streams-->"  # where the index page's stream list goes

# 'self' for everything; blob: for the media element's MediaSource URL and hls.js's worker, whose
# code hls.js turns into a blob; ws:/wss: because WebSocket ingest listens on a port of its own.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "media-src 'self' blob:",
    "worker-src 'self' blob:",
    "connect-src 'self' ws: wss:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # watch URLs may carry a play token
    "Cache-Control": "no-cache",
}


class LiveStreams(Protocol):
    def stream_stats(self) -> list[StreamStats]: ...


@dataclass(frozen=True)
class PageSettings:
    playback_auth: bool  # True: playback needs a play token, and stream names are not listed
    ws_port: int  # WebSocket ingest's port; 0 (any free port) cannot be told to a page


def _stream_list(streams: list[StreamStats]) -> str:
    """The ``<ul>`` of live streams on the index page; names are validated, escaped anyway."""
    live = sorted((stats for stats in streams if not stats.ended), key=lambda stats: stats.name)
    if not live:
        return '<p id="no-streams">Nothing is live on this node right now.</p>'
    items = []
    for stats in live:
        name = html.escape(stats.name)
        rungs = [r for r in stats.renditions if r.kind == "video"]
        rungs.sort(key=lambda r: r.height or 0, reverse=True)
        detail = " · ".join(html.escape(r.name) for r in rungs) or "starting"
        items.append(f'<li><a href="/watch/{name}">{name}</a> '
                     f'<span class="detail">{detail}</span></li>')
    return '<ul id="streams" class="streams">\n' + "\n".join(items) + "\n</ul>"


class WebRoutes:
    """The pages of one node; ``add_to(app)`` registers them."""

    def __init__(self, streams: LiveStreams, settings: PageSettings,
                 root: Path = WEB_ROOT) -> None:
        self._streams = streams
        self._settings = settings
        self._root = root

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/publish", self.publish)
        app.router.add_get("/watch/{stream}", self.watch)
        app.router.add_get("/api/config", self.config)
        app.router.add_get("/static/{path:.+}", self.static)

    def _page(self, name: str) -> str:
        # Read per request: a page is a few KiB, and an edited page shows without a restart.
        return (self._root / name).read_text(encoding="utf-8")

    async def index(self, request: web.Request) -> web.Response:
        page = self._page("index.html")
        if self._settings.playback_auth:
            listing = ('<p id="streams-private">Playback on this node needs a token, so live '
                       'streams are not listed. Open one by name below.</p>')
        else:
            listing = _stream_list(self._streams.stream_stats())
        return web.Response(text=page.replace(STREAMS_MARK, listing), content_type="text/html",
                            headers=PAGE_HEADERS)

    async def publish(self, request: web.Request) -> web.Response:
        return web.Response(text=self._page("publish.html"), content_type="text/html",
                            headers=PAGE_HEADERS)

    async def watch(self, request: web.Request) -> web.Response:
        validate_stream_name(request.match_info["stream"])  # 400 for names no stream can have
        return web.Response(text=self._page("watch.html"), content_type="text/html",
                            headers=PAGE_HEADERS)

    async def static(self, request: web.Request) -> web.FileResponse:
        """A file under the web root (CSS, JavaScript, the vendored hls.js and its licence);
        conditional requests get 304. Pages are only served through their routes."""
        relative = request.match_info["path"]
        root = self._root.resolve()
        try:
            path = (root / relative).resolve()
            found = path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # a NUL byte, a name longer than the file system allows
            found = False
        if not found or path.suffix == ".html" \
                or any(part.startswith(".") for part in path.relative_to(root).parts):
            raise NotFound("no such file")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def config(self, request: web.Request) -> web.Response:
        """``{"playback_auth": bool, "ws_port": int | null}``; ``ws_port`` is null when the
        WebSocket port is chosen at start (0) and so unknown here."""
        return web.json_response({
            "playback_auth": self._settings.playback_auth,
            "ws_port": self._settings.ws_port or None,
        }, headers={"Cache-Control": "no-cache"})
