"""End to end: a real node process, a live source, LL-HLS played by FFmpeg's HLS demuxer (PyAV)."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import time
from pathlib import Path

import aiohttp
import av
import pytest

from tests.media_files import write_h264_aac
from tests.nodes import TEST_SECRET, running_node

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def demo_node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("demo"), "--demo") as node:
        yield node


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def wait_for_segments(session, playlist_url: str, count: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = await get(session, playlist_url)
        text = body.decode()
        if status == 200 and len(re.findall(r"^seg\d+\.m4s(\?\S*)?$", text, re.M)) >= count:
            return text
        await asyncio.sleep(0.3)
    raise AssertionError(f"fewer than {count} segments in time at {playlist_url}")


def decode(init: bytes, segment: bytes) -> list:
    with av.open(io.BytesIO(init + segment), format="mp4") as container:
        return list(container.decode(container.streams[0]))


async def test_multivariant_lists_every_rung_with_real_codecs(demo_node):
    async with aiohttp.ClientSession() as session:
        status, body = await get(session, f"{demo_node.url}/hls/demo/index.m3u8")
    assert status == 200
    text = body.decode()
    assert "#EXT-X-INDEPENDENT-SEGMENTS" in text
    assert re.search(r'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aac".*URI="audio/index.m3u8"', text)
    variants = re.findall(r"#EXT-X-STREAM-INF:(.*)\n(.*)", text)
    assert [uri for _, uri in variants] == ["360p/index.m3u8", "180p/index.m3u8"]
    for attributes, _ in variants:
        assert re.search(r'CODECS="avc1\.[0-9a-f]{6},mp4a\.40\.2"', attributes)
        assert "FRAME-RATE=30.000" in attributes and 'AUDIO="aac"' in attributes
    assert "RESOLUTION=640x360" in variants[0][0] and "RESOLUTION=320x180" in variants[1][0]


async def test_renditions_have_aligned_keyframes_and_audio_in_sync(demo_node):
    base = f"{demo_node.url}/hls/demo"
    async with aiohttp.ClientSession() as session:
        playlist = await wait_for_segments(session, f"{base}/360p/index.m3u8", 3)
        msn = int(re.findall(r"^seg(\d+)\.m4s$", playlist, re.M)[-1])
        starts = {}
        for rendition, size in (("360p", (640, 360)), ("180p", (320, 180)), ("audio", None)):
            await wait_for_segments(session, f"{base}/{rendition}/index.m3u8", 3)
            _, init = await get(session, f"{base}/{rendition}/init.mp4")
            status, segment = await get(session, f"{base}/{rendition}/seg{msn}.m4s")
            assert status == 200, rendition
            frames = decode(init, segment)
            assert frames, rendition
            starts[rendition] = float(frames[0].time)
            if size:
                assert (frames[0].width, frames[0].height) == size
                assert frames[0].key_frame
                assert sum(f.key_frame for f in frames) == 1  # one IDR, at the boundary
                assert len(frames) == pytest.approx(30, abs=1)
            else:
                assert frames[0].sample_rate == 48_000 and len(frames[0].layout.channels) == 2
    assert starts["360p"] == starts["180p"]  # IDRs at the same presentation time
    assert abs(starts["audio"] - starts["360p"]) <= 1 / 30 + 1024 / 48_000


async def test_ffmpeg_hls_demuxer_plays_every_rendition(demo_node):
    url = f"{demo_node.url}/hls/demo/index.m3u8"

    def play() -> dict[str, int]:
        counts: dict[str, int] = {}
        with av.open(url, options={"live_start_index": "-3"}, timeout=20) as container:
            deadline = time.monotonic() + 4
            for packet in container.demux():
                if packet.size == 0 or packet.dts is None:
                    continue
                stream = packet.stream
                key = f"{stream.type}:{stream.codec_context.width}" if stream.type == "video" \
                    else stream.type
                for frame in packet.decode():
                    counts[key] = counts.get(key, 0) + 1
                if time.monotonic() > deadline:
                    break
        return counts

    counts = await asyncio.to_thread(play)
    assert counts.get("video:640", 0) >= 20
    assert counts.get("video:320", 0) >= 20
    assert counts.get("audio", 0) >= 20


async def test_blocking_reload_returns_when_the_next_part_exists(demo_node):
    base = f"{demo_node.url}/hls/demo/360p/index.m3u8"
    async with aiohttp.ClientSession() as session:
        text = await wait_for_segments(session, base, 1)
        hint = re.search(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"', text)
        msn, part = int(hint.group(1)), int(hint.group(2))
        started = time.monotonic()
        status, body = await get(session, f"{base}?_HLS_msn={msn}&_HLS_part={part}")
        waited = time.monotonic() - started
        assert status == 200
        assert f'URI="part{msn}.{part}.m4s"' in body.decode()
        # Answered by the part's arrival (a part is 0.25 s), not by the 3-target-duration timeout.
        assert waited < 2.0
        # The preload-hinted part itself, requested before it exists, is held and sent whole.
        hint = re.search(r'PRELOAD-HINT:TYPE=PART,URI="(part\d+\.\d+\.m4s)"', body.decode()).group(1)
        status, data = await get(session, f"{demo_node.url}/hls/demo/360p/{hint}")
        assert status == 200 and data[4:8] == b"moof"


@pytest.mark.parametrize("query, status", [
    ("_HLS_msn=abc", 400),
    ("_HLS_msn=-1", 400),
    ("_HLS_part=1", 400),  # a part without an msn
    ("_HLS_msn=99999999", 400),  # too far beyond the live edge
    ("_HLS_msn=1&_HLS_part=x", 400),
    ("_HLS_skip=maybe", 400),
    ("_HLS_msn=" + "9" * 40, 400),
])
async def test_garbage_hls_parameters_get_400_json(demo_node, query, status):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{demo_node.url}/hls/demo/360p/index.m3u8?{query}") as response:
            assert response.status == status
            assert "message" in await response.json()


@pytest.mark.parametrize("path, status", [
    ("/hls/..%2Fetc/index.m3u8", 400),
    ("/hls/no-such-stream/index.m3u8", 404),
    ("/hls/demo/1080p/index.m3u8", 404),  # above the source: never made
    ("/hls/demo/360p/../../x", 404),
    ("/hls/demo/360p/part0.0.m4s.bak", 404),
    ("/hls/" + "a" * 300 + "/index.m3u8", 400),
])
async def test_bad_paths_get_json_errors(demo_node, path, status):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{demo_node.url}{path}") as response:
            assert response.status == status
            assert "message" in await response.json()


async def test_api_streams_needs_admin_and_reports_renditions(demo_node):
    from edge.tokens import Scope, issue_token
    admin = issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 60, "test")
    play = issue_token(TEST_SECRET, "HS256", Scope.PLAY, "*", 60, "test")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{demo_node.url}/api/streams") as response:
            assert response.status == 401
        async with session.get(f"{demo_node.url}/api/streams",
                               headers={"Authorization": f"Bearer {play}"}) as response:
            assert response.status == 403
        async with session.get(f"{demo_node.url}/api/streams",
                               headers={"Authorization": f"Bearer {admin}"}) as response:
            assert response.status == 200
            streams = (await response.json())["streams"]
    demo = next(s for s in streams if s["name"] == "demo")
    assert {r["name"] for r in demo["renditions"]} == {"360p", "180p", "audio"}
    assert demo["live"] and demo["parts_produced"] > 0


async def test_metrics_expose_the_pipeline(demo_node):
    async with aiohttp.ClientSession() as session:
        await wait_for_segments(session, f"{demo_node.url}/hls/demo/360p/index.m3u8", 1)
        status, body = await get(session, f"{demo_node.url}/metrics")
    text = body.decode()
    assert status == 200
    for name in ("livedge_parts_produced_total", "livedge_transcode_realtime_factor",
                 "livedge_event_loop_lag_seconds", "livedge_cache_bytes",
                 "livedge_http_requests_total", "livedge_blocked_requests"):
        assert name in text, name
    parts = re.search(r'livedge_parts_produced_total\{stream="demo"\} (\S+)', text)
    assert parts and float(parts.group(1)) > 0


@pytest.fixture(scope="module")
def media_file(tmp_path_factory) -> Path:
    """A 4 s 640x360 H.264/AAC file made with PyAV's own FFmpeg (lavfi test sources)."""
    return write_h264_aac(tmp_path_factory.mktemp("media") / "source.mp4", 4)


