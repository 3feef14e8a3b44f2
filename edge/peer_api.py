"""The peer API: what one node serves of the streams it holds to other nodes (its fleet peers, and
its own HTTP workers, edge/workers.py): stream histories, event logs and objects.

An event log is read by long poll (one document an answer) or followed (``follow=1``): one
answer that stays open, a line (the same document) written the moment events are logged and a
heartbeat line when none came for ``wait`` seconds. Following leaves no gap between two polls,
so a follower never waits behind whatever the node does between answering one poll and reading
the next (bench.waiters: a worker's waiters 100-200 ms late when an audio part's answer
arrived just before a video part's wake).

Every request carries a credential (``X-Livedge-Fleet``: a short-lived HS256 token signed with a
shared secret), so an outside client cannot use it.
"""

from __future__ import annotations

import contextvars
import json
import time
from typing import Callable

import aiohttp
import jwt
from aiohttp import web

from edge.errors import NotFound, Unauthorized, Unavailable
from edge.eventlog import LocalEventLog
from edge.names import validate_rendition_name, validate_stream_name
from origin.live import StreamEnded
from origin.window import LiveSettings, StreamWindow
from origin.wire import WireError, decode_settings, encode_settings, pack_event, unpack_event

FLEET_HEADER = "X-Livedge-Fleet"
FLEET_AUDIENCE = "livedge-fleet"
HOP_HEADER = "X-Livedge-Hop"  # set on edge-to-edge object reads: never forwarded to a third edge
CREDENTIAL_TTL = 60.0
EVENT_LINES_TYPE = "application/x-ndjson"
MIN_HEARTBEAT_SECONDS = 0.5
OBJECT_NAME_MAX = 64

# True while serving a peer's object read that must not be forwarded to yet another edge.
direct_request = contextvars.ContextVar("livedge_fleet_direct", default=False)


class FleetCredential:
    def __init__(self, secret: bytes, node: str, audience: str = FLEET_AUDIENCE) -> None:
        self._secret = secret
        self._node = node
        self._audience = audience  # one per use, so that no token stands in for another's
        self._token: tuple[float, str] | None = None

    def token(self) -> str:
        now = time.time()
        if self._token is None or self._token[0] - now < CREDENTIAL_TTL / 2:
            expires = now + CREDENTIAL_TTL
            value = jwt.encode({"sub": self._node, "aud": self._audience, "exp": int(expires)},
                               self._secret, algorithm="HS256")
            self._token = (expires, value)
        return self._token[1]

    def verify(self, request: web.Request, header: str = FLEET_HEADER) -> str:
        """The calling edge's name; 401 without a valid fleet credential in ``header``."""
        value = request.headers.get(header)
        if not value:
            raise Unauthorized("the peer API needs a fleet credential")
        try:
            claims = jwt.decode(value, self._secret, algorithms=["HS256"],
                                audience=self._audience, leeway=5,
                                options={"require": ["exp", "aud"]})
        except jwt.PyJWTError:
            raise Unauthorized("invalid fleet credential") from None
        return str(claims.get("sub", ""))



