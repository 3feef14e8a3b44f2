"""The fleet: gossip membership, this edge's published state, the peer API, and peer fill.

Each edge gossips a small state (``edge.peers.PeerInfo``); the peer table names, for every live stream,
the edge that ingests it and an owner chosen by rendezvous hashing. A miss on a stream produced
elsewhere goes: memory, Redis (when configured), then the owner (whose own miss is the one fetch that
reaches the ingesting edge), then the ingesting edge, then the origin. Requests between edges carry a
fleet credential (a short-lived token signed with a key derived from the gossip key), so an outside
client cannot use the peer API.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Callable

import aiohttp
import jwt
from aiohttp import web

from edge.errors import NotFound, Unauthorized, Unavailable
from edge.eventlog import LocalEventLog
from edge.membership import GossipMembership, GossipSettings
from edge.names import validate_rendition_name, validate_stream_name
from edge.peers import PeerInfo, PeerTable
from origin.window import LiveSettings, StreamWindow
from origin.wire import WireError, decode_settings, encode_settings, pack_event, unpack_event

log = logging.getLogger("livedge.fleet")

FLEET_HEADER = "X-Livedge-Fleet"
HOP_HEADER = "X-Livedge-Hop"  # set on edge-to-edge object reads: never forwarded to a third edge
CREDENTIAL_TTL = 60.0
PUBLISH_INTERVAL = 0.5  # seconds between refreshes of this edge's gossiped state
PEER_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=2)
LONG_POLL_SECONDS = 1.0
OBJECT_NAME_MAX = 64

_direct = contextvars.ContextVar("livedge_fleet_direct", default=False)


# -- credentials ------------------------------------------------------------------------------------
def fleet_secret(keys: tuple[bytes, ...], explicit: str | None = None) -> bytes:
    """The HMAC secret of edge-to-edge requests: ``FLEET_SECRET`` if set, else derived from the
    primary gossip key (so a fleet configures one secret)."""
    if explicit:
        return explicit.encode()
    if not keys:
        raise ValueError("a fleet needs GOSSIP_KEYS or FLEET_SECRET")
    return hashlib.sha256(b"livedge fleet credential\0" + keys[0]).digest()


class FleetCredential:
    def __init__(self, secret: bytes, node: str) -> None:
        self._secret = secret
        self._node = node
        self._token: tuple[float, str] | None = None

    def token(self) -> str:
        now = time.time()
        if self._token is None or self._token[0] - now < CREDENTIAL_TTL / 2:
            expires = now + CREDENTIAL_TTL
            value = jwt.encode({"sub": self._node, "aud": "livedge-fleet", "exp": int(expires)},
                               self._secret, algorithm="HS256")
            self._token = (expires, value)
        return self._token[1]

    def verify(self, request: web.Request) -> str:
        """The calling edge's name; 401 without a valid fleet credential."""
        value = request.headers.get(FLEET_HEADER)
        if not value:
            raise Unauthorized("the peer API needs a fleet credential")
        try:
            claims = jwt.decode(value, self._secret, algorithms=["HS256"],
                                audience="livedge-fleet", leeway=5)
        except jwt.PyJWTError:
            raise Unauthorized("invalid fleet credential") from None
        return str(claims.get("sub", ""))


# -- what this node serves to peers --------------------------------------------------------------------
class Streams:
    """What the fleet API needs from the node: local windows and replicas (any tier)."""

    def __init__(self, lookup: Callable[[str], StreamWindow | None]) -> None:
        self.lookup = lookup


@dataclass(frozen=True)
class FleetSettings:
    gossip: GossipSettings
    http_url: str  # how peers reach this node's HTTP server
    zone: str
    origin_url: str | None
    secret: bytes
    origin_role: bool = False  # this node is the origin