async def test_a_pulled_file_plays_and_bad_pulls_do_not_hurt_it(tmp_path, media_file):
    not_media = tmp_path / "notes.txt"
    not_media.write_text("this is not media\n" * 100)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(media_file.read_bytes()[:4000] + bytes(20000))
    pulls = (f"file=file:{media_file},text=file:{not_media},broken=file:{corrupt},"
             f"missing=file:{tmp_path}/none.mp4")
    from edge.tokens import Scope, issue_token
    admin = issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 60, "test")
    with running_node(tmp_path, PULL_STREAMS=pulls) as node:
        async with aiohttp.ClientSession() as session:
            text = await wait_for_segments(session, f"{node.url}/hls/file/360p/index.m3u8", 2)
            assert "#EXT-X-PART:" in text
            async with session.get(f"{node.url}/api/streams",
                                   headers={"Authorization": f"Bearer {admin}"}) as response:
                streams = {s["name"]: s for s in (await response.json())["streams"]}
            for name in ("text", "broken", "missing"):
                assert streams[name]["source"]["state"] in ("backoff", "connecting"), name
            assert streams["text"]["source"]["last_error"]
            status, _ = await get(session, f"{node.url}/hls/text/index.m3u8")
            assert status in (404, 503)
            # The 4 s file ends: the source reconnects and the playlists carry on after a
            # discontinuity, with no gap in media sequence numbers.
            deadline = time.monotonic() + 30
            while "#EXT-X-DISCONTINUITY\n" not in text:
                assert time.monotonic() < deadline, "no discontinuity after the file ended"
                await asyncio.sleep(0.5)
                text = (await get(session, f"{node.url}/hls/file/360p/index.m3u8"))[1].decode()
            msns = [int(n) for n in re.findall(r"^seg(\d+)\.m4s$", text, re.M)]
            assert msns == list(range(msns[0], msns[0] + len(msns)))
        assert node.process.poll() is None


