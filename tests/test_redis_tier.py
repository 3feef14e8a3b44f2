"""The Redis tier against a real redis-server the suite starts: write-through, TTLs, outages,
Sentinel, Cluster; and real nodes: Redis killed mid-stream, an ingesting node restarted, a tiny
memory tier."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from bench.ports import free_port
from edge.cache import MemoryCache
from edge.errors import Unavailable
from edge.redis_tier import (DIRECTORY_KEY, RedisConfig, RedisTier, connect, events_key, info_key,
                             object_redis_key)
from origin.live import LiveSettings, LiveStream, StreamEnded, TrackDeclared, object_key
from origin.packager import PartReady, SegmentReady
from origin.wire import decode_event, decode_settings, unpack_event
from tests.nodes import running_node
from tests.redis_server import REDIS_SERVER, RedisServer, redis_server
from tests.test_live import encode_video

pytestmark = pytest.mark.timeout(60)

SETTINGS = LiveSettings(segment_duration=1.0, part_duration=0.25, window_segments=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def client(server):
    client = aioredis.from_url(server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def video():
    return encode_video(3.2)


def new_tier(url: str, **options) -> RedisTier:
    options.setdefault("heartbeat_interval", 0.2)
    return RedisTier(connect(RedisConfig(url)), SETTINGS, "node-a", dvr_seconds=10, **options)


def producing(tier: RedisTier, name: str = "cam") -> tuple[LiveStream, list]:
    """A live stream whose events reach the tier, and the events it told (with their bytes)."""
    stream = LiveStream(name, SETTINGS, MemoryCache(max_bytes=32 * 2**20))
    told: list = []
    stream.listeners += [tier.on_window_event, lambda _, event: told.append(event)]
    return stream, told


async def test_write_through_stores_objects_the_event_log_and_info_with_ttls(server, client, video):
    track, samples = video
    tier = new_tier(server.url)
    await tier.start()
    stream, told = producing(tier)
    stream.add_track(track)
    for sample in samples:
        stream.add_sample(track.name, sample)
    await asyncio.wait_for(tier.wait_drained(), 5)

    timings = tier.timings
    init = await client.get(object_redis_key(object_key("cam", "90p", "init.mp4")))
    assert init == stream.init_segment("90p")
    assert timings.segment_ttl - 1 < await client.pttl(
        object_redis_key(object_key("cam", "90p", "init.mp4"))) / 1000 <= timings.stream_ttl
    for event in told:
        if isinstance(event, PartReady):
            key = object_redis_key(object_key("cam", "90p", f"part{event.msn}.{event.index}.m4s"))
            assert await client.get(key) == event.data
            assert 0 < await client.pttl(key) <= timings.part_ttl * 1000
        elif isinstance(event, SegmentReady):
            key = object_redis_key(object_key("cam", "90p", f"seg{event.msn}.m4s"))
            assert await client.get(key) == event.data
            assert timings.part_ttl * 1000 < await client.pttl(key) <= timings.segment_ttl * 1000
    assert timings.part_ttl == 4.0 and timings.segment_ttl == 4 + 10 + 1

    entries = await client.xrange(events_key("cam"))
    assert len(entries) == len(told)
    assert all(len(value) < 200 for _, fields in entries for value in fields.values())
    decoded = [decode_event(fields) for _, fields in entries]
    assert decoded[0] == TrackDeclared(track, b"")
    assert [type(e) for e in decoded] == [type(e) for e in told]
    assert 0 < await client.pttl(events_key("cam")) <= timings.stream_ttl * 1000

    info = await client.hgetall(info_key("cam"))
    assert decode_settings(json.loads(info[b"settings"])) == (SETTINGS, tier.part_target)
    assert unpack_event(info[b"track:90p"]) == TrackDeclared(track, b"")
    assert info[b"node"] == b"node-a"
    assert (await tier.live_streams())["cam"]["node"] == "node-a"

    stats = tier.stats()
    assert stats.available and stats.errors == 0 and stats.dropped == 0 and stats.streams == 1
    media = sum(len(e.data) for e in told if isinstance(e, (PartReady, SegmentReady)))
    assert stats.written_bytes == media + len(init)
    assert 0 < stats.latency_p50 <= stats.latency_p99 < 1.0

    stream.end()
    await asyncio.wait_for(tier.wait_drained(), 5)
    assert decode_event((await client.xrange(events_key("cam")))[-1][1]) == StreamEnded()
    assert not await client.hexists(DIRECTORY_KEY, "cam")
    assert await client.pttl(events_key("cam")) <= timings.ended_ttl * 1000
    assert "cam" not in await tier.live_streams()
    assert tier.stats().streams == 0
    await tier.close()


async def test_heartbeats_keep_a_quiet_stream_listed_and_unexpired(server, client, video):
    track, samples = video
    tier = RedisTier(connect(RedisConfig(server.url)), LiveSettings(1.0, 0.25, 3), "node-a",
                     dvr_seconds=0, heartbeat_interval=0.2)
    await tier.start()
    stream, _ = producing(tier)
    stream.add_track(track)
    for sample in samples[:20]:
        stream.add_sample(track.name, sample)
    await asyncio.wait_for(tier.wait_drained(), 5)
    first = json.loads(await client.hget(DIRECTORY_KEY, "cam"))["heartbeat"]
    await client.pexpire(events_key("cam"), 500)  # would expire soon without heartbeats
    await asyncio.sleep(0.7)
    assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["heartbeat"] > first
    assert await client.pttl(events_key("cam")) > 1000
    await tier.close()


async def test_cache_protocol_get_and_set_count_hits_misses_and_bytes(server, client):
    tier = new_tier(server.url)
    await tier.start()
    await tier.set("cam/90p/seg1.m4s", b"x" * 1000, ttl=5)
    assert await tier.get("cam/90p/seg1.m4s") == b"x" * 1000
    assert await tier.get("cam/90p/seg2.m4s") is None
    assert 4000 < await client.pttl(object_redis_key("cam/90p/seg1.m4s")) <= 5000
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.read_bytes) == (1, 1, 1000)
    await tier.close()


async def test_a_full_queue_drops_the_oldest_writes_and_counts_them():
    tier = new_tier(f"redis://127.0.0.1:{free_port()}/0", queue_items=20)  # nothing listens there
    await tier.start()
    assert not tier.available
    for index in range(100):
        tier.on_window_event("cam", PartReady("90p", 0, index, 0.25, True, b"x" * 10))
    stats = tier.stats()
    assert (stats.queued, stats.dropped, stats.queued_bytes) == (20, 80, 200)
    with pytest.raises(Unavailable):
        await tier.get("cam/90p/part0.0.m4s")
    await tier.close()


async def test_an_outage_is_logged_once_never_delays_the_stream_and_writes_resume(
        tmp_path, video, caplog):
    track, samples = video
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        tier = new_tier(server.url)
        await tier.start()
        stream, told = producing(tier)
        listener_times: list[float] = []

        def timed(name, event):
            started = time.perf_counter()
            tier.on_window_event(name, event)
            listener_times.append(time.perf_counter() - started)

        stream.listeners[0] = timed
        stream.add_track(track)
        for sample in samples[:30]:
            stream.add_sample(track.name, sample)
        await asyncio.wait_for(tier.wait_drained(), 5)

        server.stop()
        with caplog.at_level(logging.WARNING, logger="livedge.redis"):
            for sample in samples[30:60]:
                stream.add_sample(track.name, sample)
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 3
            while tier.available and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not tier.available
            for sample in samples[60:]:
                stream.add_sample(track.name, sample)
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            with pytest.raises(Unavailable):
                await tier.get(object_key("cam", "90p", "init.mp4"))
            assert time.perf_counter() - started < 0.05  # fails fast, does not hold the viewer
        outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_logs) == 1
        assert max(listener_times) < 0.005
        stats = tier.stats()
        assert stats.queued > 0 and stats.outages == 1 and stats.last_error
        queued_events = [e for e in told[-stats.queued:]]

        server.start()  # empty: no persistence, as a restarted cache comes back
        deadline = time.monotonic() + 8
        while not tier.available and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert tier.available
        await asyncio.wait_for(tier.wait_drained(), 5)
        client = aioredis.from_url(server.url)
        try:
            # What the restarted Redis lost is written again: info, init segment, directory.
            assert unpack_event(await client.hget(info_key("cam"), "track:90p")) == \
                TrackDeclared(track, b"")
            assert await client.get(object_redis_key(object_key("cam", "90p", "init.mp4"))) == \
                stream.init_segment("90p")
            assert await client.hexists(DIRECTORY_KEY, "cam")
            # The writes queued during the outage arrived, in order.
            logged = [decode_event(f) for _, f in await client.xrange(events_key("cam"))]
            assert [type(e) for e in logged] == [type(e) for e in queued_events]
            part = next(e for e in queued_events if isinstance(e, PartReady))
            assert await client.get(object_redis_key(object_key(
                "cam", "90p", f"part{part.msn}.{part.index}.m4s"))) == part.data
        finally:
            await client.aclose()
        assert tier.stats().queued == 0 and tier.stats().dropped == 0
        await tier.close()
    finally:
        server.stop()


async def test_a_shutdown_interrupts_streams_without_ending_them(server, client, video):
    track, samples = video
    tier = new_tier(server.url)
    await tier.start()
    stream, _ = producing(tier)
    stream.add_track(track)
    for sample in samples:
        stream.add_sample(track.name, sample)
    tier.shutting_down()
    stream.end()  # what Node.close does
    await tier.close()
    logged = [decode_event(f) for _, f in await client.xrange(events_key("cam"))]
    assert isinstance(logged[-1], SegmentReady)  # the open segment was closed and written
    assert not any(isinstance(e, StreamEnded) for e in logged)
    assert await client.hexists(DIRECTORY_KEY, "cam")


async def test_a_second_producer_of_a_live_name_stays_out_of_the_shared_log(server, client,
                                                                          video):
    track, samples = video
    first, second = new_tier(server.url), RedisTier(connect(RedisConfig(server.url)), SETTINGS,
                                                    "node-b", heartbeat_interval=0.2)
    await first.start()
    await second.start()
    stream, told = producing(first)
    other, _ = producing(second)
    stream.add_track(track)
    for sample in samples[:40]:
        stream.add_sample(track.name, sample)
    await asyncio.wait_for(first.wait_drained(), 5)

    async def first_goes_on():  # in real time: its log is written every part
        for sample in samples[40:96]:
            stream.add_sample(track.name, sample)
            await asyncio.sleep(1 / 30)

    going_on = asyncio.create_task(first_goes_on())
    other.add_track(track)
    for sample in samples[:40]:
        other.add_sample(track.name, sample)
    await asyncio.wait_for(second.wait_drained(), 5)
    await going_on
    await asyncio.wait_for(first.wait_drained(), 5)
    logged = [decode_event(f) for _, f in await client.xrange(events_key("cam"))]
    assert len(logged) == len(told)  # only the first producer's events
    assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["node"] == "node-a"
    assert second.stats().streams == 0 and first.stats().streams == 1
    # The first producer stops heartbeating (as after a crash): the second takes the log over.
    await first.close()
    deadline = time.monotonic() + 3
    while second.stats().streams == 0:
        assert time.monotonic() < deadline, "no takeover"
        await asyncio.sleep(0.1)
    for sample in samples[40:70]:
        other.add_sample(track.name, sample)
    await asyncio.wait_for(second.wait_drained(), 5)
    assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["node"] == "node-b"
    assert await client.hget(info_key("cam"), "node") == b"node-b"
    assert len(await client.xrange(events_key("cam"))) < len(told)  # a new log
    # A producer that shuts down marks its streams interrupted: another may take over at once.
    second.shutting_down()
    other.end()
    await second.close()
    assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["interrupted"] is True
    third = RedisTier(connect(RedisConfig(server.url)), SETTINGS, "node-c")
    await third.start()
    taking_over, _ = producing(third)
    taking_over.add_track(track)
    for sample in samples[:40]:
        taking_over.add_sample(track.name, sample)
    await asyncio.wait_for(third.wait_drained(), 5)
    assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["node"] == "node-c"
    await third.close()



async def test_a_publish_moved_from_a_node_whose_log_went_quiet_resumes_that_log(server, client,
                                                                                  video):
    """The decision of ``RedisTier._decide`` when a publisher reconnects to another node within
    seconds: the old node's directory entry is still fresh, but its log is quiet (a crash, or a
    publisher in its grace period there). The new node continues the log, closing the segment
    the old one left unfinished, and the old node, still heartbeating, stops writing it."""
    from edge.replica import LocalResumer, ObjectReader
    from origin.packager import SegmentOpened
    track, samples = video
    first = new_tier(server.url)  # heartbeats every 0.2 s: its entry stays fresh throughout
    await first.start()
    old, _ = producing(first)
    old.add_track(track)
    for sample in samples[:46]:  # segment 0, then 2 parts of segment 1 (cut mid-segment)
        old.add_sample(track.name, sample)
    await asyncio.wait_for(first.wait_drained(), 5)
    second = RedisTier(connect(RedisConfig(server.url)), SETTINGS, "node-b",
                       heartbeat_interval=2.0)
    await second.start()
    memory = MemoryCache(max_bytes=32 * 2**20)
    new = LiveStream("cam", SETTINGS, memory)
    told: list = []
    new.listeners += [second.on_window_event, lambda _, event: told.append(event)]
    second.resumer = LocalResumer(lambda name: new if name == "cam" else None,
                                  ObjectReader(memory, second), second.timings.ttl_for)
    try:
        entry = json.loads(await client.hget(DIRECTORY_KEY, "cam"))
        assert entry["node"] == "node-a" and time.time() - entry["heartbeat"] < 1
        new.add_track(track)
        for sample in samples[:40]:
            new.add_sample(track.name, sample)
        deadline = time.monotonic() + 5
        while not any(isinstance(event, SegmentOpened) for event in told):
            assert time.monotonic() < deadline, "the new stream is still held"
            await asyncio.sleep(0.05)
        await asyncio.wait_for(second.wait_drained(), 5)
        first_new = next(event for event in told if isinstance(event, SegmentOpened))
        assert (first_new.msn, first_new.discontinuity) == (2, True)
        playlist = new.media_playlist(track.name)
        assert re.search(r"seg0\.m4s\n.*seg1\.m4s\n#EXT-X-DISCONTINUITY\n", playlist, re.S)
        assert await new.fetch_object(track.name, "seg1.m4s")  # joined from the old parts
        logged = [decode_event(f) for _, f in await client.xrange(events_key("cam"))]
        msns = [event.msn for event in logged if isinstance(event, SegmentOpened)]
        assert msns[:3] == [0, 1, 2] and msns == sorted(set(msns))  # one log, continued
        assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["node"] == "node-b"
        # The old node is alive: its next heartbeat finds the claim, and it stops writing.
        await asyncio.sleep(0.6)
        assert json.loads(await client.hget(DIRECTORY_KEY, "cam"))["node"] == "node-b"
        assert first.stats().streams == 0
        length = await client.xlen(events_key("cam"))
        for sample in samples[46:80]:
            old.add_sample(track.name, sample)
        await asyncio.wait_for(first.wait_drained(), 5)
        assert await client.xlen(events_key("cam")) == length
    finally:
        await first.close()
        await second.close()

async def test_sentinel_finds_the_master(tmp_path):
    with redis_server(tmp_path / "master") as master:
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor livedge 127.0.0.1 {master.port} 1\n")
        sentinel = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            probe = RedisServer(tmp_path, port)
            deadline = time.monotonic() + 5
            while not probe.ping() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            tier = RedisTier(connect(RedisConfig(sentinels=(("127.0.0.1", port),),
                                                 sentinel_service="livedge")),
                             SETTINGS, "node-a")
            await tier.start()
            await tier.set("cam/90p/seg0.m4s", b"through sentinel", ttl=5)
            direct = aioredis.from_url(master.url)
            assert await direct.get(object_redis_key("cam/90p/seg0.m4s")) == b"through sentinel"
            await direct.aclose()
            assert await tier.get("cam/90p/seg0.m4s") == b"through sentinel"
            await tier.close()
        finally:
            sentinel.kill()
            sentinel.wait()


@pytest.mark.parametrize("env, expected", [
    ({"REDIS_URL": "rediss://:secret@cache:6380/2"}, ("rediss://:secret@cache:6380/2", (), False)),
    ({"REDIS_URL": "unix:///run/redis.sock"}, ("unix:///run/redis.sock", (), False)),
    ({"REDIS_SENTINELS": "s1:26379, s2:26379", "REDIS_SENTINEL_SERVICE": "livedge"},
     (None, ("s1:26379", "s2:26379"), False)),
    ({"REDIS_URL": "redis://node1:7000", "REDIS_CLUSTER": "true"},
     ("redis://node1:7000", (), True)),
    ({"REDIS_URL": "http://cache"}, "REDIS_URL: is not a redis://"),
    ({"REDIS_URL": "redis://:hunter2@cache", "REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER"),
    ({"REDIS_SENTINELS": "s1"}, "'s1' is not host:port"),
    ({"REDIS_CLUSTER": "true"}, "needs REDIS_URL"),
    ({"REDIS_CLUSTER": "true", "REDIS_URL": "redis://a", "REDIS_SENTINELS": "s:1"}, "not both"),
])
def test_redis_deployment_settings(env, expected):
    from edge.config import ConfigError, load_settings
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected) as error:
            load_settings(env)
        assert "hunter2" not in str(error.value)
        return
    settings = load_settings(env)
    assert (settings.redis_url, settings.redis_sentinels, settings.redis_cluster) == expected


# -- real nodes ------------------------------------------------------------------------------------
async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def wait_for_segments(session, url: str, count: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await fetch(session, url)
        if status == 200 and len(re.findall(r"^seg\d+\.m4s$", body.decode(), re.M)) >= count:
            return body.decode()
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {count} segments at {url}")


async def readyz(session, node) -> dict:
    async with session.get(f"{node.url}/readyz") as response:
        return await response.json()


async def test_node_serves_through_a_redis_outage_and_resumes_writing(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with running_node(tmp_path, "--demo", REDIS_URL=server.url) as node:
            base = f"{node.url}/hls/demo/360p"
            async with aiohttp.ClientSession() as session:
                await wait_for_segments(session, f"{base}/index.m3u8", 2)
                failures: list[tuple[str, int]] = []
                answers = 0
                stop = asyncio.Event()

                async def viewer() -> None:
                    nonlocal answers
                    while not stop.is_set():
                        status, body = await fetch(session, f"{base}/index.m3u8")
                        if status != 200:
                            failures.append(("playlist", status))
                            continue
                        # The preload-hinted part: held until it exists, then sent whole.
                        part = re.findall(r'URI="(part\d+\.\d+\.m4s)"', body.decode())[-1]
                        status, data = await fetch(session, f"{base}/{part}")
                        if status != 200 or data[4:8] != b"moof":
                            failures.append((part, status))
                        answers += 1
                        await asyncio.sleep(0.05)

                watching = asyncio.create_task(viewer())
                await asyncio.sleep(1)
                server.stop()
                deadline = time.monotonic() + 5
                while (await readyz(session, node))["redis"]["available"]:
                    assert time.monotonic() < deadline, "the outage was not noticed"
                    await asyncio.sleep(0.1)
                details = await readyz(session, node)
                assert details["ready"] is True  # it keeps serving from memory
                assert details["redis"]["last_error"]
                await asyncio.sleep(2)
                assert (await readyz(session, node))["redis"]["queued"] > 0
                server.start()
                deadline = time.monotonic() + 10
                while not (await readyz(session, node))["redis"]["available"]:
                    assert time.monotonic() < deadline, "writes did not resume"
                    await asyncio.sleep(0.1)
                client = aioredis.from_url(server.url)
                try:
                    deadline = time.monotonic() + 5
                    while await client.xlen(events_key("demo")) < 10:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                    assert await client.hexists(info_key("demo"), "track:360p")
                finally:
                    await client.aclose()
                await asyncio.sleep(0.5)
                stop.set()
                await watching
            assert failures == []
            assert answers > 10  # about one a part (0.25 s) for 5 s
            assert node.log().count("redis unavailable") == 1
    finally:
        server.stop()


async def test_a_restarted_ingesting_node_serves_the_window_from_redis_and_continues(tmp_path):
    with redis_server(tmp_path / "redis") as server:
        async with aiohttp.ClientSession() as session:
            with running_node(tmp_path, "--demo", REDIS_URL=server.url) as node:
                before = await wait_for_segments(
                    session, f"{node.url}/hls/demo/360p/index.m3u8", 3)
                last_msn = int(re.findall(r"^seg(\d+)\.m4s$", before, re.M)[-1])
                status, segment = await fetch(session,
                                              f"{node.url}/hls/demo/360p/seg{last_msn}.m4s")
                assert status == 200
            # SIGTERM done. The same node comes back: the old window at once, then new media.
            with running_node(tmp_path, "--demo", REDIS_URL=server.url) as node:
                playlist_url = f"{node.url}/hls/demo/360p/index.m3u8"
                deadline = time.monotonic() + 3
                while True:
                    status, body = await fetch(session, playlist_url)
                    if status == 200 and f"seg{last_msn}.m4s" in body.decode():
                        break
                    assert time.monotonic() < deadline, f"old window not served: {status} {body}"
                    await asyncio.sleep(0.05)
                assert await fetch(session, f"{node.url}/hls/demo/360p/seg{last_msn}.m4s") == \
                    (200, segment)
                # New media continues the numbering after a discontinuity, after the segment the
                # shutdown closed (last_msn + 1 if one was open).
                deadline = time.monotonic() + 15
                while True:
                    text = (await fetch(session, playlist_url))[1].decode()
                    found = re.search(r"#EXT-X-DISCONTINUITY\n(?:#.*\n)*seg(\d+)\.m4s", text)
                    if found:
                        break
                    assert time.monotonic() < deadline, text
                    await asyncio.sleep(0.2)
                assert last_msn < int(found.group(1)) <= last_msn + 2
                msns = [int(m) for m in re.findall(r"^seg(\d+)\.m4s$", text, re.M)]
                assert msns == list(range(msns[0], msns[0] + len(msns))) and last_msn in msns
                assert "resumed from redis" in node.log()


async def test_a_tiny_memory_tier_evicts_and_still_serves_every_object(tmp_path):
    with redis_server(tmp_path / "redis") as server, \
            running_node(tmp_path, "--demo", REDIS_URL=server.url) as producer, \
            running_node(tmp_path, REDIS_URL=server.url, CACHE_MEMORY="1MiB") as reader:
        async with aiohttp.ClientSession() as session:
            await wait_for_segments(session, f"{producer.url}/hls/demo/360p/index.m3u8", 5)
            served = 0
            for _ in range(2):
                for rendition in ("360p", "180p", "audio"):
                    text = await wait_for_segments(
                        session, f"{reader.url}/hls/demo/{rendition}/index.m3u8", 4)
                    # Every listed object: more than the 1 MiB the reader may keep in memory.
                    names = re.findall(r"^(seg\d+\.m4s)$", text, re.M)
                    names += re.findall(r'#EXT-X-PART:.*URI="(part\d+\.\d+\.m4s)"', text)
                    for name in names:
                        status, data = await fetch(session,
                                                   f"{reader.url}/hls/demo/{rendition}/{name}")
                        assert status == 200, (rendition, name)
                        assert (await fetch(session, f"{producer.url}/hls/demo/{rendition}/"
                                                     f"{name}")) == (200, data)
                        served += 1
            status, body = await fetch(session, f"{reader.url}/metrics")
        metrics = body.decode()
        evictions = float(re.search(r'livedge_tier_evictions_total\{tier="memory"\} (\S+)',
                                    metrics).group(1))
        assert evictions > 0
        assert float(re.search(r"^livedge_cache_bytes (\S+)", metrics, re.M).group(1)) <= 2**20
        redis_hits = float(re.search(r'livedge_tier_hits_total\{tier="redis"\} (\S+)',
                                     metrics).group(1))
        assert redis_hits >= served / 2


async def test_a_cluster_takes_the_write_through_and_feeds_a_replica(tmp_path, video):
    from edge.replica import ObjectReader, ReplicaDirectory, ReplicaState
    from tests.redis_server import redis_cluster

    track, samples = video
    with redis_cluster(tmp_path) as servers:
        config = RedisConfig(f"redis://127.0.0.1:{servers[0].port}/0", cluster=True)
        producer_tier = RedisTier(connect(config), SETTINGS, "node-a")
        reader_tier = RedisTier(connect(config), SETTINGS, "node-b")
        await producer_tier.start()
        await reader_tier.start()
        stream, told = producing(producer_tier)
        stream.add_track(track)
        for sample in samples[:60]:
            stream.add_sample(track.name, sample)
        await asyncio.wait_for(producer_tier.wait_drained(), 5)
        assert producer_tier.stats().errors == 0
        memory = MemoryCache(max_bytes=32 * 2**20)

        class NoLocal:
            def live_stream(self, name):
                return None

        directory = ReplicaDirectory(NoLocal(), reader_tier, ObjectReader(memory, reader_tier),
                                     memory, SETTINGS, reader_tier.part_target)
        replica = directory.live_stream("cam")
        await asyncio.wait_for(replica.loaded.wait(), 3)
        assert replica.state is ReplicaState.LIVE
        for sample in samples[60:]:
            stream.add_sample(track.name, sample)
        deadline = time.monotonic() + 3
        while replica.media_playlist(track.name) != stream.media_playlist(track.name):
            assert time.monotonic() < deadline
            await replica.wait_changed(track.name, 0.1)
        assert await replica.fetch_object(track.name, "seg1.m4s") == stream.object(track.name,
                                                                                   "seg1.m4s")
        # Objects spread over the masters; a stream's log and info share one slot.
        holders = 0
        for server in servers:
            direct = aioredis.from_url(server.url)
            holders += bool(await direct.dbsize())
            await direct.aclose()
        assert holders >= 2
        await directory.close()
        await producer_tier.close()
        await reader_tier.close()