class PeerApi:
    """The routes under ``/fleet/``; a request is served when any of ``credentials`` verifies it."""

    def __init__(self, name: str, streams: Callable[[str], StreamWindow | None],
                 event_log: LocalEventLog, digest: Callable[[], dict[str, int]],
                 credentials: list[FleetCredential]) -> None:
        self.name = name
        self._streams = streams
        self._event_log = event_log
        self._digest = digest
        self.credentials = credentials
        self.served_to_peers = 0
        self._closing = False

    def add_to(self, app: web.Application) -> None:
        app.on_shutdown.append(self._shutdown)
        app.router.add_get("/fleet/streams", self.list_streams)
        app.router.add_get("/fleet/streams/{stream}/history", self.history)
        app.router.add_get("/fleet/streams/{stream}/events", self.events)
        app.router.add_get("/fleet/objects/{stream}/{rendition}/{name}", self.object)

    async def _shutdown(self, app: web.Application) -> None:
        """Followed logs end and long polls answer now: aiohttp's shutdown waits for requests in
        flight, and a followed log would otherwise run until its stream ends."""
        self._closing = True
        self._event_log.wake_all()

    def verify(self, request: web.Request) -> str:
        """The caller's name; 401 unless one of the credentials verifies the request."""
        error: Unauthorized | None = None
        for credential in self.credentials:
            try:
                return credential.verify(request)
            except Unauthorized as refused:
                error = refused
        raise error or Unauthorized("the peer API needs a fleet credential")

    async def list_streams(self, request: web.Request) -> web.Response:
        self.verify(request)
        return web.json_response({"node": self.name, "streams": self._digest()})

    async def history(self, request: web.Request) -> web.Response:
        self.verify(request)
        name = validate_stream_name(request.match_info["stream"])
        history = self._event_log.history(name)
        if history is None:
            raise NotFound(f"stream {name} is not produced here")
        return web.json_response({
            "node": self.name, "started_at": history.started_at,
            "settings": encode_settings(history.settings, history.part_target),
            "events": [pack_event(event).decode() for event in history.events],
            "last_id": history.last_id})

    async def events(self, request: web.Request) -> web.Response:
        self.verify(request)
        name = validate_stream_name(request.match_info["stream"])
        try:
            after = int(request.query.get("after", "0"))
            wait = min(max(float(request.query.get("wait", "0")), 0.0), 10.0)
        except ValueError:
            raise NotFound("bad position") from None
        if request.query.get("follow") == "1":
            return await self._follow_events(request, name, after,
                                             max(wait, MIN_HEARTBEAT_SECONDS))
        answer = await self._event_log.events_after(name, after, wait)
        if answer is None:
            raise NotFound(f"stream {name} is not produced here")
        return web.json_response(_events_document(*answer))

    async def _follow_events(self, request: web.Request, name: str, after: int,
                             heartbeat: float) -> web.StreamResponse:
        """Lines of events until the stream's log is gone here or the follower leaves."""
        answer = await self._event_log.events_after(name, after, 0.0)
        if answer is None:
            raise NotFound(f"stream {name} is not produced here")
        response = web.StreamResponse(headers={"Content-Type": EVENT_LINES_TYPE,
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            while answer is not None:
                after, events = answer
                await response.write(json.dumps(_events_document(*answer)).encode() + b"\n")
                if self._closing or any(isinstance(event, StreamEnded) for event in events):
                    break
                answer = await self._event_log.events_after(name, after, heartbeat)
            await response.write_eof()
        except ConnectionError:
            pass  # the follower went away
        return response

    async def object(self, request: web.Request) -> web.Response:
        self.verify(request)
        name = validate_stream_name(request.match_info["stream"])
        rendition = validate_rendition_name(request.match_info["rendition"])
        object_name = request.match_info["name"]
        if len(object_name) > OBJECT_NAME_MAX or not object_name.isascii() \
                or "/" in object_name or ".." in object_name:
            raise NotFound("no such object")
        stream = self._streams(name)
        if stream is None:
            raise NotFound(f"stream {name} is not known here")
        # A peer asked us: our own miss goes straight to the ingesting edge or the origin.
        token = direct_request.set(bool(request.headers.get(HOP_HEADER)))
        try:
            data = await stream.fetch_object(rendition, object_name)
        finally:
            direct_request.reset(token)
        if data is None:
            raise NotFound("no such object")
        self.served_to_peers += 1
        return web.Response(body=data, content_type="application/octet-stream")


class PeerClient:
    """The reading side of the peer API, shared by ``Fleet`` (other edges) and a worker's link to
    its main process: requests carry ``credential``, over the session ``_http`` once started."""

    credential: FleetCredential
    _http: aiohttp.ClientSession | None

    def _headers(self) -> dict[str, str]:
        return {FLEET_HEADER: self.credential.token()}

    async def get_json(self, base: str, path: str) -> dict | None:
        """A peer API document; None for 404, Unavailable for any other failure status."""
        assert self._http is not None
        async with self._http.get(f"{base}{path}", headers=self._headers()) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise Unavailable(f"peer answered {response.status}")
            return await response.json()

    async def open_lines(self, base: str, path: str,
                         read_timeout: float) -> aiohttp.ClientResponse | None:
        """A peer API answer to read line by line (an event log followed); None for 404,
        Unavailable for any other failure status. The caller releases it."""
        assert self._http is not None
        response = await self._http.get(
            f"{base}{path}", headers=self._headers(), timeout=aiohttp.ClientTimeout(
                total=None, connect=5.0, sock_read=read_timeout))
        if response.status == 200:
            return response
        response.release()
        if response.status == 404:
            return None
        raise Unavailable(f"peer answered {response.status}")


def _events_document(last: int, events: list) -> dict:
    return {"last_id": last, "events": [pack_event(event).decode() for event in events]}


def decode_history_document(document: dict) -> tuple[LiveSettings, float, float, str, list, str]:
    settings, part_target = decode_settings(document["settings"])
    events = [unpack_event(text.encode()) for text in document["events"]]
    return (settings, part_target, float(document["started_at"]), str(document["node"]), events,
            str(document["last_id"]))


def decode_events_document(document: dict) -> tuple[str, list]:
    events = []
    for text in document["events"]:
        try:
            events.append(unpack_event(text.encode()))
        except WireError:
            continue
    return str(document["last_id"]), events