async def test_api_creates_and_deletes_pulls(tmp_path, media_file):
    from edge.tokens import Scope, issue_token
    admin = {"Authorization": "Bearer " + issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 60,
                                                      "ops")}
    with running_node(tmp_path) as node:
        async with aiohttp.ClientSession(headers=admin) as session:
            async with session.post(f"{node.url}/api/streams",
                                    json={"name": "cam", "url": f"file:{media_file}"}) as response:
                assert response.status == 201
                assert (await response.json())["playlist"] == "/hls/cam/index.m3u8"
            async with session.post(f"{node.url}/api/streams",
                                    json={"name": "cam", "url": f"file:{media_file}"}) as response:
                assert response.status == 409
            for body in ({"name": "../x", "url": "file:/x"}, {"name": "ok"}, [1, 2]):
                async with session.post(f"{node.url}/api/streams", json=body) as response:
                    assert response.status == 400
                    assert "message" in await response.json()
            async with session.post(f"{node.url}/api/streams", data=b"{not json") as response:
                assert response.status == 400
            await wait_for_segments(session, f"{node.url}/hls/cam/180p/index.m3u8", 1)
            async with session.delete(f"{node.url}/api/streams/cam") as response:
                assert response.status == 204
            assert (await get(session, f"{node.url}/hls/cam/index.m3u8"))[0] == 404
            async with session.delete(f"{node.url}/api/streams/cam") as response:
                assert response.status == 404


