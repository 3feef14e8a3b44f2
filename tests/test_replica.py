"""Replicas: the event gate, restart resume of a LiveStream, a replica following a real stream
through a real Redis (wake-ups, coalescing, outages), and a second node playing a live stream."""

from __future__ import annotations

import asyncio
import io
import json
import re
import statistics
import time

import aiohttp
import av
import pytest
import redis.asyncio as aioredis

from edge.cache import MemoryCache
from edge.errors import NotFound, Unavailable
from edge.redis_tier import RedisConfig, RedisTier, connect
from edge.replica import (EventGate, LocalResumer, ObjectReader, ReplicaDirectory, ReplicaState,
                          Verdict)
from origin.live import (LiveSettings, LiveStream, StreamEnded, TrackDeclared, object_key,
                         replayable_window)
from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.rendition import Readiness
from origin.wire import decode_event, encode_event
from tests.nodes import running_node, scrape
from tests.redis_server import RedisServer, redis_server
from tests.test_fastlane import Http, play_parts, wait_for_demo
from tests.test_live import encode_video

pytestmark = pytest.mark.timeout(60)

SETTINGS = LiveSettings(segment_duration=1.0, part_duration=0.25, window_segments=4)


def opened(msn, track="v"):
    return SegmentOpened(track, msn, 1e9 + msn, False)


def part(msn, index, track="v"):
    return PartReady(track, msn, index, 0.25, index == 0, b"")


def ready(msn, parts, track="v"):
    return SegmentReady(track, msn, 0.25 * parts, parts, 100, b"")


A, S, R = Verdict.APPLY, Verdict.SKIP, Verdict.RESET


@pytest.mark.parametrize("events, verdicts", [
    # In order: everything applies.
    ([opened(0), part(0, 0), part(0, 1), ready(0, 2), opened(1)], [A, A, A, A, A]),
    # A log trimmed from the front: the segment in progress is skipped until the next opens.
    ([part(3, 2), ready(3, 3), opened(4), part(4, 0)], [S, S, A, A]),
    # A retried write: duplicates are skipped.
    ([opened(0), part(0, 0), opened(0), part(0, 0), part(0, 1), ready(0, 2), ready(0, 2)],
     [A, A, S, S, A, A, S]),
    # A dropped part: the rest of that segment is skipped, the next segment applies.
    ([opened(0), part(0, 0), part(0, 2), ready(0, 3), opened(1), part(1, 0)], [A, A, S, S, A, A]),
    # A dropped opening: its parts are skipped.
    ([opened(0), part(0, 0), ready(0, 1), part(1, 0), ready(1, 1), opened(2)], [A, A, A, S, S, A]),
    # Numbers going back: the stream was started over under the same name.
    ([opened(5), part(5, 0), opened(0)], [A, A, R]),
    # Events after the end: a new stream.
    ([opened(0), StreamEnded(), StreamEnded(), opened(1)], [A, A, S, R]),
    # Tracks are independent.
    ([opened(0, "a"), opened(0, "b"), part(0, 0, "b"), part(0, 0, "a")], [A, A, A, A]),
])
def test_event_gate(events, verdicts):
    gate = EventGate()
    assert [gate.admit(event) for event in events] == verdicts


def test_replayable_window_keeps_whole_segments_only():
    declared = TrackDeclared.__new__(TrackDeclared)
    object.__setattr__(declared, "track", None)
    object.__setattr__(declared, "init_segment", b"")
    history = [part(2, 1), ready(2, 2),  # trimmed front
               opened(3), part(3, 0), ready(3, 1),
               opened(4), part(4, 0), part(4, 2), ready(4, 3),  # a gap
               opened(5), part(5, 0), part(5, 1), ready(5, 2),
               declared,
               opened(6), part(6, 0)]  # still open
    assert list(replayable_window(history)) == [
        declared, opened(3), part(3, 0), ready(3, 1), opened(5), part(5, 0), part(5, 1),
        ready(5, 2)]


