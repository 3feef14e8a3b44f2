"""WebSocket ingest end to end: a real node (``livedge serve --demo``), real WebSocket publishers
sending containers made by PyAV, LL-HLS fetched and decoded. Every bad publisher is also checked not
to disturb the demo stream running next to it. Back-pressure and shutdown run in process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import time

import aiohttp
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from edge.cache import MemoryCache
from edge.config import load_settings
from edge.node import Node
from edge.publish import Publishing
from edge.tokens import DEFAULT_AUDIENCE, Scope, TokenSettings, TokenVerifier, issue_token
from edge.webhooks import Webhooks
from edge.ws_ingest import BitrateMeter, IngestLimits, WebSocketIngest
from tests.nodes import TEST_SECRET, RunningNode, running_node
from tests.test_container import FRAGMENTED_MP4, HTML_PAGE, encode_test_media
from tests.test_e2e_node import decode, get, wait_for_segments

pytestmark = pytest.mark.timeout(90)

NO_MEDIA_TIMEOUT = 2  # seconds, for the test node
MAX_BITRATE = 8_000_000  # bits per second, for the test node: above the 640x360 test media
CHUNK = 32 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("ws"), "--demo", PUBLISH_GRACE="3",
                      LIVEDGE_WS_NO_MEDIA_TIMEOUT=str(NO_MEDIA_TIMEOUT),
                      LIVEDGE_WS_MAX_BITRATE=str(MAX_BITRATE)) as running:
        yield running


def publish_token(stream: str | None, scope: Scope = Scope.PUBLISH, ttl: float = 86400) -> str:
    return issue_token(TEST_SECRET, "HS256", scope, stream, ttl, "tester")


def ingest(node: RunningNode | str, stream: str, token: str | None = None, *,
           in_query: bool = False, path: str | None = None, **kwargs):
    """A WebSocket client connection to ``stream``'s ingest URL on ``node`` (or a ws:// base URL),
    as an async context manager."""
    token = publish_token(stream) if token is None else token
    base = node if isinstance(node, str) else node.ws_url
    url = f"{base}{path or '/ingest/' + stream}"
    if in_query:
        return connect(f"{url}?token={token}", open_timeout=5, close_timeout=2, **kwargs)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(url, additional_headers=headers, open_timeout=5, close_timeout=2, **kwargs)


async def send_paced(ws: ClientConnection, data: bytes, seconds: float, speed: float = 1.0) -> None:
    """Send ``data`` (``seconds`` of media) as CHUNK-sized messages at ``speed`` x real time."""
    started = time.monotonic()
    for offset in range(0, len(data), CHUNK):
        delay = started + seconds * offset / len(data) / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(data[offset:offset + CHUNK])


async def closed_by_server(ws: ClientConnection, timeout: float = 10) -> Close:
    """The close frame the server sends (any message before it fails the test)."""
    try:
        message = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, f"no close frame from the server: {closed}"
        return closed.rcvd
    raise AssertionError(f"the server sent a message: {message!r}")


async def refused_status(node: RunningNode, stream: str, token: str | None,
                         **kwargs) -> tuple[int, str]:
    """The HTTP status and JSON message of a handshake the server refuses."""
    with pytest.raises(InvalidStatus) as refused:
        async with ingest(node, stream, token, **kwargs):
            pass
    response = refused.value.response
    assert response.headers["Content-Type"] == "application/json"
    return response.status_code, json.loads(response.body)["message"]


async def newest_part(session: aiohttp.ClientSession, playlist_url: str) -> tuple[int, int]:
    status, body = await get(session, playlist_url)
    assert status == 200, playlist_url
    parts = re.findall(r'#EXT-X-PART:[^\n]*URI="part(\d+)\.(\d+)\.m4s"', body.decode())
    assert parts, body.decode()
    return max((int(msn), int(part)) for msn, part in parts)


async def wait_for_new_part(session, playlist_url: str, after: tuple[int, int],
                            timeout: float = 8) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        newest = await newest_part(session, playlist_url)
        if newest > after:
            return newest
        if time.monotonic() > deadline:
            raise AssertionError(f"{playlist_url}: no part after {after} in {timeout} s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def demo_unaffected(node: RunningNode):
    """Asserts that the demo stream produced parts during the block and keeps producing after it,
    and that the node process is alive and serving."""
    playlist = f"{node.url}/hls/demo/180p/index.m3u8"
    async with aiohttp.ClientSession() as session:
        await wait_for_segments(session, playlist, 1)
        before = await newest_part(session, playlist)
        yield
        during = await wait_for_new_part(session, playlist, before)
        await wait_for_new_part(session, playlist, during)
        status, _ = await get(session, f"{node.url}/healthz")
        assert status == 200
    assert node.process.poll() is None


# -- pure parts ----------------------------------------------------------------------------------

def test_bitrate_meter_averages_over_the_whole_window():
    meter = BitrateMeter(window=2.0)
    meter.add(250_000, now=10.0)
    meter.add(250_000, now=11.0)
    assert meter.bits_per_second(11.0) == 2_000_000  # 4 Mbit over a 2 s window
    assert meter.bits_per_second(12.0) == 1_000_000  # the first arrival left the window
    assert meter.bits_per_second(13.5) == 0


def test_limits_from_the_environment():
    assert IngestLimits.from_environment({}) == IngestLimits()
    limits = IngestLimits.from_environment({"LIVEDGE_WS_NO_MEDIA_TIMEOUT": "2.5",
                                            "LIVEDGE_WS_MAX_BITRATE": "4000000"})
    assert (limits.no_media_timeout, limits.max_bitrate) == (2.5, 4_000_000)
    for bad in ({"LIVEDGE_WS_NO_MEDIA_TIMEOUT": "soon"}, {"LIVEDGE_WS_MAX_BITRATE": "0"}):
        with pytest.raises(ValueError):
            IngestLimits.from_environment(bad)


# -- publishing and playing ----------------------------------------------------------------------

PUBLISHED_MEDIA = {
    "webm-vp8-opus": ("webm", "libvpx", "libopus", None, (640, 360)),
    "ts-h264-aac": ("mpegts", "libx264", "aac", None, (320, 180)),
    "ts-h264-mp2": ("mpegts", "libx264", "mp2", None, (320, 180)),
    "fmp4-h264-aac": ("mp4", "libx264", "aac", FRAGMENTED_MP4, (320, 180)),
}


@pytest.mark.parametrize("name", list(PUBLISHED_MEDIA))
async def test_a_published_container_plays_over_ll_hls(node, name):
    container, video, audio, options, size = PUBLISHED_MEDIA[name]
    seconds = 4
    data = encode_test_media(container, video, audio, seconds=seconds, size=size, options=options)
    stream = f"ws-{name}"
    base = f"{node.url}/hls/{stream}"
    async with demo_unaffected(node), aiohttp.ClientSession() as session:
        async with ingest(node, stream, in_query=name.startswith("webm")) as ws:
            started = time.monotonic()
            sending = asyncio.create_task(send_paced(ws, data, seconds))
            # The first part is out within a couple of seconds, not after FFmpeg's default probe.
            while True:
                status, body = await get(session, f"{base}/180p/index.m3u8")
                if status == 200 and b"#EXT-X-PART:" in body:
                    break
                assert time.monotonic() - started < 4, "no part 4 s after the first byte"
                await asyncio.sleep(0.1)
            await sending
        status, body = await get(session, f"{base}/index.m3u8")
        assert status == 200
        multivariant = body.decode()
        variants = re.findall(r"#EXT-X-STREAM-INF:(.*)\n(.*)", multivariant)
        expected = ["360p/index.m3u8", "180p/index.m3u8"] if size == (640, 360) \
            else ["180p/index.m3u8"]
        assert [uri for _, uri in variants] == expected
        assert all(re.search(r'CODECS="avc1\.[0-9a-f]{6},mp4a\.40\.2"', a) for a, _ in variants)
        audio_uri = re.search(r'#EXT-X-MEDIA:TYPE=AUDIO,[^\n]*URI="([^"]+)"', multivariant).group(1)
        for uri in [uri for _, uri in variants] + [audio_uri]:
            rendition = uri.split("/")[0]
            playlist = await wait_for_segments(session, f"{base}/{uri}", 3, timeout=10)
            msn = re.findall(r"^seg(\d+)\.m4s$", playlist, re.M)[1]  # a whole segment
            _, init = await get(session, f"{base}/{rendition}/init.mp4")
            status, segment = await get(session, f"{base}/{rendition}/seg{msn}.m4s")
            assert status == 200, rendition
            frames = decode(init, segment)
            if rendition == "audio":
                assert frames[0].sample_rate == 48_000
                assert sum(f.samples for f in frames) / 48_000 == pytest.approx(1.0, abs=0.1)
            else:
                assert frames[0].height == int(rendition.removesuffix("p"))
                assert frames[0].key_frame
                assert len(frames) == pytest.approx(30, abs=2)


async def publish_when_free(node: RunningNode, stream: str, data: bytes, seconds: float,
                            timeout: float = 5) -> float:
    """Publish ``data`` once the previous session of ``stream`` has ended on the server (until
    then a new publisher is refused with "already being published"); returns the seconds waited."""
    started = time.monotonic()
    while True:
        async with ingest(node, stream) as ws:
            try:
                close = await closed_by_server(ws, timeout=0.3)
            except TimeoutError:
                waited = time.monotonic() - started
                await send_paced(ws, data, seconds)
                return waited
        assert "already being published" in close.reason, close
        assert time.monotonic() - started < timeout, "the previous session did not end"
        await asyncio.sleep(0.1)


async def test_a_reconnect_within_the_grace_period_continues_with_one_discontinuity(node):
    data = encode_test_media("mpegts", "libx264", "aac", seconds=2.5)
    stream = "ws-reconnect"
    playlist_url = f"{node.url}/hls/{stream}/180p/index.m3u8"
    async with aiohttp.ClientSession() as session:
        async with ingest(node, stream) as ws:
            await send_paced(ws, data, 2.5)
        first = await wait_for_segments(session, playlist_url, 2)
        waited = await publish_when_free(node, stream, data, 2.5)  # within PUBLISH_GRACE (3 s)
        assert waited < 1.5
        deadline = time.monotonic() + 10
        while True:
            _, body = await get(session, playlist_url)
            text = body.decode()
            if len(re.findall(r"^seg\d+\.m4s$", text, re.M)) >= 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert text.count("#EXT-X-DISCONTINUITY\n") == 1
    first_segment = re.findall(r"^seg(\d+)\.m4s$", first, re.M)[0]
    assert f"seg{first_segment}.m4s" in text  # the same playlist, continued
    assert len(re.findall(r"^seg\d+\.m4s$", text, re.M)) >= 4


# -- refused before the upgrade ------------------------------------------------------------------

async def test_no_token_is_401(node):
    async with demo_unaffected(node):
        status, message = await refused_status(node, "ws-auth", "")
    assert (status, message) == (401, "missing token")


@pytest.mark.parametrize("token", [
    "not-a-jwt",
    issue_token("another-secret-" + "y" * 32, "HS256", Scope.PUBLISH, "ws-auth", 86400, "x"),
    issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "ws-auth", -60, "x"),  # expired
])
async def test_an_unusable_token_is_401(node, token):
    status, _ = await refused_status(node, "ws-auth", token)
    assert status == 401


async def test_an_unusable_token_in_the_query_is_401(node):
    status, _ = await refused_status(node, "ws-auth", "garbage", in_query=True)
    assert status == 401


@pytest.mark.parametrize("token, message", [
    (publish_token("someone-else"), "token does not cover this stream"),
    (publish_token("ws-auth", Scope.PLAY), "token does not grant publish"),
])
async def test_a_token_for_another_stream_or_scope_is_403(node, token, message):
    async with demo_unaffected(node):
        assert await refused_status(node, "ws-auth", token) == (403, message)


@pytest.mark.parametrize("path, status", [
    ("/ingest/..%2Fetc", 400),
    ("/ingest/a%20b", 400),
    ("/ingest/" + "a" * 65, 400),
    ("/ingest/", 400),
    ("/publish/ws-auth", 404),
    ("/", 404),
])
async def test_bad_paths_are_refused(node, path, status):
    got, _ = await refused_status(node, "ws-auth", publish_token("*"), path=path)
    assert got == status


# -- closed after the upgrade --------------------------------------------------------------------

async def test_random_bytes_are_closed_1003(node):
    async with demo_unaffected(node), ingest(node, "ws-random") as ws:
        await ws.send(random.Random(1).randbytes(64 * 1024))
        close = await closed_by_server(ws)
    assert close.code == 1003 and "unsupported data" in close.reason


async def test_an_html_page_is_closed_1003(node):
    async with demo_unaffected(node), ingest(node, "ws-html") as ws:
        await ws.send(HTML_PAGE)
        close = await closed_by_server(ws)
    assert close.code == 1003
    assert "not WebM/Matroska, MPEG-TS or fragmented MP4" in close.reason


async def test_text_messages_are_closed_1003(node):
    async with demo_unaffected(node), ingest(node, "ws-text") as ws:
        await ws.send("hello, is this thing on?")
        close = await closed_by_server(ws)
    assert close.code == 1003 and "text" in close.reason


@pytest.mark.parametrize("name", ["webm-vp8-opus", "ts-h264-aac", "fmp4-h264-aac"])
async def test_garbage_behind_a_valid_header_is_closed(node, name):
    container, video, audio, options, _ = PUBLISHED_MEDIA[name]
    head = encode_test_media(container, video, audio, seconds=1, options=options)[:600]
    async with demo_unaffected(node), ingest(node, f"ws-garbage-{name}") as ws:
        await ws.send(head)
        with contextlib.suppress(ConnectionClosed):
            await send_paced(ws, random.Random(2).randbytes(300_000), 1.0)
        close = await closed_by_server(ws)
    # Every demuxer resyncs through garbage looking for its next header: nothing ever decodes.
    assert (close.code, close.reason) == (1008, f"no media for {NO_MEDIA_TIMEOUT} s")


async def test_an_mp4_with_its_index_at_the_end_is_closed_1003(node):
    data = encode_test_media("mp4", "libx264", "aac", seconds=2)  # moov after mdat: not streamable
    async with demo_unaffected(node), ingest(node, "ws-mp4-moov-last") as ws:
        with contextlib.suppress(ConnectionClosed):
            await send_paced(ws, data, 2, speed=4)
        close = await closed_by_server(ws)
    assert close.code == 1003 and close.reason.startswith("unsupported data: ")


async def test_a_truncated_header_is_closed_for_no_media(node):
    data = encode_test_media("webm", "libvpx", "libopus", seconds=1)
    async with demo_unaffected(node), ingest(node, "ws-truncated") as ws:
        await ws.send(data[:200])  # the header, cut short; then silence
        started = time.monotonic()
        close = await closed_by_server(ws)
    assert (close.code, close.reason) == (1008, f"no media for {NO_MEDIA_TIMEOUT} s")
    assert NO_MEDIA_TIMEOUT - 0.5 <= time.monotonic() - started <= NO_MEDIA_TIMEOUT + 2


async def test_a_publisher_that_sends_nothing_is_closed_for_no_media(node):
    async with demo_unaffected(node), ingest(node, "ws-silent") as ws:
        close = await closed_by_server(ws)
    assert (close.code, close.reason) == (1008, f"no media for {NO_MEDIA_TIMEOUT} s")


async def test_a_publisher_that_stalls_is_closed_for_no_media(node):
    data = encode_test_media("mpegts", "libx264", "aac", seconds=3)
    async with demo_unaffected(node), ingest(node, "ws-stall") as ws:
        await send_paced(ws, data[:len(data) // 3], 1.0)  # a second of media, then nothing
        close = await closed_by_server(ws)
    assert close.code == 1008 and close.reason.startswith("no media")


async def test_a_too_big_message_is_closed_1009(node):
    async with demo_unaffected(node), ingest(node, "ws-big") as ws:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(bytes(1024 * 1024 + 1))
        close = await closed_by_server(ws)
    assert close.code == 1009


async def test_a_bitrate_over_the_limit_is_closed_1008(node):
    # Uncompressed 320x180 video in Matroska: valid media at ~20 Mbit/s, sent as fast as possible.
    data = encode_test_media("matroska", "rawvideo", "pcm_s16le", seconds=3)
    async with demo_unaffected(node), ingest(node, "ws-bitrate") as ws:
        with contextlib.suppress(ConnectionClosed):
            await send_paced(ws, data, 3, speed=100)
        close = await closed_by_server(ws)
    assert close.code == 1008 and close.reason.startswith("bitrate limit")


async def test_a_second_publisher_of_a_live_stream_is_closed_1008(node):
    data = encode_test_media("mpegts", "libx264", "aac", seconds=3)
    async with demo_unaffected(node), ingest(node, "ws-twice") as first:
        sending = asyncio.create_task(send_paced(first, data, 3))
        await asyncio.sleep(1)
        async with ingest(node, "ws-twice") as second:
            close = await closed_by_server(second)
        await sending  # the first publisher was not disturbed
    assert close.code == 1008 and "already being published" in close.reason


async def test_a_takeover_closes_the_old_publisher_with_1008(node):
    data = encode_test_media("mpegts", "libx264", "aac", seconds=3)
    takeover = jwt.encode({"scope": "publish", "stream": "ws-takeover", "takeover": True,
                           "aud": DEFAULT_AUDIENCE, "exp": int(time.time()) + 60, "sub": "tester"},
                          TEST_SECRET, "HS256")
    async with demo_unaffected(node), ingest(node, "ws-takeover") as first:
        sending = asyncio.create_task(send_paced(first, data, 3))
        await asyncio.sleep(1)
        async with ingest(node, "ws-takeover", takeover) as second:
            close = await closed_by_server(first)
            with contextlib.suppress(ConnectionClosed):
                await sending
            await send_paced(second, data, 1)
            assert second.close_code is None  # the new publisher is live
    assert (close.code, close.reason) == (1008, "taken over by a new publisher")


# -- in process: back-pressure and shutdown --------------------------------------------------------

@pytest.fixture
async def in_process():
    """A WebSocketIngest on a free port over a real node and publishing, in this process."""
    settings = load_settings({"LADDER": "180p:320x180:250k", "SEGMENT_DURATION": "1",
                              "PART_DURATION": "0.25", "X264_PRESET": "ultrafast",
                              "PUBLISH_GRACE": "1", "WINDOW_SEGMENTS": "3"}, None)
    node = Node(settings, MemoryCache(64 * 1024 * 1024))
    publishing = Publishing(node, Webhooks(None, None))
    node.publishing = publishing
    verifier = TokenVerifier(TokenSettings(secret=TEST_SECRET))
    server = WebSocketIngest(publishing, lambda: verifier, "127.0.0.1", 0,
                             IngestLimits(buffer_bytes=64 * 1024, no_media_timeout=5))
    assert await server.start()
    yield server, node, publishing
    await server.close()
    await publishing.close()
    await node.close()


def small_send_buffer_socket(port: int) -> socket.socket:
    """A client socket whose kernel send buffer is 16 KiB, so that what the server does not read
    stalls the sender soon instead of piling up in megabytes of loopback buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_a_publisher_faster_than_real_time_is_held_to_it(in_process):
    server, node, _ = in_process
    seconds = 8
    data = encode_test_media("mpegts", "libx264", "aac", seconds=seconds)
    async with ingest(f"ws://127.0.0.1:{server.port}", "fast",
                      sock=small_send_buffer_socket(server.port)) as ws:
        started = time.monotonic()
        await send_paced(ws, data, seconds, speed=1000)  # as fast as the socket takes it
        took = time.monotonic() - started
        # The server decodes at the media clock and reads no further ahead than its buffers: the
        # sender waits (TCP back-pressure) instead of the node's memory growing. Unthrottled, the
        # send takes ~10 ms; here the kernel's loopback buffers absorb ~1.4 MB before it stalls.
        assert took >= 0.5, f"{len(data)} bytes taken in {took:.2f} s"
        playlist = node.live_stream("fast").media_playlist("180p")
        produced = sum(float(d) for d in re.findall(r"#EXTINF:([\d.]+),", playlist))
        assert produced <= took + 1  # the live window is not ahead of the wall clock


async def test_closing_the_server_closes_publishers_1001_and_ends_their_publications(in_process):
    server, _, publishing = in_process
    data = encode_test_media("mpegts", "libx264", "aac", seconds=2)
    async with ingest(f"ws://127.0.0.1:{server.port}", "closing") as ws:
        await send_paced(ws, data[:len(data) // 2], 1)
        assert publishing.active("closing") is not None
        await server.close()
        close = await closed_by_server(ws)
    assert close.code == 1001
    assert publishing.active("closing") is None


async def test_a_node_shutdown_evicts_publishers_with_1008(in_process):
    server, _, publishing = in_process
    data = encode_test_media("mpegts", "libx264", "aac", seconds=2)
    async with ingest(f"ws://127.0.0.1:{server.port}", "evicted") as ws:
        await send_paced(ws, data[:len(data) // 2], 1)
        await publishing.close()
        close = await closed_by_server(ws)
    assert (close.code, close.reason) == (1008, "the node is shutting down")
