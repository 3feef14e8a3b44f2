"""The live window with real H.264/AAC from PyAV: stored objects decode, blocked requests wake."""

from __future__ import annotations

import asyncio
import io
from fractions import Fraction

import av
import numpy as np
import pytest

from edge.cache import MemoryCache
from ingest.media import EncodedSample, TrackInfo, TrackKind
from origin.live import LiveSettings, LiveStream, object_key
from origin.rendition import Readiness

SETTINGS = LiveSettings(segment_duration=1.0, part_duration=0.25, window_segments=4)


def encode_video(seconds: float, fps: int = 30) -> tuple[TrackInfo, list[EncodedSample]]:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 160, 90, "yuv420p"
    encoder.time_base = Fraction(1, 90_000)
    encoder.framerate = Fraction(fps, 1)
    encoder.flags |= av.codec.context.Flags.global_header
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0",
                       "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0"}
    samples = []
    for i in range(int(seconds * fps)):
        frame = av.VideoFrame.from_ndarray(np.full((90, 160, 3), i % 255, np.uint8), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i * 90_000 // fps
        for packet in encoder.encode(frame):
            samples.append(EncodedSample(packet.dts, packet.pts, 90_000 // fps, packet.is_keyframe,
                                         bytes(packet)))
    for packet in encoder.encode(None):
        samples.append(EncodedSample(packet.dts, packet.pts, 90_000 // fps, packet.is_keyframe,
                                     bytes(packet)))
    track = TrackInfo("90p", TrackKind.VIDEO, "h264", 90_000, bytes(encoder.extradata), 200_000,
                      width=160, height=90, frame_rate=float(fps))
    return track, samples


@pytest.fixture
def stream() -> LiveStream:
    return LiveStream("cam", SETTINGS, MemoryCache(max_bytes=8 * 1024 * 1024), clock=lambda: 1e9)


async def test_segments_in_the_store_decode_as_one_stream(stream):
    track, samples = encode_video(3.2)
    stream.add_track(track)
    for sample in samples:
        stream.add_sample("90p", sample)
    playlist = stream.media_playlist("90p")
    assert "#EXTINF:1.000,\nseg0.m4s" in playlist and "seg2.m4s" in playlist
    body = stream.init_segment("90p") + b"".join(stream.object("90p", f"seg{i}.m4s")
                                                 for i in range(3))
    with av.open(io.BytesIO(body), format="mp4") as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 90
    assert (frames[0].width, frames[0].height) == (160, 90)
    assert sum(1 for f in frames if f.key_frame) == 3


async def test_a_blocked_reload_wakes_when_its_part_arrives(stream):
    track, samples = encode_video(1.0)
    stream.add_track(track)
    for sample in samples[:8]:  # part 0 (0.25 s) is complete after frame 7
        stream.add_sample("90p", sample)
    assert stream.readiness("90p", 0, 1) is Readiness.WAIT
    waiter = asyncio.create_task(stream.wait_changed("90p", timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    for sample in samples[8:17]:
        stream.add_sample("90p", sample)
    assert await waiter
    assert stream.readiness("90p", 0, 1) is Readiness.READY
    assert 'URI="part0.1.m4s"' in stream.media_playlist("90p")


async def test_objects_that_leave_the_window_are_unpinned(stream):
    track, samples = encode_video(7.0)
    cache = stream._store
    stream.add_track(track)
    for sample in samples:
        stream.add_sample("90p", sample)
    assert "#EXT-X-MEDIA-SEQUENCE:2" in stream.media_playlist("90p")
    # Fill the budget: everything unpinned must make room, everything listed must stay.
    stats = cache.stats()
    assert cache.set_now("filler", b"x" * (stats.max_bytes - stats.pinned_bytes - 1))
    assert cache.get_now(object_key("cam", "90p", "seg0.m4s")) is None
    assert cache.get_now(object_key("cam", "90p", "part1.0.m4s")) is None
    for name in ("init.mp4", "seg2.m4s", "seg5.m4s", "part5.0.m4s", "part6.0.m4s"):
        assert cache.get_now(object_key("cam", "90p", name)) is not None, name


async def test_end_lists_endlist_and_wakes_waiters(stream):
    track, samples = encode_video(1.0)
    stream.add_track(track)
    for sample in samples:
        stream.add_sample("90p", sample)
    waiter = asyncio.create_task(stream.wait_changed("90p", timeout=5))
    await asyncio.sleep(0)
    stream.end()
    assert await waiter
    assert stream.media_playlist("90p").rstrip().endswith("#EXT-X-ENDLIST")
