"""HTTP serving of LL-HLS: playlists (with blocking reload and delta updates), init, parts, segments.

A thin aiohttp layer over ``origin.live.LiveStream``: parse and validate the request, wait when the
spec says to hold it, answer from the stream's shared renders and the object store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol
from urllib.parse import quote

from aiohttp import web

from edge.errors import BadRequest, NotFound, Unavailable
from edge.names import validate_rendition_name, validate_stream_name
from edge.tokens import Scope, TokenVerifier
from origin.live import ANY_RENDITION, LiveStream
from origin.rendition import Readiness, is_init_name

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
PLAYLIST_CACHE_CONTROL = "no-cache"
HLS_NUMBER_MAX = 2**53  # larger _HLS_msn/_HLS_part values are nonsense, not big numbers
OBJECT_NAME_MAX = 64
REPLICA_LOAD_WAIT = 2.0  # seconds a request may wait for a replica's first read of its log


class StreamLookup(Protocol):
    def live_stream(self, name: str) -> LiveStream | None: ...


@dataclass(frozen=True)
class HlsSettings:
    playback_auth: bool  # True: every request needs a play token (?token=)
    object_max_age: int  # seconds parts and segments may be cached by players and CDNs


@dataclass
class HlsCounters:
    """Read by the metrics collector at scrape time."""

    blocked_requests: int = 0  # playlist and object requests currently held
    blocked_total: int = 0
    block_timeouts: int = 0


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 16 or int(raw) > HLS_NUMBER_MAX:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


def _skip_param(query: Mapping[str, str]) -> bool:
    raw = query.get("_HLS_skip")
    if raw is None:
        return False
    if raw not in ("YES", "v2"):
        raise BadRequest("_HLS_skip must be YES or v2")
    return True


@dataclass(frozen=True)
class ReloadQuery:
    """The blocking-reload and delta-update parameters of a media playlist request."""

    msn: int | None
    part: int | None
    skip: bool

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> ReloadQuery:
        msn, part = _int_param(query, "_HLS_msn"), _int_param(query, "_HLS_part")
        skip = _skip_param(query)
        if part is not None and msn is None:
            raise BadRequest("_HLS_part needs _HLS_msn")
        return cls(msn, part, skip)


# The errors of held and missing requests, answered alike by aiohttp and the fast lane.
def no_such_object() -> NotFound:
    return NotFound("no such object")


def too_far() -> BadRequest:
    return BadRequest("_HLS_msn/_HLS_part is too far beyond the live edge")


def part_late() -> Unavailable:
    """RFC 8216bis 6.2.5.2: a blocked request not answered within three target durations."""
    return Unavailable("the requested part did not arrive in time")


def no_media_yet(stream: LiveStream) -> Unavailable:
    return Unavailable(f"stream {stream.name} has no media yet")


def first_media_timeout(stream: LiveStream) -> float:
    """How long a multivariant playlist request waits for a starting stream's first parts: a
    player that arrives as the publish starts waits for them, not a 404."""
    return 2 * stream.settings.segment_duration + 1.0


def object_name(name: str) -> str:
    """``name`` if it may name an object of a rendition; NotFound otherwise."""
    if len(name) > OBJECT_NAME_MAX or not name.isascii():
        raise no_such_object()
    return name


class HlsRoutes:
    """The ``/hls/...`` routes of one node."""

    def __init__(self, streams: StreamLookup, settings: HlsSettings,
                 verifier: Callable[[], TokenVerifier],
                 on_playlist: Callable[[str, str], None] | None = None) -> None:
        self._streams = streams
        self._settings = settings
        self._verifier = verifier
        self._on_playlist = on_playlist  # (stream, client) for each media playlist request
        self.counters = HlsCounters()

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/hls/{stream}/index.m3u8", self.multivariant)
        app.router.add_get("/hls/{stream}/{rendition}/index.m3u8", self.media_playlist)
        app.router.add_get("/hls/{stream}/{rendition}/{name}", self.media_object)

    # -- shared with the fast lane (edge/fastlane.py) ------------------------------------------------
    @property
    def settings(self) -> HlsSettings:
        return self._settings

    @property
    def object_cache_control(self) -> str:
        return f"public, max-age={self._settings.object_max_age}"

    def locate(self, stream_name: str, token: str | None) -> tuple[LiveStream, str]:
        """The live stream named in the URL and the query to carry onto listed URIs."""
        return self.locate_valid(validate_stream_name(stream_name), token)

    def locate_valid(self, name: str, token: str | None) -> tuple[LiveStream, str]:
        """``locate`` for a name that passed ``validate_stream_name`` before (a repeated
        request's)."""
        query = ""
        if self._settings.playback_auth:
            self._verifier().verify(token or "", Scope.PLAY, name)
            query = "token=" + quote(token or "", safe="")
        stream = self._streams.live_stream(name)
        if stream is None:
            raise NotFound(f"stream {name} is not live here")
        return stream, query

    @staticmethod
    def rendition_of(stream: LiveStream, rendition_name: str) -> str:
        rendition = validate_rendition_name(rendition_name)
        if not stream.has_rendition(rendition):
            raise NotFound(f"stream {stream.name} has no rendition {rendition}")
        return rendition

    def saw_playlist_request(self, stream: str, client: str) -> None:
        if self._on_playlist is not None:
            self._on_playlist(stream, client)

    # -- helpers ------------------------------------------------------------------------------------------
    async def _stream(self, request: web.Request) -> tuple[LiveStream, str]:
        """The stream and its carried query; a replica's first request waits for its log (a
        moment), rather than answering 503 while it is read."""
        stream, query = self.locate(request.match_info["stream"], request.query.get("token"))
        await stream.until_loaded(REPLICA_LOAD_WAIT)
        return stream, query

    def _rendition(self, request: web.Request, stream: LiveStream) -> str:
        return self.rendition_of(stream, request.match_info["rendition"])

    async def _hold(self, stream: LiveStream, rendition: str, ready: Callable[[], Readiness],
                    timeout: float) -> Readiness:
        """Wait until ``ready()`` is no longer WAIT, or ``timeout`` seconds pass."""
        state = ready()
        if state is not Readiness.WAIT:
            return state
        deadline = time.monotonic() + timeout
        self.counters.blocked_requests += 1
        self.counters.blocked_total += 1
        try:
            while state is Readiness.WAIT:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await stream.wait_changed(rendition, remaining):
                    self.counters.block_timeouts += 1
                    return state
                state = ready()
            return state
        finally:
            self.counters.blocked_requests -= 1

    # -- handlers -------------------------------------------------------------------------------------
    async def multivariant(self, request: web.Request) -> web.Response:
        stream, query = await self._stream(request)
        if not stream.is_ready():
            deadline = time.monotonic() + first_media_timeout(stream)
            while not stream.is_ready() and time.monotonic() < deadline:
                await stream.wait_changed(ANY_RENDITION, deadline - time.monotonic())
            if not stream.is_ready():
                raise no_media_yet(stream)
        return web.Response(text=stream.multivariant_playlist(query), content_type=PLAYLIST_TYPE,
                            headers={"Cache-Control": PLAYLIST_CACHE_CONTROL})

    async def media_playlist(self, request: web.Request) -> web.Response:
        stream, query = await self._stream(request)
        rendition = self._rendition(request, stream)
        self.saw_playlist_request(stream.name,
                                  f"{request.remote}|{request.headers.get('User-Agent')}")
        reload = ReloadQuery.parse(request.query)
        msn, part = reload.msn, reload.part
        if msn is not None:
            # RFC 8216bis 6.2.5.2: hold up to three target durations, then 503.
            timeout = 3.0 * stream.settings.target_duration
            state = await self._hold(stream, rendition,
                                     lambda: stream.readiness(rendition, msn, part), timeout)
            if state is Readiness.TOO_FAR:
                raise too_far()
            if state is Readiness.WAIT:
                raise part_late()
        return web.Response(text=stream.media_playlist(rendition, reload.skip, query),
                            content_type=PLAYLIST_TYPE,
                            headers={"Cache-Control": PLAYLIST_CACHE_CONTROL})

    async def media_object(self, request: web.Request) -> web.Response:
        stream, _ = await self._stream(request)
        rendition = self._rendition(request, stream)
        name = object_name(request.match_info["name"])
        kind = stream.tracks[rendition].kind.value
        headers = {"Cache-Control": self.object_cache_control}
        if is_init_name(name):
            # Only an init segment the window needs: any other name would be a read of every
            # lower tier (Redis, peers, the origin) for nothing.
            data = await stream.fetch_object(rendition, name) \
                if stream.object_state(rendition, name) is Readiness.READY else None
        elif name.endswith(".m4s"):
            # A preload-hinted part (or the segment being produced) is held and sent whole.
            state = await self._hold(stream, rendition, lambda: stream.object_state(rendition, name),
                                     3.0 * stream.settings.target_duration)
            if state is Readiness.WAIT:
                raise part_late()
            data = await stream.fetch_object(rendition, name) if state is Readiness.READY \
                else None
        else:
            data = None
        if data is None:
            raise no_such_object()
        return web.Response(body=data, content_type=f"{kind}/mp4", headers=headers)

