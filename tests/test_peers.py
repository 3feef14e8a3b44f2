"""The pure peer table: gossip metadata within its limit, ingesting edge, rendezvous owner."""

from __future__ import annotations

import pytest

from edge.peers import META_LIMIT_BYTES, PeerInfo, PeerTable, decode_meta, encode_meta


def peer(name: str, streams=None, draining=False) -> PeerInfo:
    return PeerInfo(name=name, http=f"http://{name}:3000", zone="a", load=0.25, draining=draining,
                    streams=streams or {})


@pytest.mark.parametrize("info", [
    peer("edge-1"),
    peer("edge-2", {"cam-1": 12, "studio.main": 0}, draining=True),
    PeerInfo("e", "http://[::1]:3000", zone="eu-west-1b", load=1.0, streams={"x": 2**40}),
    PeerInfo("origin", "http://origin:3000", origin=True),
])
def test_metadata_round_trips(info):
    assert decode_meta(info.name, encode_meta(info)) == info


def test_a_digest_too_big_for_gossip_is_cut_and_flagged():
    many = {f"stream-with-a-longish-name-{i:03d}": 100_000 + i for i in range(60)}
    meta = encode_meta(peer("edge-1", many))
    assert sum(len(k) + len(v) for k, v in meta.items()) <= META_LIMIT_BYTES
    decoded = decode_meta("edge-1", meta)
    assert decoded.streams_truncated
    assert 0 < len(decoded.streams) < 60
    assert all(many[name] == msn for name, msn in decoded.streams.items())


@pytest.mark.parametrize("meta", [{}, {"z": "a"}, {"h": ""}])
def test_metadata_of_something_else_is_ignored(meta):
    assert decode_meta("x", meta) is None


def test_garbage_digest_entries_are_skipped():
    decoded = decode_meta("x", {"h": "http://x", "s": "a:1,b:zz,:3,c:,d:4", "l": "lots"})
    assert decoded.streams == {"a": 1, "d": 4} and decoded.load == 0.0


def test_ingester_is_the_peer_that_gossips_the_stream():
    table = PeerTable("edge-1")
    table.upsert(peer("edge-1"))
    table.upsert(peer("edge-2", {"cam": 5}))
    table.upsert(peer("edge-3", {"cam": 7}))  # a republish elsewhere, further along
    assert table.ingester("cam").name == "edge-3"
    assert table.ingester("nope") is None
    assert table.streams() == {"cam": "edge-3"}


def test_owner_is_stable_and_skips_draining_members():
    table = PeerTable("edge-1")
    for name in ("edge-1", "edge-2", "edge-3"):
        table.upsert(peer(name))
    owners = {f"s{i}": table.owner(f"s{i}").name for i in range(60)}
    assert set(owners.values()) == {"edge-1", "edge-2", "edge-3"}  # spread over all
    other = PeerTable("edge-2")
    for info in reversed(table.peers()):
        other.upsert(info)
    assert {s: other.owner(s).name for s in owners} == owners  # same view, same owners
    table.upsert(peer("edge-2", draining=True))
    moved = {s for s in owners if table.owner(s).name != owners[s]}
    assert moved == {s for s, name in owners.items() if name == "edge-2"}  # only its keys move


def test_the_origin_is_never_an_owner():
    table = PeerTable("edge-1")
    table.upsert(peer("edge-1"))
    table.upsert(PeerInfo("origin", "http://origin:3000", origin=True))
    assert {table.owner(f"s{i}").name for i in range(40)} == {"edge-1"}
    assert table.origin().name == "origin"
