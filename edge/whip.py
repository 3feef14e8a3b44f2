"""WHIP (RFC 9725) over aiohttp: the HTTP side of WebRTC publishing.

``POST /whip/{stream}`` (an SDP offer, a publish token) creates a session resource
``/whip/{stream}/{session}`` and answers ``201 Created`` with the SDP answer, ``Location`` and a strong
``ETag``; ``DELETE`` on the resource ends the publish. The media side is ``ingest.webrtc``.

Choices the RFC leaves to the server:
- No trickle ICE and no ICE restart: ``PATCH`` on a session answers ``405 Method Not Allowed`` with an
  ``Allow`` header (RFC 9110 15.5.6: the resource does not support the method; the drafts' ``501`` was
  dropped after the HTTP directorate review, as 501 means no resource of the server supports it). The
  answer carries every candidate of ours, and a publisher's own candidates are learnt from its STUN
  checks (peer-reflexive), so publishers that trickle still connect.
- STUN/TURN servers (``ICE_SERVERS``) are advertised with ``Link: <url>; rel="ice-server"`` on the
  ``201`` and on ``OPTIONS`` requests that are not CORS preflights (RFC 9725 4.6 asks servers not to
  put them on preflights).
- An offer we cannot receive is ``400`` with a message naming the codecs we accept (RFC 9725 4.5 allows
  400 or 422), never a partial answer.
- The offer is checked before the publish slot is taken: a bad offer never evicts or blocks anyone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from edge.config import Settings
from edge.errors import (BadRequest, Conflict, NotFound, PayloadTooLarge, Unavailable,
                         UnsupportedMediaType)
from edge.names import validate_stream_name
from edge.publish import Publication, Publishing
from edge.tokens import Claims, Scope
from ingest.webrtc import (HANDSHAKE_TIMEOUT, IceServer, OfferRejected, PublisherStats,
                           WebRtcError, WebRtcPublisher, WebRtcSettings, inspect_offer)

log = logging.getLogger("livedge.whip")

SDP_TYPE = "application/sdp"
MAX_OFFER_BYTES = 64 * 1024  # browsers' offers are 3-10 KiB; FFmpeg caps its own at 8 KiB
HANDSHAKE_TIMEOUT_ENV = "LIVEDGE_WHIP_HANDSHAKE_TIMEOUT"  # seconds; tests shorten it
OFFER_READ_TIMEOUT = 15.0  # seconds for the whole offer body (HTTP_READ_TIMEOUT): no slow POSTs
ENDPOINT_METHODS = "OPTIONS, GET, HEAD, POST"
SESSION_METHODS = "OPTIONS, GET, HEAD, DELETE"

Authorize = Callable[[web.Request, Scope, str | None], Claims]


@dataclass(eq=False)
class WhipSession:
    """One WHIP session resource: the publication it holds and the peer connection feeding it."""

    stream: str
    publication: Publication
    publisher: WebRtcPublisher
    etag: str  # strong entity-tag of the ICE session, quotes included
    started: float  # time.time() of the 201
    ended: bool = False

    @property
    def session_id(self) -> str:
        return self.publication.session_id

    @property
    def location(self) -> str:
        return f"/whip/{self.stream}/{self.session_id}"


class WhipRoutes:
    """The ``/whip/...`` routes of one node and the sessions they created (``app[WHIP]``)."""

    def __init__(self, publishing: Publishing, authorize: Authorize, webrtc: WebRtcSettings, *,
                 max_offer_bytes: int = MAX_OFFER_BYTES,
                 read_timeout: float = OFFER_READ_TIMEOUT) -> None:
        self._publishing = publishing
        self._authorize = authorize
        self._webrtc = webrtc
        self._max_offer_bytes = max_offer_bytes
        self._read_timeout = read_timeout
        self._sessions: dict[str, WhipSession] = {}
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_settings(cls, settings: Settings, publishing: Publishing, authorize: Authorize,
                      environ: Mapping[str, str] = os.environ) -> WhipRoutes:
        """Routes configured from ``WEBRTC_HOSTS`` and ``ICE_SERVERS``; ``LIVEDGE_WHIP_HANDSHAKE_TIMEOUT``
        (seconds) overrides the ICE/DTLS handshake timeout. Raises ValueError naming a bad value."""
        timeout = HANDSHAKE_TIMEOUT
        raw = environ.get(HANDSHAKE_TIMEOUT_ENV, "").strip()
        if raw:
            try:
                timeout = float(raw)
            except ValueError:
                raise ValueError(f"{HANDSHAKE_TIMEOUT_ENV}={raw!r} is not a number") from None
            if not timeout > 0:
                raise ValueError(f"{HANDSHAKE_TIMEOUT_ENV} must be positive")
        servers = []
        for url in settings.ice_servers:
            if url.startswith("turn"):
                # Settings carry URLs only; a TURN server refuses allocations without credentials.
                log.warning("TURN server %s has no credentials: it is advertised to publishers "
                            "but this node does not allocate relays on it", url)
            servers.append(IceServer(url))
        webrtc = WebRtcSettings(hosts=tuple(settings.webrtc_hosts), ice_servers=tuple(servers),
                                handshake_timeout=timeout)
        return cls(publishing, authorize, webrtc, read_timeout=settings.http_read_timeout)

    def add_to(self, app: web.Application) -> None:
        app.router.add_route("OPTIONS", "/whip/{stream}", self.options_endpoint)
        app.router.add_get("/whip/{stream}", self.get_endpoint)
        app.router.add_post("/whip/{stream}", self.publish)
        app.router.add_route("OPTIONS", "/whip/{stream}/{session}", self.options_session)
        app.router.add_get("/whip/{stream}/{session}", self.get_session)
        app.router.add_delete("/whip/{stream}/{session}", self.delete_session)
        app.router.add_route("PATCH", "/whip/{stream}/{session}", self.patch_session)
        app.on_shutdown.append(self._shutdown)
        app[WHIP] = self

    # -- snapshots ---------------------------------------------------------------------------------

    def sessions(self) -> list[WhipSession]:
        return list(self._sessions.values())

    def stats(self) -> dict[str, PublisherStats]:
        """Publisher statistics (RTCP: bitrate, frame rate, loss, jitter) by stream name."""
        return {session.stream: session.publisher.stats() for session in self._sessions.values()}

    # -- the endpoint ------------------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        stream = validate_stream_name(request.match_info["stream"])
        claims = self._authorize(request, Scope.PUBLISH, stream)
        if request.content_type != SDP_TYPE:
            raise UnsupportedMediaType(f"send the offer as Content-Type: {SDP_TYPE}")
        offer = await self._read_offer(request)
        try:
            inspect_offer(offer)
        except OfferRejected as error:
            raise BadRequest(str(error)) from None
        publication = await self._publishing.begin(stream, claims, request.remote or "-", "whip")
        publisher = WebRtcPublisher(publication.transcoder, self._webrtc,
                                    label=f"{stream}/{publication.session_id}")
        try:
            answer = await publisher.answer(offer)
        except OfferRejected as error:
            await self._publishing.end(publication)
            raise BadRequest(str(error)) from None
        except WebRtcError as error:
            await self._publishing.end(publication)
            raise Unavailable(str(error)) from None
        except BaseException:
            await publisher.close("setting up the session failed")
            await self._publishing.end(publication)
            raise
        if publication.ended:  # taken over by another publisher while we were negotiating
            await publisher.close("taken over while being set up")
            raise Conflict(f"stream {stream} was taken over by another publisher")
        session = WhipSession(stream, publication, publisher, f'"{secrets.token_urlsafe(12)}"',
                              time.time())
        self._sessions[session.session_id] = session
        publisher.on_ended(lambda reason: self._spawn(self._ended(session, reason)))
        publication.on_evicted(lambda reason: self._evict(session, reason))
        log.info("whip session created for %s", request.remote,
                 extra={"stream": stream, "session": session.session_id})
        response = web.Response(status=201, body=answer.encode(), content_type=SDP_TYPE)
        response.headers["Location"] = session.location
        response.headers["ETag"] = session.etag
        self._add_ice_server_links(response)
        return response

    async def options_endpoint(self, request: web.Request) -> web.Response:
        response = web.Response(status=200, headers={"Accept-Post": SDP_TYPE,
                                                     "Allow": ENDPOINT_METHODS})
        if "Access-Control-Request-Method" not in request.headers:
            self._add_ice_server_links(response)
        return response

    async def get_endpoint(self, request: web.Request) -> web.Response:
        # RFC 9725 4.1: the resources have no representation; GET answers 2xx with no content.
        validate_stream_name(request.match_info["stream"])
        return web.Response(status=204)

    # -- the session resource ----------------------------------------------------------------------

    async def delete_session(self, request: web.Request) -> web.Response:
        stream = validate_stream_name(request.match_info["stream"])
        self._authorize(request, Scope.PUBLISH, stream)
        session = self._find(stream, request.match_info["session"])
        await session.publisher.close("the publisher deleted the session")
        # The session may have been ending already (its connection failed): keep the first reason.
        await self._ended(session, session.publisher.end_reason or "deleted")
        return web.Response(status=200)

    async def patch_session(self, request: web.Request) -> web.Response:
        stream = validate_stream_name(request.match_info["stream"])
        self._find(stream, request.match_info["session"])
        return web.json_response({"message": "trickle ICE and ICE restarts are not supported: the "
                                             "answer holds every candidate of this server"},
                                 status=405, headers={"Allow": SESSION_METHODS})

    async def options_session(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers={"Allow": SESSION_METHODS})

    async def get_session(self, request: web.Request) -> web.Response:
        stream = validate_stream_name(request.match_info["stream"])
        self._find(stream, request.match_info["session"])
        return web.Response(status=204)

    # -- internals ---------------------------------------------------------------------------------

    def _find(self, stream: str, session_id: str) -> WhipSession:
        session = self._sessions.get(session_id)
        if session is None or session.stream != stream:
            raise NotFound("no such WHIP session")
        return session

    async def _read_offer(self, request: web.Request) -> str:
        limit = self._max_offer_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the offer is larger than {limit} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(self._read_timeout):
                while chunk := await request.content.read(limit + 1 - len(body)):
                    body += chunk
                    if len(body) > limit:
                        raise PayloadTooLarge(f"the offer is larger than {limit} bytes")
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                reason=f"the offer did not arrive within {self._read_timeout:g} s") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the offer is not UTF-8 text") from None

    def _add_ice_server_links(self, response: web.StreamResponse) -> None:
        for server in self._webrtc.ice_servers:
            response.headers.add("Link", ice_server_link(server))

    def _evict(self, session: WhipSession, reason: str) -> None:
        # Publishing closes the transcoder right after this returns: stop feeding it first. The
        # resource is gone at once (its publication is), the peer connection closes in the background.
        session.publisher.detach()
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        self._spawn(session.publisher.close(f"evicted: {reason}"))

    async def _ended(self, session: WhipSession, reason: str) -> None:
        if session.ended:
            return
        session.ended = True
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        await self._publishing.end(session.publication)
        log.info("whip session ended after %.1f s: %s", time.time() - session.started, reason,
                 extra={"stream": session.stream, "session": session.session_id})

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self, app: web.Application) -> None:
        async def finish(session: WhipSession) -> None:
            await session.publisher.close("the node is shutting down")
            await self._ended(session, "the node is shutting down")

        await asyncio.gather(*(finish(session) for session in list(self._sessions.values())),
                             return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)


WHIP = web.AppKey("whip", WhipRoutes)


def ice_server_link(server: IceServer) -> str:
    """An RFC 9725 4.6 ``Link`` header value for one STUN/TURN server."""
    value = f'<{server.url}>; rel="ice-server"'
    if server.username is not None and server.credential is not None:
        value += (f'; username="{_quoted(server.username)}"; '
                  f'credential="{_quoted(server.credential)}"; credential-type="password"')
    return value


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
