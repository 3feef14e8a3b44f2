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
from origin.live import ANY_RENDITION, LiveSettings, LiveStream, object_key
from origin.rendition import Readiness

SETTINGS = LiveSettings(segment_duration=1.0, part_duration=0.25, window_segments=4)


def encode_video(seconds: float, fps: int = 30,
                 size: tuple[int, int] = (160, 90)) -> tuple[TrackInfo, list[EncodedSample]]:
    width, height = size
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, 90_000)
    encoder.framerate = Fraction(fps, 1)
    encoder.flags |= av.codec.context.Flags.global_header
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0",
                       "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0"}
    samples = []
    for i in range(int(seconds * fps)):
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i % 255, np.uint8),
                                           format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i * 90_000 // fps
        for packet in encoder.encode(frame):
            samples.append(EncodedSample(packet.dts, packet.pts, 90_000 // fps, packet.is_keyframe,
                                         bytes(packet)))
    for packet in encoder.encode(None):
        samples.append(EncodedSample(packet.dts, packet.pts, 90_000 // fps, packet.is_keyframe,
                                     bytes(packet)))
    track = TrackInfo("90p", TrackKind.VIDEO, "h264", 90_000, bytes(encoder.extradata), 200_000,
                      width=width, height=height, frame_rate=float(fps))
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


async def test_callbacks_on_any_rendition_run_at_a_change_of_one(stream):
    track, samples = encode_video(1.0)
    stream.add_track(track)
    calls = []
    stream.call_on_change(ANY_RENDITION, lambda: calls.append("any"))
    stream.call_on_change("90p", lambda: calls.append("90p"))
    stream.call_on_change("other", lambda: calls.append("other"))
    assert not stream.is_ready()
    for sample in samples[:9]:  # part 0 completes: the stream becomes ready
        stream.add_sample("90p", sample)
    assert stream.is_ready()
    assert sorted(calls) == ["90p", "any"]  # once each; the other rendition's stays registered


def test_the_multivariant_playlist_is_rendered_once_per_change(stream):
    track, samples = encode_video(3.2)
    stream.add_track(track)
    for sample in samples[:20]:  # the first segment (1 s) is not complete yet
        stream.add_sample("90p", sample)
    first = stream.multivariant_playlist("token=a")
    assert stream.multivariant_playlist("token=a") is first  # shared until a change
    assert "token=a" not in stream.multivariant_playlist()  # each carried query its own
    for sample in samples[20:]:  # segments complete: the bandwidth is measured, not the target
        stream.add_sample("90p", sample)
    later = stream.multivariant_playlist("token=a")
    assert later is not first and later != first
    assert "BANDWIDTH=250000," in first and "BANDWIDTH=250000," not in later


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


# -- resuming a log its producer left inside a segment (a crash) -------------------------------------
def crashed_log(seconds: float) -> tuple[TrackInfo, list, MemoryCache, list]:
    """A stream fed ``seconds`` of video and never ended: its log (as a shared log gives it back,
    without media bytes) stops inside a segment, as a producer killed with SIGKILL leaves it."""
    from origin.wire import decode_event, encode_event
    track, samples = encode_video(seconds + 2)
    store = MemoryCache(max_bytes=32 * 2**20)
    old = LiveStream("cam", SETTINGS, store, clock=lambda: 1e9)
    told: list = []
    old.listeners.append(lambda _, event: told.append(event))
    old.add_track(track)
    for sample in samples[:int(seconds * 30)]:
        old.add_sample(track.name, sample)
    return track, samples, store, [decode_event(encode_event(event)) for event in told]


async def test_resume_from_a_log_ending_inside_a_segment_closes_it_and_continues_after_it():
    from origin.packager import PartReady, SegmentOpened, SegmentReady
    track, samples, old_store, history = crashed_log(3.6)  # segments 0-2, then 2 parts of 3
    assert not isinstance(history[-1], SegmentReady)
    partial = [e for e in history if isinstance(e, PartReady) and e.msn == 3]
    assert len(partial) >= 1

    async def fetch_missing(rendition, name):
        return old_store.get_now(object_key("cam", rendition, name))

    new = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20), clock=lambda: 2e9)
    told: list = []
    new.listeners.append(lambda _, event: told.append(event))
    new.add_track(track)
    new.hold()
    for sample in samples[:40]:
        new.add_sample(track.name, sample)
    assert new.resume(history, fetch_missing)
    # The unfinished segment is listed, closed after its parts; new media starts after it.
    first = next(e for e in told if isinstance(e, SegmentOpened))
    assert (first.msn, first.discontinuity) == (4, True)
    playlist = new.media_playlist(track.name)
    duration = sum(part.duration for part in partial)
    assert f"#EXTINF:{duration:.3f},\nseg3.m4s\n#EXT-X-DISCONTINUITY\n" in playlist
    assert playlist.count("#EXT-X-DISCONTINUITY\n") == 1
    assert new.closed_segments() == [(track.name, "seg3.m4s")]
    # Its bytes are its parts' bytes (what a SegmentReady carries), and they decode.
    parts = [old_store.get_now(object_key("cam", track.name, f"part3.{p.index}.m4s"))
             for p in partial]
    segment = await new.fetch_object(track.name, "seg3.m4s")
    assert segment == b"".join(parts)
    with av.open(io.BytesIO(new.init_segment(track.name) + segment), format="mp4") as container:
        assert len(list(container.decode(video=0))) == round(duration * 30)