class Fleet:
    """Membership plus the peer API and peer fill of one node (an edge or the origin)."""

    def __init__(self, settings: FleetSettings, streams: Callable[[str], StreamWindow | None],
                 event_log: LocalEventLog, local_digest: Callable[[], dict[str, int]],
                 draining: Callable[[], bool], load: Callable[[], float] = lambda: 0.0,
                 membership: GossipMembership | None = None) -> None:
        self.settings = settings
        self.name = settings.gossip.name
        self.credential = FleetCredential(settings.secret, self.name)
        self._streams = streams
        self._event_log = event_log
        self._digest = local_digest
        self._draining = draining
        self._load = load
        self.membership = membership or GossipMembership(settings.gossip, self._local_info())
        self.table: PeerTable = self.membership.table
        self._http: aiohttp.ClientSession | None = None
        self._publisher: asyncio.Task | None = None
        self.upstream_fetches = 0  # object GETs this node sent to another edge or the origin
        self.upstream_by_target: dict[str, int] = {}
        self.served_to_peers = 0

    def _local_info(self) -> PeerInfo:
        return PeerInfo(self.settings.gossip.name, self.settings.http_url, self.settings.zone,
                        self._load(), self._draining(), self._digest(),
                        origin=self.settings.origin_role)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=PEER_TIMEOUT)
        await self.membership.start()
        self._publisher = asyncio.create_task(self._publish_state(), name="fleet-state")

    async def leave(self) -> None:
        """Announce draining, leave the gossip (peers route around us at once), stop."""
        if self._publisher is not None:
            self._publisher.cancel()
            with suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
        with suppress(Exception):
            await self.membership.publish(self._local_info())
        await self.membership.leave()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _publish_state(self) -> None:
        last: PeerInfo | None = None
        while True:
            info = self._local_info()
            # Load changes every tick; gossip only what matters to routing, or load moves > 0.1.
            if last is None or (info.streams, info.draining) != (last.streams, last.draining) \
                    or abs(info.load - last.load) > 0.1:
                try:
                    await self.membership.publish(info)
                    last = info
                except Exception as error:  # a metadata refusal must not stop the loop
                    log.warning("gossip state not published: %s", error)
            await asyncio.sleep(PUBLISH_INTERVAL)

    def stats(self) -> dict[str, int]:
        return {"peers_alive": sum(1 for peer in self.table.peers() if peer.name != self.name),
                "upstream_fetches": self.upstream_fetches,
                "served_to_peers": self.served_to_peers}

    # -- the peer API (served) -------------------------------------------------------------------
    def add_to(self, app: web.Application, authorize_admin: Callable[[web.Request], object]) -> None:
        self._authorize_admin = authorize_admin
        app.router.add_get("/fleet/streams", self.list_streams)
        app.router.add_get("/fleet/streams/{stream}/history", self.history)
        app.router.add_get("/fleet/streams/{stream}/events", self.events)
        app.router.add_get("/fleet/objects/{stream}/{rendition}/{name}", self.object)
        app.router.add_get("/api/cluster", self.cluster)

    async def list_streams(self, request: web.Request) -> web.Response:
        self.credential.verify(request)
        return web.json_response({"node": self.name, "streams": self._digest()})

    async def history(self, request: web.Request) -> web.Response:
        self.credential.verify(request)
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
        self.credential.verify(request)
        name = validate_stream_name(request.match_info["stream"])
        try:
            after = int(request.query.get("after", "0"))
            wait = min(max(float(request.query.get("wait", "0")), 0.0), 10.0)
        except ValueError:
            raise NotFound("bad position") from None
        answer = await self._event_log.events_after(name, after, wait)
        if answer is None:
            raise NotFound(f"stream {name} is not produced here")
        last, events = answer
        return web.json_response({"last_id": last,
                                  "events": [pack_event(event).decode() for event in events]})

    async def object(self, request: web.Request) -> web.Response:
        self.credential.verify(request)
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
        token = _direct.set(bool(request.headers.get(HOP_HEADER)))
        try:
            data = await stream.fetch_object(rendition, object_name)
        finally:
            _direct.reset(token)
        if data is None:
            raise NotFound("no such object")
        self.served_to_peers += 1
        return web.Response(body=data, content_type="application/octet-stream")

    async def cluster(self, request: web.Request) -> web.Response:
        self._authorize_admin(request)
        members = [{"name": peer.name, "http": peer.http, "zone": peer.zone, "load": peer.load,
                    "draining": peer.draining, "streams": dict(peer.streams),
                    "streams_truncated": peer.streams_truncated, "origin": peer.origin,
                    "self": peer.name == self.name}
                   for peer in self.table.peers()]
        return web.json_response({"node": self.name, "members": members,
                                  "streams": self.table.streams(),
                                  "membership": self.membership.stats(),
                                  "upstream_fetches": self.upstream_fetches,
                                  "served_to_peers": self.served_to_peers})

    # -- peer fill (client) ---------------------------------------------------------------------
    def _headers(self, hop: bool = False) -> dict[str, str]:
        headers = {FLEET_HEADER: self.credential.token()}
        if hop:
            headers[HOP_HEADER] = "1"
        return headers

    def ingester_url(self, stream: str) -> str | None:
        peer = self.table.ingester(stream)
        if peer is not None and peer.name != self.name:
            return peer.http
        return None

    def object_sources(self, stream: str) -> list[tuple[str, bool]]:
        """(base URL, hop) in the order a miss tries them: the owner (if another edge and this
        request did not come from a peer), the ingesting edge, the origin."""
        sources: list[tuple[str, bool]] = []
        ingester = self.ingester_url(stream)
        owner = self.table.owner(stream)
        if not _direct.get() and owner is not None and owner.name != self.name \
                and owner.http != ingester:
            sources.append((owner.http, True))
        if ingester:
            sources.append((ingester, True))
        origin = self.origin_url()
        if origin:
            sources.append((origin, True))
        return sources

    def origin_url(self) -> str | None:
        """ORIGIN_URL, else the origin that gossip names; never this node itself."""
        if self.settings.origin_role:
            return None
        if self.settings.origin_url:
            return self.settings.origin_url.rstrip("/")
        origin = self.table.origin()
        return origin.http.rstrip("/") if origin is not None else None

    async def fetch_object(self, key: str) -> bytes | None:
        stream, rendition, name = key.split("/", 2)
        assert self._http is not None
        for base, hop in self.object_sources(stream):
            url = f"{base}/fleet/objects/{stream}/{rendition}/{name}"
            try:
                async with self._http.get(url, headers=self._headers(hop)) as response:
                    self.upstream_fetches += 1
                    self.upstream_by_target[base] = self.upstream_by_target.get(base, 0) + 1
                    if response.status == 200:
                        return await response.read()
                    if response.status == 404:
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                log.warning("peer fill from %s failed: %s", base, error)
        return None

    async def get_json(self, base: str, path: str) -> dict | None:
        assert self._http is not None
        async with self._http.get(f"{base}{path}", headers=self._headers()) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise Unavailable(f"peer answered {response.status}")
            return await response.json()

    def event_sources(self, stream: str) -> list[str]:
        return [url for url in (self.ingester_url(stream), self.origin_url()) if url]


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

