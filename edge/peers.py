"""The fleet as one edge sees it: a pure table of peers and the small state each one gossips.

Each edge gossips its HTTP address, zone, load, draining flag and a compact digest of the streams it
ingests with their newest media sequence numbers. It fits the gossip metadata limit (512 bytes, as in
memberlist): when the digest would not fit, it is cut and flagged, and peers ask that edge over HTTP
for the rest. From the table every edge derives, for each live stream, the ingesting edge and an
owner chosen by rendezvous hashing over live, non-draining members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from kinship.rendezvous import owner as rendezvous_owner

META_LIMIT_BYTES = 512
_STREAMS_KEY = "s"


@dataclass(frozen=True)
class PeerInfo:
    name: str
    http: str  # base URL other edges use for peer fill, e.g. http://10.0.0.5:3000
    zone: str = ""
    load: float = 0.0  # 0 idle .. 1 saturated
    draining: bool = False
    streams: Mapping[str, int] = field(default_factory=dict)  # ingested stream -> newest MSN
    streams_truncated: bool = False  # the digest did not fit: ask the peer for the rest
    origin: bool = False  # the origin role: a shield and directory, never an owner or ingester


def _size(meta: Mapping[str, str]) -> int:
    return sum(len(key.encode()) + len(value.encode()) for key, value in meta.items())


def encode_meta(info: PeerInfo, limit: int = META_LIMIT_BYTES) -> dict[str, str]:
    """Gossip metadata for ``info`` within ``limit`` bytes; streams with the newest MSN go first
    only by name order, so the cut is stable from one update to the next."""
    meta = {"h": info.http, "z": info.zone, "l": f"{min(max(info.load, 0.0), 1.0):.2f}",
            "d": "1" if info.draining else "0"}
    if info.origin:
        meta["r"] = "o"
    entries = [f"{name}:{msn}" for name, msn in sorted(info.streams.items())]
    kept: list[str] = []
    for entry in entries:
        candidate = ",".join([*kept, entry])
        if _size({**meta, _STREAMS_KEY: candidate, "t": "1"}) > limit:
            meta["t"] = "1"
            break
        kept.append(entry)
    meta[_STREAMS_KEY] = ",".join(kept)
    if _size(meta) > limit:
        raise ValueError("peer address and zone alone exceed the gossip metadata limit")
    return meta


def decode_meta(name: str, meta: Mapping[str, str]) -> PeerInfo | None:
    """The peer described by ``meta``; None if it is not a livedge edge's metadata."""
    http = meta.get("h")
    if not http:
        return None
    streams: dict[str, int] = {}
    for entry in filter(None, meta.get(_STREAMS_KEY, "").split(",")):
        stream, _, msn = entry.rpartition(":")
        if stream and msn.isdigit():
            streams[stream] = int(msn)
    try:
        load = float(meta.get("l", "0"))
    except ValueError:
        load = 0.0
    return PeerInfo(name=name, http=http, zone=meta.get("z", ""), load=load,
                    draining=meta.get("d") == "1", streams=streams,
                    streams_truncated=meta.get("t") == "1", origin=meta.get("r") == "o")


class PeerTable:
    """Live peers (this edge included) and what they hold. Pure; fed by the membership layer."""

    def __init__(self, local_name: str) -> None:
        self.local_name = local_name
        self._peers: dict[str, PeerInfo] = {}

    def upsert(self, info: PeerInfo) -> None:
        self._peers[info.name] = info

    def remove(self, name: str) -> None:
        self._peers.pop(name, None)

    def replace_all(self, peers: Iterable[PeerInfo]) -> None:
        self._peers = {peer.name: peer for peer in peers}

    def peers(self) -> list[PeerInfo]:
        return sorted(self._peers.values(), key=lambda peer: peer.name)

    def get(self, name: str) -> PeerInfo | None:
        return self._peers.get(name)

    def ingester(self, stream: str) -> PeerInfo | None:
        """The edge that ingests ``stream`` (the newest MSN wins if two claim it mid-handover)."""
        holders = [peer for peer in self._peers.values() if stream in peer.streams]
        if not holders:
            return None
        return max(holders, key=lambda peer: (peer.streams[stream], peer.name))

    def owner(self, stream: str) -> PeerInfo | None:
        """The edge that fetches ``stream`` for the others: rendezvous over live, non-draining
        members, so every edge that sees the same members picks the same one."""
        candidates = [peer for peer in self._peers.values()
                      if not peer.draining and not peer.origin]
        if not candidates:
            return None
        return rendezvous_owner(stream, [_Named(peer) for peer in candidates]).peer

    def origin(self) -> PeerInfo | None:
        """The origin, if one is a member."""
        return next((peer for peer in self._peers.values() if peer.origin), None)

    def streams(self) -> dict[str, str]:
        """Every live stream the fleet gossips, with the name of its ingesting edge."""
        return {stream: peer.name for peer in self._peers.values() for stream in peer.streams
                if self.ingester(stream) is peer}


@dataclass(frozen=True)
class _Named:
    peer: PeerInfo

    @property
    def name(self) -> str:
        return self.peer.name