async def test_playback_auth_requires_a_play_token_for_that_stream(tmp_path):
    from edge.tokens import Scope, issue_token
    good = issue_token(TEST_SECRET, "HS256", Scope.PLAY, "demo", 60, "viewer")
    other = issue_token(TEST_SECRET, "HS256", Scope.PLAY, "other-*", 60, "viewer")
    with running_node(tmp_path, "--demo", PLAYBACK_AUTH="token") as node:
        base = f"{node.url}/hls/demo"
        async with aiohttp.ClientSession() as session:
            assert (await get(session, f"{base}/index.m3u8"))[0] == 401
            assert (await get(session, f"{base}/index.m3u8?token=garbage"))[0] == 401
            assert (await get(session, f"{base}/index.m3u8?token={other}"))[0] == 403
            status, body = await get(session, f"{base}/index.m3u8?token={good}")
            assert status == 200
            # The token rides on every URI the playlists list, so players need nothing else.
            variant = re.search(r"^(360p/index\.m3u8\?token=\S+)$", body.decode(), re.M).group(1)
            text = await wait_for_segments(session, f"{base}/{variant}", 1)
            segment = re.search(r"^(seg\d+\.m4s\?token=\S+)$", text, re.M).group(1)
            assert f"init.mp4?token={good}" in text
            assert (await get(session, f"{base}/360p/{segment}"))[0] == 200
            assert (await get(session, f"{base}/360p/{segment.split('?')[0]}"))[0] == 401
            assert (await get(session, f"{base}/360p/{segment.split('?')[0]}?token={other}"))[0] \
                == 403


@pytest.fixture(scope="module", params=[0, 2], ids=["no-b-frames", "b-frames"])
def h264_file(tmp_path_factory, request) -> Path:
    """A 5 s 640x360 H.264 (GOP 1 s) + AAC MP4, with or without B-frames."""
    return write_h264_aac(tmp_path_factory.mktemp("h264") / f"bf{request.param}.mp4", 5,
                          video_options={"bf": str(request.param),
                                         "x264-params": "keyint=30:min-keyint=30:scenecut=0"})


async def test_passthrough_republishes_the_source_aligned_with_the_ladder(tmp_path, h264_file):
    with running_node(tmp_path, PULL_STREAMS=f"cam=file:{h264_file}",
                      PASSTHROUGH_SOURCE="true") as node:
        base = f"{node.url}/hls/cam"
        async with aiohttp.ClientSession() as session:
            text = await wait_for_segments(session, f"{base}/source/index.m3u8", 3)
            status, body = await get(session, f"{base}/index.m3u8")
            assert status == 200 and "source/index.m3u8" in body.decode()
            assert "RESOLUTION=640x360" in body.decode()
            await wait_for_segments(session, f"{base}/180p/index.m3u8", 3)
            msn = re.findall(r"^seg(\d+)\.m4s$", text, re.M)[1]
            starts = {}
            for rendition in ("source", "180p"):
                _, init = await get(session, f"{base}/{rendition}/init.mp4")
                status, segment = await get(session, f"{base}/{rendition}/seg{msn}.m4s")
                assert status == 200, rendition
                frames = decode(init, segment)
                assert frames[0].key_frame and len(frames) == pytest.approx(30, abs=1)
                starts[rendition] = float(frames[0].time)
            assert starts["source"] == pytest.approx(starts["180p"], abs=0.002)
            # Not re-encoded: every coded slice the source rendition carries is one of the file's.
            _, init = await get(session, f"{base}/source/init.mp4")
            _, segment = await get(session, f"{base}/source/seg{msn}.m4s")
    with av.open(io.BytesIO(init + segment), format="mp4") as served, \
            av.open(str(h264_file)) as original:
        served_slices = {nal for packet in served.demux(video=0) for nal in _slices(bytes(packet))}
        file_slices = {nal for packet in original.demux(video=0) for nal in _slices(bytes(packet))}
    assert served_slices and served_slices <= file_slices


def _slices(avcc: bytes) -> list[bytes]:
    """The coded slice NAL units (types 1 and 5) of a length-prefixed access unit."""
    slices, offset = [], 0
    while offset + 4 <= len(avcc):
        size = int.from_bytes(avcc[offset:offset + 4], "big")
        nal = avcc[offset + 4:offset + 4 + size]
        if nal and nal[0] & 0x1F in (1, 5):
            slices.append(nal)
        offset += 4 + size
    return slices


@pytest.mark.parametrize("sent, echoed", [("abc-123", True), ("bad id\twith spaces", False),
                                          ("x" * 100, False)])
async def test_responses_carry_a_request_id(demo_node, sent, echoed):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{demo_node.url}/healthz",
                               headers={"X-Request-Id": sent}) as response:
            rid = response.headers["X-Request-Id"]
    assert (rid == sent) is echoed
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", rid)