# -- LiveStream.resume -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video():
    return encode_video(4.2)


def as_replayed(events):
    """What a log gives back: the events without their media bytes."""
    return [decode_event(encode_event(event)) for event in events]


def produce(video, seconds_of_samples: int, name: str = "cam"):
    track, samples = video
    store = MemoryCache(max_bytes=32 * 2**20)
    stream = LiveStream(name, SETTINGS, store, clock=lambda: 1e9)
    told = []
    stream.listeners.append(lambda _, event: told.append(event))
    stream.add_track(track)
    for sample in samples[:seconds_of_samples * 30]:
        stream.add_sample(track.name, sample)
    return stream, store, told


async def test_a_resumed_stream_lists_the_old_window_and_continues_after_a_discontinuity(video):
    track, samples = video
    old, old_store, told = produce(video, 3)
    old.end()
    history = as_replayed([e for e in told if not isinstance(e, StreamEnded)])
    fetched = []

    async def fetch_missing(rendition, name):
        fetched.append(name)
        return old_store.get_now(object_key("cam", rendition, name))

    new = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20), clock=lambda: 2e9)
    told_new = []
    new.listeners.append(lambda _, event: told_new.append(event))
    new.add_track(track)
    new.hold()
    for sample in samples[:40]:
        new.add_sample(track.name, sample)
    assert not any(isinstance(e, SegmentOpened) for e in told_new)  # held
    assert new.resume(history, fetch_missing)
    first = next(e for e in told_new if isinstance(e, SegmentOpened))
    last_old = max(e.msn for e in told if isinstance(e, SegmentReady))
    assert (first.msn, first.discontinuity) == (last_old + 1, True)
    assert all(e.msn > last_old for e in told_new if hasattr(e, "msn"))
    playlist = new.media_playlist(track.name)
    assert f"seg{last_old}.m4s\n" in playlist
    assert re.search(rf"seg{last_old}\.m4s\n#EXT-X-DISCONTINUITY\n", playlist)
    # Objects listed before the restart come through the lower tiers.
    assert await new.fetch_object(track.name, f"seg{last_old}.m4s") == \
        old_store.get_now(object_key("cam", track.name, f"seg{last_old}.m4s"))
    assert fetched == [f"seg{last_old}.m4s"]
    assert new.samples_in == 40


def test_resume_is_refused_after_the_first_segment_and_continues_a_crashed_log(video):
    track, samples = video
    _, _, told = produce(video, 3)
    history = as_replayed(told)
    late = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20))
    told_late = []
    late.listeners.append(lambda _, event: told_late.append(event))
    late.add_track(track)
    for sample in samples[:10]:  # the first part is cut: its segment is open
        late.add_sample(track.name, sample)
    assert any(isinstance(e, SegmentOpened) for e in told_late)
    assert not late.resume(history)
    # A crash left a segment open: it is closed, numbering goes on after it (tests/test_live.py).
    crashed = list(history)
    while isinstance(crashed[-1], SegmentReady):
        crashed = crashed[:-1]
    fresh = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20))
    fresh.add_track(track)
    fresh.hold()
    fresh.add_sample(track.name, samples[0])
    assert fresh.resume(crashed + [part(99, 0, track.name)])
    assert fresh.samples_in == 1  # released
    assert not LiveStream("x", SETTINGS, MemoryCache(max_bytes=2**20)).resume([])


def test_holding_is_bounded(video):
    track, samples = video
    stream = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20))
    stream.add_track(track)
    stream.hold()
    from origin.live import HOLD_LIMIT
    for sample in (samples * 4)[:HOLD_LIMIT]:
        stream.add_sample(track.name, sample)
    assert stream.samples_in == HOLD_LIMIT  # released without waiting any longer


# -- a replica following a real stream through a real Redis ----------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def flushed(server):
    client = aioredis.from_url(server.url)
    await client.flushall()
    await client.aclose()
    return server


