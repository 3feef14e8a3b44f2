"""The shared source of a replica in a fleet: Redis when it answers, the peers otherwise.

``FleetSource`` has the shape of ``edge.redis_tier.RedisTier`` that ``ReplicaStream`` and
``ObjectReader`` use (history, events, existence, objects, TTLs), so one replica serves a stream
produced anywhere: followed through Redis or through the ingesting edge's event log, its objects
read from memory, Redis, the owner, the ingesting edge, then the origin.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from edge.errors import Unavailable
from edge.fleet import Fleet
from edge.peer_api import decode_events_document, decode_history_document
from edge.redis_tier import RedisTier, StreamHistory, TierTimings
from origin.window import LiveSettings
from origin.wire import WireError

log = logging.getLogger("livedge.peer_fill")

RETRY_SECONDS = 0.5
FOLLOW_GRACE_SECONDS = 5.0  # past a heartbeat's due time, a followed peer counts as gone


def _position(entry_id: str) -> int:
    """Peer logs count entries with integers; a replica starts from Redis's ``0-0``."""
    head = entry_id.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


class PeerLinks(Protocol):
    """Where a replica's stream comes from: ``Fleet`` (gossip names the ingesting edge), or a
    worker's link to its own main process (edge/workers.py)."""

    def event_sources(self, stream: str) -> list[str]: ...

    async def get_json(self, base: str, path: str) -> dict | None: ...

    async def fetch_object(self, key: str) -> bytes | None: ...

    async def open_lines(self, base: str, path: str,
                         read_timeout: float) -> aiohttp.ClientResponse | None: ...


@dataclass
class _Following:
    """An event log followed on a peer: an open answer whose lines are read as they come."""

    base: str
    position: int  # the log id the next line starts after
    response: aiohttp.ClientResponse


class FleetSource:
    def __init__(self, fleet: Fleet | PeerLinks, timings: TierTimings,
                 redis: RedisTier | None = None) -> None:
        self._fleet = fleet
        self._redis = redis
        self.timings = timings
        self._via_peer: dict[str, str] = {}  # stream -> the peer whose log we follow
        self._following: dict[str, _Following] = {}

    @property
    def available(self) -> bool:
        return True  # peers or the origin may answer even when Redis does not

    async def wait_available(self) -> None:
        await asyncio.sleep(RETRY_SECONDS)

    def _redis_up(self) -> bool:
        return self._redis is not None and self._redis.available

    async def read_history(self, name: str) -> StreamHistory | None:
        if self._redis_up():
            try:
                history = await self._redis.read_history(name)
            except Unavailable:
                history = None
            if history is not None:
                self._via_peer.pop(name, None)
                self.stop_following(name)
                return history
        for base in self._fleet.event_sources(name):
            history = await self._peer_history(name, base)
            if history is not None:
                return history
        if not self._fleet.event_sources(name) and not self._redis_up() \
                and self._redis is not None:
            raise Unavailable("neither the shared cache nor a peer can say where this stream is")
        return None

    async def _peer_history(self, name: str, base: str) -> StreamHistory | None:
        try:
            document = await self._fleet.get_json(base, f"/fleet/streams/{name}/history")
        except (aiohttp.ClientError, asyncio.TimeoutError, Unavailable) as error:
            log.warning("history of %s from %s failed: %s", name, base, error)
            return None
        if document is None:
            return None
        try:
            settings, part_target, started_at, node, events, last_id = \
                decode_history_document(document)
        except (KeyError, ValueError, WireError) as error:
            log.warning("bad history of %s from %s: %s", name, base, error)
            return None
        self._via_peer[name] = base
        return StreamHistory(settings, part_target, started_at, node, tuple(events),
                             tuple(None for _ in events), str(last_id))

    async def read_events(self, name: str, after: str, block: float) -> tuple[str, list]:
        if name not in self._via_peer and self._redis_up():
            return await self._redis.read_events(name, after, block)
        sources = self._fleet.event_sources(name)
        if not sources:
            raise Unavailable("no peer ingests this stream any more")
        if sources[0] != self._via_peer.get(name):
            # Published elsewhere now: take that edge's whole log; the replica's gate skips what
            # it already has and resets if the numbers went back.
            history = await self._peer_history(name, sources[0])
            if history is None:
                raise Unavailable("the new ingesting edge has no log yet")
            return history.last_id, list(history.events)
        try:
            following = await self._follow(name, sources[0], _position(after), block)
            line = await following.response.content.readline()
            if not line:
                raise Unavailable("the ingesting edge ended the event log")
            last, events = decode_events_document(json.loads(line))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as error:
            self.stop_following(name)
            raise Unavailable(f"peer unreachable: {error}") from None
        except BaseException:  # Unavailable, or cancelled in the middle of a line
            self.stop_following(name)
            raise
        following.position = _position(last)
        return last, events

    async def _follow(self, name: str, base: str, position: int,
                      heartbeat: float) -> _Following:
        following = self._following.get(name)
        if following is not None and (following.base, following.position) == (base, position):
            return following
        self.stop_following(name)
        path = f"/fleet/streams/{name}/events?after={position}&wait={heartbeat:.3f}&follow=1"
        # A heartbeat line comes every ``heartbeat`` seconds: a longer silence is a dead peer.
        response = await self._fleet.open_lines(base, path, heartbeat + FOLLOW_GRACE_SECONDS)
        if response is None:
            raise Unavailable("the ingesting edge no longer has this stream")
        following = self._following[name] = _Following(base, position, response)
        return following

    def stop_following(self, name: str) -> None:
        following = self._following.pop(name, None)
        if following is not None:
            following.response.close()

    async def stream_exists(self, name: str) -> bool:
        if name not in self._via_peer and self._redis_up():
            return await self._redis.stream_exists(name)
        return bool(self._fleet.event_sources(name))

    async def get(self, key: str) -> bytes | None:
        if self._redis_up():
            try:
                data = await self._redis.get(key)
            except Unavailable:
                data = None
            if data is not None:
                return data
        return await self._fleet.fetch_object(key)

    @property
    def part_target(self) -> float:
        return self._redis.part_target if self._redis is not None else 0.0


def timings_for(settings: LiveSettings, dvr_seconds: float = 0.0) -> TierTimings:
    return TierTimings.for_window(settings, dvr_seconds, heartbeat_interval=1.0)
