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
import hashlib
import logging
from contextlib import suppress
from dataclasses import dataclass
from typing import Callable

import aiohttp
from aiohttp import web

from edge.eventlog import LocalEventLog
from edge.membership import GossipMembership, GossipSettings
from edge.peer_api import (FLEET_HEADER, HOP_HEADER, FleetCredential, PeerApi,  # noqa: F401
                           PeerClient, direct_request)
from edge.peers import PeerInfo, PeerTable
from origin.window import StreamWindow

log = logging.getLogger("livedge.fleet")

PUBLISH_INTERVAL = 0.5  # seconds between refreshes of this edge's gossiped state
PEER_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=2)

def fleet_secret(keys: tuple[bytes, ...], explicit: str | None = None) -> bytes:
    """The HMAC secret of edge-to-edge requests: ``FLEET_SECRET`` if set, else derived from the
    primary gossip key (so a fleet configures one secret)."""
    if explicit:
        return explicit.encode()
    if not keys:
        raise ValueError("a fleet needs GOSSIP_KEYS or FLEET_SECRET")
    return hashlib.sha256(b"livedge fleet credential\0" + keys[0]).digest()


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


class Fleet(PeerClient):
    """Membership plus the peer API and peer fill of one node (an edge or the origin)."""

    def __init__(self, settings: FleetSettings, streams: Callable[[str], StreamWindow | None],
                 event_log: LocalEventLog, local_digest: Callable[[], dict[str, int]],
                 draining: Callable[[], bool], load: Callable[[], float] = lambda: 0.0,
                 membership: GossipMembership | None = None) -> None:
        self.settings = settings
        self.name = settings.gossip.name
        self.credential = FleetCredential(settings.secret, self.name)
        self.api = PeerApi(self.name, streams, event_log, local_digest, [self.credential])
        self._digest = local_digest
        self._draining = draining
        self._load = load
        self.membership = membership or GossipMembership(settings.gossip, self._local_info())
        self.table: PeerTable = self.membership.table
        self._http: aiohttp.ClientSession | None = None
        self._publisher: asyncio.Task | None = None
        self.upstream_fetches = 0  # object GETs this node sent to another edge or the origin
        self.upstream_by_target: dict[str, int] = {}

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
                "served_to_peers": self.api.served_to_peers}

    # -- the peer API (served) -------------------------------------------------------------------
    def add_to(self, app: web.Application, authorize_admin: Callable[[web.Request], object]) -> None:
        self._authorize_admin = authorize_admin
        self.api.add_to(app)
        app.router.add_get("/api/cluster", self.cluster)

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
                                  "served_to_peers": self.api.served_to_peers})

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
        if not direct_request.get() and owner is not None and owner.name != self.name \
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

    def event_sources(self, stream: str) -> list[str]:
        return [url for url in (self.ingester_url(stream), self.origin_url()) if url]