class Fleet:
    """Two nodes in one process: a producer writing through its tier, a reader with replicas."""

    def __init__(self, url: str, local=None) -> None:
        self.producer_tier = RedisTier(connect(RedisConfig(url)), SETTINGS, "node-a")
        self.reader_tier = RedisTier(connect(RedisConfig(url)), SETTINGS, "node-b")
        self.memory = MemoryCache(max_bytes=32 * 2**20)
        self.reader = ObjectReader(self.memory, self.reader_tier)
        self.directory = ReplicaDirectory(local or _NoLocal(), self.reader_tier, self.reader,
                                          self.memory, SETTINGS, self.reader_tier.part_target,
                                          expiry_check=1.0)
        self.stream = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20))
        self.stream.listeners.append(self.producer_tier.on_window_event)

    async def __aenter__(self) -> Fleet:
        await self.producer_tier.start()
        await self.reader_tier.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.directory.close()
        await self.producer_tier.close()
        await self.reader_tier.close()


class _NoLocal:
    def live_stream(self, name):
        return None


async def caught_up(replica, stream, rendition: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while replica.media_playlist(rendition) != stream.media_playlist(rendition):
        assert time.monotonic() < deadline, "the replica did not catch up"
        await replica.wait_changed(rendition, 0.1)


async def test_a_replica_follows_the_stream_and_wakes_waiters_within_50ms(flushed, video):
    track, samples = video
    async with Fleet(flushed.url) as fleet:
        fleet.stream.add_track(track)
        for sample in samples[:45]:
            fleet.stream.add_sample(track.name, sample)
        await fleet.producer_tier.wait_drained()
        replica = fleet.directory.live_stream("cam")
        assert replica is not None and replica.state is ReplicaState.LOADING
        with pytest.raises(Unavailable):
            replica.has_rendition(track.name)  # not known yet: 503, not 404
        await asyncio.wait_for(replica.loaded.wait(), 2)
        assert replica.state is ReplicaState.LIVE and replica.is_ready()
        assert fleet.directory.live_stream("cam") is replica
        await caught_up(replica, fleet.stream, track.name)
        assert replica.multivariant_playlist() == fleet.stream.multivariant_playlist()

        delays = []
        for sample in samples[45:]:
            waiter = asyncio.ensure_future(replica.wait_changed(track.name, 2.0))
            await asyncio.sleep(0)
            before = fleet.stream.parts_produced
            fleet.stream.add_sample(track.name, sample)
            if fleet.stream.parts_produced == before:
                waiter.cancel()
                continue
            started = time.perf_counter()
            assert await waiter
            delays.append(time.perf_counter() - started)
            await caught_up(replica, fleet.stream, track.name)
        assert len(delays) >= 10
        assert statistics.median(delays) < 0.05 and max(delays) < 0.25

        # Objects: the producer's bytes, one Redis GET however many ask at once.
        name = re.findall(r'#EXT-X-PART:.*URI="(part\d+\.\d+\.m4s)"',
                          replica.media_playlist(track.name))[-1]
        reads = fleet.reader.stats().redis_reads
        answers = await asyncio.gather(*(replica.fetch_object(track.name, name)
                                         for _ in range(20)))
        expected = fleet.stream.object(track.name, name)
        assert expected and all(answer == expected for answer in answers)
        assert fleet.reader.stats().redis_reads == reads + 1
        assert fleet.reader.stats().coalesced == 19
        # Now from memory.
        assert await replica.fetch_object(track.name, name) == expected
        assert fleet.reader.stats().redis_reads == reads + 1
        assert await replica.fetch_object(track.name, "init.mp4") == \
            fleet.stream.init_segment(track.name)
        # Misses are remembered briefly.
        assert await replica.fetch_object(track.name, "part999.0.m4s") is None
        assert await replica.fetch_object(track.name, "part999.0.m4s") is None
        assert fleet.reader.stats().negative_hits == 1

        # The end reaches the replica; its playlists end too.
        fleet.stream.end()
        deadline = time.monotonic() + 2
        while not replica.ended:
            assert time.monotonic() < deadline
            await replica.wait_changed(track.name, 0.1)
        assert replica.media_playlist(track.name).endswith("#EXT-X-ENDLIST\n")


async def test_replicas_serve_the_init_of_each_format_through_redis(flushed):
    """A format change reaches a replica following the stream and one that loads later from a
    log whose first declaration was trimmed: both list and serve each segment's own init."""
    from edge.redis_tier import events_key
    from tests.test_live import decoded_size
    small, small_samples = encode_video(2.1)
    large, large_samples = encode_video(1.7, size=(320, 180))
    async with Fleet(flushed.url) as fleet:
        fleet.stream.add_track(small)
        for sample in small_samples:
            fleet.stream.add_sample("90p", sample)
        await fleet.producer_tier.wait_drained()
        following = fleet.directory.live_stream("cam")
        await asyncio.wait_for(following.loaded.wait(), 2)
        await caught_up(following, fleet.stream, "90p")
        old_init = fleet.stream.object("90p", "init.mp4")
        assert await following.fetch_object("90p", "init.mp4") == old_init  # now in memory
        fleet.stream.discontinuity()
        fleet.stream.add_track(large)
        for sample in large_samples:
            fleet.stream.add_sample("90p", sample)
        await fleet.producer_tier.wait_drained()
        new_init = fleet.stream.object("90p", "init-1.mp4")
        assert new_init and new_init != old_init

        client = aioredis.from_url(flushed.url)
        [(first_id, first)] = await client.xrange(events_key("cam"), count=1)
        assert first[b"e"] == b"track"
        await client.xdel(events_key("cam"), first_id)
        await client.aclose()
        memory = MemoryCache(max_bytes=32 * 2**20)
        late = ReplicaDirectory(_NoLocal(), fleet.reader_tier,
                                ObjectReader(memory, fleet.reader_tier), memory, SETTINGS,
                                fleet.reader_tier.part_target).live_stream("cam")
        try:
            await asyncio.wait_for(late.loaded.wait(), 2)
            for replica in (following, late):
                await caught_up(replica, fleet.stream, "90p")  # the same text, MAPs included
                playlist = replica.media_playlist("90p")
                assert playlist.index('URI="init.mp4"') < playlist.index("seg1.m4s") \
                    < playlist.index('URI="init-1.mp4"') < playlist.index("seg3.m4s")
                assert await replica.fetch_object("90p", "init.mp4") == old_init
                assert await replica.fetch_object("90p", "init-1.mp4") == new_init
                assert replica.init_segment("90p") in (None, new_init)
                assert decoded_size(old_init, await replica.fetch_object("90p", "seg1.m4s")) \
                    == (160, 90)
                assert decoded_size(new_init, await replica.fetch_object("90p", "seg3.m4s")) \
                    == (320, 180)
        finally:
            await late.close()


async def test_unknown_streams_are_404_and_local_streams_win(flushed, video):
    track, samples = video

    class Local:
        def __init__(self, stream):
            self.stream = stream

        def live_stream(self, name):
            return self.stream if name == "cam" else None

    async with Fleet(flushed.url) as fleet:
        fleet.directory._local = Local(None)
        missing = fleet.directory.live_stream("nope")
        await asyncio.wait_for(missing.loaded.wait(), 2)
        assert missing.state is ReplicaState.MISSING
        with pytest.raises(NotFound):
            missing.is_ready()
        with pytest.raises(NotFound):
            missing.has_rendition("360p")
        assert fleet.directory.live_stream("nope") is None  # remembered: no new replica
        assert fleet.directory.stats().replicas == 0

        fleet.stream.add_track(track)
        for sample in samples[:40]:
            fleet.stream.add_sample(track.name, sample)
        await fleet.producer_tier.wait_drained()
        replica = fleet.directory.live_stream("cam")
        await asyncio.wait_for(replica.loaded.wait(), 2)
        assert fleet.directory.stats().replicas == 1
        fleet.directory._local = Local(fleet.stream)  # the stream is produced here now
        assert fleet.directory.live_stream("cam") is fleet.stream
        await asyncio.sleep(0.05)
        assert fleet.directory.stats().replicas == 0 and replica.state is ReplicaState.RETIRED


async def test_a_reader_without_redis_serves_what_it_holds_and_503s_the_rest(tmp_path, video):
    track, samples = video
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async with Fleet(server.url) as fleet:
            fleet.stream.add_track(track)
            for sample in samples[:60]:
                fleet.stream.add_sample(track.name, sample)
            await fleet.producer_tier.wait_drained()
            replica = fleet.directory.live_stream("cam")
            await asyncio.wait_for(replica.loaded.wait(), 2)
            await caught_up(replica, fleet.stream, track.name)
            held = await replica.fetch_object(track.name, "seg0.m4s")
            assert held
            server.stop()
            deadline = time.monotonic() + 3
            while fleet.reader_tier.available:  # the replica's XREAD notices
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert await replica.fetch_object(track.name, "seg0.m4s") == held
            assert replica.media_playlist(track.name)  # the last window it knows
            with pytest.raises(Unavailable):
                await replica.fetch_object(track.name, "seg1.m4s")
            with pytest.raises(Unavailable):
                fleet.directory.live_stream("other")
            assert fleet.reader.stats().unavailable == 1
            # Back: the replica follows again from where it was.
            server.start()
            for sample in samples[60:]:
                fleet.stream.add_sample(track.name, sample)
            deadline = time.monotonic() + 8
            while not fleet.producer_tier.available or fleet.producer_tier.stats().queued:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await fleet.producer_tier.wait_drained()
            last = fleet.stream.stats().renditions[0]
            deadline = time.monotonic() + 8
            while replica.readiness(track.name, last.last_msn, last.last_part) \
                    is not Readiness.READY:
                assert time.monotonic() < deadline, replica.media_playlist(track.name)
                await replica.wait_changed(track.name, 0.2)
    finally:
        server.stop()


async def test_a_restarted_producer_resumes_its_log(flushed, video):
    """In process: the tier holds the new stream's media, reads the log, and the stream resumes."""
    track, samples = video
    async with Fleet(flushed.url) as fleet:
        fleet.stream.add_track(track)
        for sample in samples[:60]:
            fleet.stream.add_sample(track.name, sample)
        fleet.producer_tier.shutting_down()
        fleet.stream.end()
        await fleet.producer_tier.close()
        last_old = fleet.stream.stats().renditions[0].last_msn

        tier = RedisTier(connect(RedisConfig(flushed.url)), SETTINGS, "node-a")
        memory = MemoryCache(max_bytes=32 * 2**20)
        streams = {}
        tier.resumer = LocalResumer(streams.get, ObjectReader(memory, tier), tier.timings.ttl_for)
        await tier.start()
        again = streams["cam"] = LiveStream("cam", SETTINGS, memory)
        again.listeners.append(tier.on_window_event)
        again.add_track(track)
        for sample in samples[60:]:
            again.add_sample(track.name, sample)
        await asyncio.wait_for(tier.wait_drained(), 3)
        playlist = again.media_playlist(track.name)
        assert re.search(rf"seg{last_old}\.m4s\n#EXT-X-DISCONTINUITY\n", playlist), playlist
        assert await again.fetch_object(track.name, f"seg{last_old}.m4s") == \
            fleet.stream.object(track.name, f"seg{last_old}.m4s")
        # Replicas elsewhere see one continuous log.
        replica = fleet.directory.live_stream("cam")
        await asyncio.wait_for(replica.loaded.wait(), 2)
        await caught_up(replica, again, track.name)
        await tier.close()


async def test_a_producer_restarted_after_a_format_change_keeps_each_init(flushed):
    """The log lists segments of two formats when the producer restarts; the new stream, in the
    newer format, takes its generation (init-1.mp4): init.mp4 keeps the old format's bytes."""
    from tests.test_live import decoded_size
    small, small_samples = encode_video(2.1)
    large, large_samples = encode_video(3.1, size=(320, 180))
    async with Fleet(flushed.url) as fleet:
        fleet.stream.add_track(small)
        for sample in small_samples:
            fleet.stream.add_sample("90p", sample)
        fleet.stream.discontinuity()
        fleet.stream.add_track(large)
        for sample in large_samples[:40]:
            fleet.stream.add_sample("90p", sample)
        fleet.producer_tier.shutting_down()
        fleet.stream.end()
        await fleet.producer_tier.close()
        old_init = fleet.stream.object("90p", "init.mp4")
        new_init = fleet.stream.object("90p", "init-1.mp4")

        tier = RedisTier(connect(RedisConfig(flushed.url)), SETTINGS, "node-a")
        memory = MemoryCache(max_bytes=32 * 2**20)
        streams = {}
        tier.resumer = LocalResumer(streams.get, ObjectReader(memory, tier), tier.timings.ttl_for)
        await tier.start()
        try:
            again = streams["cam"] = LiveStream("cam", SETTINGS, memory)
            again.listeners.append(tier.on_window_event)
            again.add_track(large)
            for sample in large_samples[40:]:
                again.add_sample("90p", sample)
            await asyncio.wait_for(tier.wait_drained(), 3)
            playlist = again.media_playlist("90p")
            assert [line for line in playlist.splitlines() if line.startswith("#EXT-X-MAP")] \
                == ['#EXT-X-MAP:URI="init.mp4"', '#EXT-X-MAP:URI="init-1.mp4"'], playlist
            assert again.init_segment("90p") == new_init
            replica = fleet.directory.live_stream("cam")
            await asyncio.wait_for(replica.loaded.wait(), 2)
            await caught_up(replica, again, "90p")
            assert await replica.fetch_object("90p", "init.mp4") == old_init
            assert await replica.fetch_object("90p", "init-1.mp4") == new_init
            first = re.search(r"^(seg\d+\.m4s)$", playlist, re.M).group(1)
            last = re.findall(r"^(seg\d+\.m4s)$", playlist, re.M)[-1]
            assert decoded_size(old_init, await replica.fetch_object("90p", first)) == (160, 90)
            assert decoded_size(new_init, await replica.fetch_object("90p", last)) == (320, 180)
        finally:
            await tier.close()


# -- two real nodes --------------------------------------------------------------------------------
async def fetch(session, url):
    async with session.get(url) as response:
        return response.status, await response.read()


async def test_a_second_node_plays_a_live_stream_through_redis(tmp_path):
    with redis_server(tmp_path / "redis") as server, \
            running_node(tmp_path, "--demo", REDIS_URL=server.url) as producer, \
            running_node(tmp_path, REDIS_URL=server.url) as reader:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while (await fetch(session, f"{producer.url}/hls/demo/index.m3u8"))[0] != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            status, multivariant = await fetch(session, f"{reader.url}/hls/demo/index.m3u8")
            assert status == 200
            assert multivariant.split(b"BANDWIDTH")[0] == \
                (await fetch(session, f"{producer.url}/hls/demo/index.m3u8"))[1] \
                .split(b"BANDWIDTH")[0]
            assert b"360p/index.m3u8" in multivariant and b"180p/index.m3u8" in multivariant

            # Blocking reloads: the reader answers the same request as the producer, soon after.
            base = "/hls/demo/360p/index.m3u8"
            lags = []
            for _ in range(8):
                text = (await fetch(session, f"{producer.url}{base}"))[1].decode()
                hint = re.search(r'PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"', text)
                query = f"?_HLS_msn={hint.group(1)}&_HLS_part={hint.group(2)}"

                async def timed(url):
                    status, body = await fetch(session, url)
                    return status, body, time.perf_counter()

                (s1, b1, t1), (s2, b2, t2) = await asyncio.gather(
                    timed(f"{producer.url}{base}{query}"), timed(f"{reader.url}{base}{query}"))
                assert s1 == s2 == 200
                # The hinted part, or (if its segment closed first) the next segment's first.
                msn, index = int(hint.group(1)), int(hint.group(2))
                for answer in (b1.decode(), b2.decode()):
                    assert f'URI="part{msn}.{index}.m4s"' in answer or \
                        f'URI="part{msn + 1}.0.m4s"' in answer
                lags.append(t2 - t1)
            assert statistics.median(lags) < 0.05, lags

            # Parts and segments fetched from the reader decode.
            text = (await fetch(session, f"{reader.url}{base}")).__getitem__(1).decode()
            _, init = await fetch(session, f"{reader.url}/hls/demo/360p/init.mp4")
            parts = re.findall(r'#EXT-X-PART:.*URI="(part\d+\.\d+\.m4s)"', text)[-4:]
            body = init
            for name in parts:
                status, data = await fetch(session, f"{reader.url}/hls/demo/360p/{name}")
                assert status == 200 and data[4:8] == b"moof"
                body += data
            segment = re.findall(r"^(seg\d+\.m4s)$", text, re.M)[-1]
            status, data = await fetch(session, f"{reader.url}/hls/demo/360p/{segment}")
            assert status == 200
            assert data == (await fetch(session, f"{producer.url}/hls/demo/360p/{segment}"))[1]
            with av.open(io.BytesIO(init + data), format="mp4") as container:
                frames = list(container.decode(video=0))
            assert len(frames) >= 20 and frames[0].width == 640
            with av.open(io.BytesIO(body), format="mp4") as container:
                assert len(list(container.decode(video=0))) >= 4
            status, _ = await fetch(session, f"{reader.url}/hls/no-such-stream/index.m3u8")
            assert status == 404
            async with session.get(f"{reader.url}/readyz") as response:
                details = await response.json()
            assert details["ready"] and details["redis"]["available"]
            assert details["redis"]["replicas"] == 1 and details["redis"]["hits"] > 0


def test_a_reader_keeps_its_viewers_in_the_fast_lane_when_memory_misses(tmp_path):
    """A reading node's events carry no bytes, so every new part's first request misses its
    memory: the lane reads it through Redis with the connection held, where it used to hand the
    connection to aiohttp for good. What no tier has is still a 404 with a message."""
    with redis_server(tmp_path / "redis") as server, \
            running_node(tmp_path, "--demo", REDIS_URL=server.url) as producer, \
            running_node(tmp_path, REDIS_URL=server.url) as reader:
        wait_for_demo(producer.url)
        wait_for_demo(reader.url)  # the replica has loaded: the lane can locate the stream
        viewer = Http(reader.url)
        try:
            status, headers, body = viewer.get("/hls/demo/180p/index.m3u8")
            assert status == 200 and headers["server"] == "livedge"
            for _, data in play_parts(viewer, body, 4):
                assert data[4:8] in (b"styp", b"moof")
            body = viewer.get("/hls/demo/180p/index.m3u8")[2]
            # An init segment of a format the window never had is not looked for in Redis.
            misses = ("livedge_tier_misses_total", (("tier", "redis"),))
            before = scrape(reader.url)[1][misses]
            for generation in range(2, 7):
                assert viewer.get(f"/hls/demo/180p/init-{generation}.mp4")[0] == 404
            assert scrape(reader.url)[1][misses] == before
            # Listed, but gone from Redis before anyone here asked: aiohttp says 404.
            oldest = re.findall(r"^(seg\d+\.m4s)$", body.decode(), re.M)[0]
            asyncio.run(_delete_object(server.url, object_key("demo", "180p", oldest)))
            status, headers, data = viewer.get(f"/hls/demo/180p/{oldest}")
            assert status == 404 and json.loads(data)["message"]
        finally:
            viewer.close()
    assert "unhandled error" not in reader.log()


async def _delete_object(url: str, key: str) -> None:
    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{key}")]
        assert keys, f"no Redis key ends with {key}"
        await client.delete(*keys)
    finally:
        await client.aclose()