async def test_resume_leaves_out_a_segment_opened_without_parts_and_numbers_new_media_from_it():
    from origin.packager import SegmentOpened, SegmentReady
    track, samples, _, history = crashed_log(3.6)
    while not isinstance(history[-1], SegmentOpened):
        history.pop()  # the producer died right after opening segment 3
    assert history[-1].msn == 3
    new = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20), clock=lambda: 2e9)
    told: list = []
    new.listeners.append(lambda _, event: told.append(event))
    new.add_track(track)
    new.hold()
    assert new.resume(history)
    for sample in samples[:40]:
        new.add_sample(track.name, sample)
    first = next(e for e in told if isinstance(e, SegmentOpened))
    assert (first.msn, first.discontinuity) == (3, True)
    assert new.closed_segments() == []
    assert all(e.msn >= 3 for e in told if isinstance(e, SegmentReady))


def decoded_size(init: bytes, segment: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(init + segment), format="mp4") as container:
        frame = next(container.decode(video=0))
    return frame.width, frame.height


def feed_a_format_change(stream: LiveStream, after_seconds: float,
                         fed: int | None = None) -> list:
    """2.1 s of 160x90 video, a discontinuity, then rendition 90p re-declared at 320x180 and the
    first ``fed`` (default all) of ``after_seconds`` of its samples; returns the samples of
    320x180 video."""
    small, small_samples = encode_video(2.1)
    large, large_samples = encode_video(after_seconds, size=(320, 180))
    stream.add_track(small)
    for sample in small_samples:
        stream.add_sample("90p", sample)
    stream.discontinuity()
    stream.add_track(large)  # the same rendition, re-declared at another size
    for sample in large_samples[:fed]:
        stream.add_sample("90p", sample)
    return large_samples


def test_a_format_change_gets_its_own_init_uri_and_the_old_one_stays_while_listed():
    from origin.live import TrackDeclared
    store = MemoryCache(max_bytes=32 * 2**20)
    stream = LiveStream("cam", SETTINGS, store, clock=lambda: 1e9)
    told: list = []
    stream.listeners.append(lambda _, event: told.append(event))
    # 2.3 s of the new size: two segments.
    large_samples = feed_a_format_change(stream, 6.1, fed=70)
    assert [(e.track.height, e.init_generation) for e in told
            if isinstance(e, TrackDeclared)] == [(90, 0), (180, 1)]
    playlist = stream.media_playlist("90p")
    maps = [line for line in playlist.splitlines() if line.startswith(("#EXT-X-MAP", "#EXT-X-DIS"))]
    assert maps == ['#EXT-X-MAP:URI="init.mp4"', "#EXT-X-DISCONTINUITY",
                    '#EXT-X-MAP:URI="init-1.mp4"']
    assert playlist.index('URI="init-1.mp4"') < playlist.index("seg3.m4s")
    # Each init decodes the segments that name it.
    old_init = stream.object("90p", "init.mp4")
    new_init = stream.object("90p", "init-1.mp4")
    assert stream.init_segment("90p") == new_init != old_init
    assert decoded_size(old_init, stream.object("90p", "seg0.m4s")) == (160, 90)
    assert decoded_size(new_init, stream.object("90p", "seg3.m4s")) == (320, 180)
    assert stream.object_state("90p", "init.mp4") is Readiness.READY
    # Once no listed segment needs the old init, it is unpinned like a segment.
    for sample in large_samples[70:]:
        stream.add_sample("90p", sample)
    playlist = stream.media_playlist("90p")
    assert "init.mp4" not in playlist and playlist.count("#EXT-X-MAP") == 1
    assert stream.object_state("90p", "init.mp4") is Readiness.GONE
    assert not store.unpin(object_key("cam", "90p", "init.mp4"))  # already unpinned
    assert store.unpin(object_key("cam", "90p", "init-1.mp4"))  # still pinned



@pytest.mark.parametrize("new_size, generation", [
    ((320, 180), 1),  # as the log last declared it: that generation (same bytes, same URI)
    ((160, 90), 0),  # as it declared it first
    ((240, 136), 2),  # a format the log never had: the next unused generation
])
def test_a_resumed_stream_numbers_its_init_after_the_log_it_continues(new_size, generation):
    from origin.live import TrackDeclared
    old_store = MemoryCache(max_bytes=32 * 2**20)
    old = LiveStream("cam", SETTINGS, old_store, clock=lambda: 1e9)
    history: list = []
    old.listeners.append(lambda _, event: history.append(event))
    feed_a_format_change(old, 1.6)

    async def fetch_missing(rendition, name):
        return old_store.get_now(object_key("cam", rendition, name))

    track, samples = encode_video(1.5, size=new_size)
    new = LiveStream("cam", SETTINGS, MemoryCache(max_bytes=32 * 2**20), clock=lambda: 2e9)
    told: list = []
    new.listeners.append(lambda _, event: told.append(event))
    new.add_track(track)
    new.hold()
    assert new.resume(history, fetch_missing)
    for sample in samples:
        new.add_sample("90p", sample)
    declared = [e.init_generation for e in told if isinstance(e, TrackDeclared)]
    assert declared[-1] == generation
    uri = "init.mp4" if generation == 0 else f"init-{generation}.mp4"
    playlist = new.media_playlist("90p")
    # The old segments keep the inits they were cut with; the new ones name this stream's.
    assert playlist.index('#EXT-X-MAP:URI="init.mp4"') < playlist.index("seg2.m4s")
    assert playlist.index('#EXT-X-MAP:URI="init-1.mp4"') < playlist.index("seg3.m4s")
    assert playlist.rindex(f'#EXT-X-MAP:URI="{uri}"') < playlist.index("seg5.m4s")
    assert new.init_segment("90p") == new.object("90p", uri)
    assert decoded_size(new.init_segment("90p"), new.object("90p", "seg5.m4s")) == new_size
