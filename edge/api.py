"""The operator API and probes: ``/api/streams``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

from aiohttp import web

from edge.errors import BadRequest, NotFound
from edge.metrics import CONTENT_TYPE, Metrics
from edge.names import validate_stream_name
from edge.tokens import Claims, Scope
from origin.live import StreamStats


class NodeView(Protocol):
    def stream_stats(self) -> list[StreamStats]: ...

    def transcode_stats(self) -> dict[str, object]: ...

    def source_states(self) -> dict[str, dict[str, object]]: ...

    def viewers(self, stream: str) -> int: ...

    def readiness(self) -> tuple[bool, dict[str, object]]: ...

    async def add_pull(self, name: str, url: str) -> None: ...

    async def remove_stream(self, name: str) -> bool: ...


class ApiRoutes:
    def __init__(self, node: NodeView, metrics: Metrics,
                 authorize: Callable[[web.Request, Scope, str | None], Claims],
                 publishers: Callable[[], dict[str, object]] = dict,
                 metrics_need_admin: bool = False) -> None:
        self._node = node
        self._metrics = metrics
        self._authorize = authorize
        self._metrics_need_admin = metrics_need_admin  # METRICS_AUTH=admin
        self._publishers = publishers  # stream -> WebRTC publisher statistics (RTCP)

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/streams", self.list_streams)
        app.router.add_post("/api/streams", self.create_pull)
        app.router.add_delete("/api/streams/{stream}", self.delete_stream)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, details = self._node.readiness()
        return web.json_response({"ready": ready, **details}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics_need_admin:
            self._authorize(request, Scope.ADMIN, None)
        return web.Response(body=await self._metrics.render_node(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def list_streams(self, request: web.Request) -> web.Response:
        self._authorize(request, Scope.ADMIN, None)
        now = time.time()
        transcode = self._node.transcode_stats()
        sources = self._node.source_states()
        publishers = self._publishers()
        streams = []
        for stats in self._node.stream_stats():
            transcoder = transcode.get(stats.name)
            streams.append({
                "name": stats.name,
                "live": not stats.ended,
                "uptime_seconds": round(now - stats.started_at, 3),
                "viewers": self._node.viewers(stats.name),
                "parts_produced": stats.parts_produced,
                "source": sources.get(stats.name),
                "publisher": _plain(publishers.get(stats.name)),
                "transcode_realtime_factor": getattr(transcoder, "realtime_factor", None),
                "renditions": [{
                    "name": r.name, "kind": r.kind, "width": r.width, "height": r.height,
                    "frame_rate": r.frame_rate, "target_bitrate": r.target_bitrate,
                    "measured_bitrate": r.measured_bitrate, "last_msn": r.last_msn,
                    "last_part": r.last_part,
                } for r in stats.renditions],
            })
        return web.json_response({"streams": streams})

    async def create_pull(self, request: web.Request) -> web.Response:
        """Start pulling an FFmpeg-readable URL as a stream: ``{"name": ..., "url": ...}``."""
        self._authorize(request, Scope.ADMIN, None)
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("body must be JSON: {\"name\": ..., \"url\": ...}") from None
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise BadRequest("body must be JSON: {\"name\": ..., \"url\": ...}")
        name = validate_stream_name(body.get("name"))
        await self._node.add_pull(name, body["url"])
        return web.json_response({"name": name, "playlist": f"/hls/{name}/index.m3u8"},
                                 status=201)

    async def delete_stream(self, request: web.Request) -> web.Response:
        name = validate_stream_name(request.match_info["stream"])
        self._authorize(request, Scope.ADMIN, name)
        if not await self._node.remove_stream(name):
            raise NotFound(f"stream {name} is not live here")
        return web.Response(status=204)


def _plain(value: object) -> object:
    """A statistics dataclass as JSON-ready data (None stays None)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
