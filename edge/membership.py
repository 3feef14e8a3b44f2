"""Fleet membership by gossip: SWIM with Lifeguard from kinship, behind a small interface of ours.

``Membership`` is all the rest of livedge sees: start, publish this edge's state, read the peer table,
be told when it changes, leave. ``GossipMembership`` implements it with kinship (encrypted and
authenticated packets with a shared key that can be rotated; push-pull sync; suspicion and
refutation), so a node without the key can neither join nor inject state.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import kinship

from edge.peers import PeerInfo, PeerTable, decode_meta, encode_meta

log = logging.getLogger("livedge.membership")


LAN_TIMINGS = {"probe_interval": 0.8, "probe_timeout": 0.4, "suspicion_mult": 3}


class Membership(Protocol):
    table: PeerTable

    async def start(self) -> None: ...

    async def publish(self, info: PeerInfo) -> None: ...

    def on_change(self, callback: Callable[[], None]) -> None: ...

    def stats(self) -> dict[str, object]: ...

    async def leave(self) -> None: ...


@dataclass(frozen=True)
class GossipSettings:
    name: str  # unique in the fleet (the pod or host name)
    bind: str  # host:port for gossip (TCP and UDP)
    advertise: str | None  # host:port peers reach us at, when it differs from bind
    seeds: tuple[str, ...]  # host:port, or a DNS name that resolves to many (headless service)
    keys: tuple[bytes, ...]  # 32-byte keys; the first encrypts, all decrypt (rotation)
    loopback: bool = False  # single-machine tests: faster timers, plaintext allowed on loopback


def decode_key(text: str) -> bytes:
    """A gossip key from its base64 form; exactly 32 bytes."""
    key = base64.b64decode(text.strip(), validate=True)
    if len(key) != 32:
        raise ValueError("a gossip key is 32 bytes, base64-encoded")
    return key


class GossipMembership:
    def __init__(self, settings: GossipSettings, local: PeerInfo) -> None:
        self.settings = settings
        self.table = PeerTable(settings.name)
        self.table.upsert(local)
        self._local = local
        self._callbacks: list[Callable[[], None]] = []
        self._cluster: kinship.Cluster | None = None
        self._events_task: asyncio.Task | None = None
        self.events_seen = 0
        # Counted from kinship's events: how often a peer was suspected, and declared dead
        # (a false death under packet loss shows here even between two reads of the table).
        self.suspicions_seen = 0
        self.deaths_seen = 0
        self._known: set[str] = set()  # every peer name seen, to report its tombstone state

    async def start(self) -> None:
        fields = dict(name=self.settings.name, bind=self.settings.bind,
                      seeds=list(self.settings.seeds), meta=encode_meta(self._local))
        if self.settings.advertise:
            fields["advertise"] = self.settings.advertise
        if self.settings.keys:
            fields["keys"] = [base64.b64encode(key).decode() for key in self.settings.keys]
        if self.settings.loopback:
            config = kinship.Config.local(**fields)
        else:
            # kinship's LAN preset declares a silent member dead ~6 s after it stops; a fleet
            # wants its viewers routed elsewhere within 5 s. A shorter probe and suspicion keep
            # Lifeguard's refutation and TCP fallback, so loss still causes no false deaths.
            config = kinship.Config.lan(**fields, **LAN_TIMINGS)
        self._cluster = kinship.Cluster(config)
        await self._cluster.start()
        self._events_task = asyncio.create_task(self._follow(), name="gossip-events")
        self._refresh()
        log.info("joined the fleet", extra={"peer": self.settings.name})

    async def publish(self, info: PeerInfo) -> None:
        """Gossip this edge's new state (address, load, draining, stream digest)."""
        self._local = info
        self.table.upsert(info)
        if self._cluster is not None:
            await self._cluster.set_meta(encode_meta(info))

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def stats(self) -> dict[str, object]:
        """Counts (``members`` and ``draining`` include suspects), the suspicions and deaths seen
        since start, and each known peer's state as kinship holds it now (alive, suspect, dead or
        left): which table entries are suspects, and why a peer is missing from the table."""
        peers = self.table.peers()
        states: dict[str, str] = {}
        if self._cluster is not None:
            for name in sorted(self._known):
                member = self._cluster.member(name)
                if member is not None:
                    states[name] = member.state.name.lower()
        return {"members": len(peers), "events": self.events_seen,
                "draining": sum(1 for peer in peers if peer.draining),
                "suspicions": self.suspicions_seen, "deaths": self.deaths_seen,
                "states": states}

    async def leave(self) -> None:
        if self._cluster is None:
            return
        with suppress(Exception):
            await self._cluster.leave(timeout=2.0)
        if self._events_task is not None:
            self._events_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._events_task
        await self._cluster.close()
        self._cluster = None

    async def _follow(self) -> None:
        assert self._cluster is not None
        async for event in self._cluster.events():
            self.events_seen += 1
            if isinstance(event, kinship.MemberSuspect):
                self.suspicions_seen += 1
            elif isinstance(event, kinship.MemberDead):
                self.deaths_seen += 1
            self._refresh()

    def _refresh(self) -> None:
        """Rebuild the table from the members kinship holds alive or suspect (events can be
        coalesced or lost under load; the member list is the truth).

        A suspect stays in the table until it is declared dead: under packet loss suspicions come
        and are refuted within a second, and dropping the peer each time would make its streams
        vanish from every other edge (viewers there would get 404s). It is routed around as if
        draining, so it is not chosen as an owner while it may be gone."""
        assert self._cluster is not None
        peers = [self._local]
        for member in self._cluster.members():
            if member.name == self.settings.name:
                continue
            self._known.add(member.name)
            if member.state not in (kinship.State.ALIVE, kinship.State.SUSPECT):
                continue
            info = decode_meta(member.name, member.meta)
            if info is None:
                continue
            if member.state is kinship.State.SUSPECT:
                info = replace(info, draining=True)
            peers.append(info)
        self.table.replace_all(peers)
        for callback in self._callbacks:
            callback()
