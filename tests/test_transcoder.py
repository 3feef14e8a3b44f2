"""LadderTranscoder with real PyAV frames, real x264/AAC encoders, real threads and a real event loop.
The output is checked by decoding it back with FFmpeg's decoders."""

import asyncio
import threading
import time
from fractions import Fraction

import av
import pytest

from ingest.ladder import RungSpec
from ingest.media import EncodedSample, TrackInfo, TrackKind
from ingest.transcoder import LadderTranscoder

VIDEO_TICKS_PER_FRAME = 3000  # 90 kHz at 30 fps
RUNGS = (RungSpec("270p", 480, 270, 500_000), RungSpec("180p", 320, 180, 250_000))


class RecordingSink:
    """A MediaSink that keeps everything, and the thread each call arrived on."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.threads: set[int] = set()
        self.ended = asyncio.Event()

    def _seen(self) -> None:
        self.threads.add(threading.get_ident())

    def add_track(self, track: TrackInfo) -> None:
        self._seen()
        self.events.append(("track", track))

    def add_sample(self, track_name: str, sample: EncodedSample) -> None:
        self._seen()
        self.events.append(("sample", track_name, sample))

    def discontinuity(self) -> None:
        self._seen()
        self.events.append(("discontinuity",))

    def end(self) -> None:
        self._seen()
        self.events.append(("end",))
        self.ended.set()

    def tracks(self, name: str) -> list[TrackInfo]:
        return [e[1] for e in self.events if e[0] == "track" and e[1].name == name]

    def samples(self, name: str) -> list[EncodedSample]:
        return [e[2] for e in self.events if e[0] == "sample" and e[1] == name]

    def track_names(self) -> set[str]:
        return {e[1].name for e in self.events if e[0] == "track"}


def lavfi_frames(width: int, height: int, seconds: float, audio: bool = True) -> list[av.frame.Frame]:
    """Decoded testsrc2 (30 fps) and sine (44.1 kHz mono, so the resampler has work) frames, in
    demux order."""
    graph = f"testsrc2=size={width}x{height}:rate=30:duration={seconds}[out0]"
    if audio:
        graph += f";sine=frequency=1000:sample_rate=44100:duration={seconds}[out1]"
    with av.open(graph, format="lavfi") as container:
        return [frame for packet in container.demux() for frame in packet.decode()]


def shifted(frames: list[av.frame.Frame], seconds: float) -> list[av.frame.Frame]:
    """The same frames with their timestamps moved by ``seconds`` (frames are modified in place)."""
    for frame in frames:
        frame.pts += round(seconds / frame.time_base)
    return frames


async def transcode(sink: RecordingSink, feed, rungs=RUNGS, segment_duration: float = 1.0,
                    **options) -> LadderTranscoder:
    """Run ``feed(transcoder)`` on a producer thread, close, and wait for sink.end(). Unless a test
    says otherwise, the producer waits for queue room (as a file transcoded unpaced would): a busy
    CI machine must not turn a test of alignment into a test of dropping."""
    if options.get("queue_frames") is None:
        options.setdefault("block_on_full", 10.0)
    transcoder = LadderTranscoder(sink, asyncio.get_running_loop(), rungs,
                                  segment_duration=segment_duration, **options)

    def producer() -> None:
        feed(transcoder)
        transcoder.close()

    await asyncio.to_thread(producer)
    await asyncio.wait_for(sink.ended.wait(), 10)
    assert sink.threads == {threading.get_ident()}, "the sink was called off the loop thread"
    return transcoder


def push_all(frames):
    def feed(transcoder: LadderTranscoder) -> None:
        for frame in frames:
            if isinstance(frame, av.VideoFrame):
                transcoder.push_video(frame)
            else:
                transcoder.push_audio(frame)
    return feed


def decode_h264(track: TrackInfo, samples: list[EncodedSample]) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create("h264", "r")
    decoder.extradata = track.codec_config
    frames = []
    for sample in samples:
        packet = av.Packet(sample.data)
        packet.pts, packet.dts, packet.time_base = sample.pts, sample.dts, Fraction(1, 90000)
        frames += decoder.decode(packet)
    frames += decoder.decode(None)
    return frames


def keyframe_times(samples: list[EncodedSample]) -> list[int]:
    return [s.pts for s in samples if s.keyframe]


async def test_every_rung_has_idr_frames_at_the_same_segment_boundaries():
    sink = RecordingSink()
    transcoder = await transcode(sink, push_all(lavfi_frames(640, 360, 3.0)))
    for rung in RUNGS:
        [track] = sink.tracks(rung.name)
        assert (track.kind, track.codec, track.timescale) == (TrackKind.VIDEO, "h264", 90000)
        assert (track.width, track.height, track.bitrate) == (rung.width, rung.height,
                                                                rung.video_bitrate)
        assert track.frame_rate == pytest.approx(30.0)
        assert track.codec_config.startswith(b"\x00\x00\x00\x01\x67")  # Annex B SPS first
        samples = sink.samples(rung.name)
        assert len(samples) == 90
        assert all(s.dts == s.pts for s in samples)  # no B-frames
        assert [s.pts for s in samples] == [i * VIDEO_TICKS_PER_FRAME for i in range(90)]
        assert keyframe_times(samples) == [0, 90_000, 180_000]
        assert all(s.data.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")) for s in samples)
        decoded = decode_h264(track, samples)
        assert len(decoded) == 90
        assert {(f.width, f.height) for f in decoded} == {(rung.width, rung.height)}
        idr = [f.pts for f in decoded if f.key_frame]
        assert idr == [0, 90_000, 180_000]
        assert all(f.pict_type == av.video.frame.PictureType.I for f in decoded if f.key_frame)
    stats = transcoder.stats()
    assert stats.frames_in == 90
    assert stats.frames_encoded == {"270p": 90, "180p": 90}
    assert stats.frames_dropped == 0
    assert stats.realtime_factor > 0
    assert stats.last_error is None


async def test_a_frame_just_before_a_grid_point_becomes_the_idr_on_it():
    """A browser's millisecond timestamps put a frame a few ms before a segment's grid point: it is
    the frame nearest the grid, so it starts the segment, moved onto the grid point. Left where it
    was, the next frame became the IDR and the packager cut a part of the early frame alone."""
    frames = [frame for frame in lavfi_frames(320, 180, 2.2, audio=False)]
    for index, frame in enumerate(frames):  # 30 fps, on a 1 ms time base, jittered
        frame.time_base = Fraction(1, 1000)
        frame.pts = round(index * 1000 / 30) - (3 if index == 30 else 0)  # 997 ms, not 1000
    sink = RecordingSink()
    await transcode(sink, push_all(frames), rungs=RUNGS[1:])
    samples = sink.samples(RUNGS[1].name)
    assert keyframe_times(samples) == [0, 90_000, 180_000]
    assert [s.pts for s in samples][29:32] == [87_030, 90_000, 92_970]  # 967, 1000, 1033 ms


async def test_no_rung_is_upscaled():
    sink = RecordingSink()
    await transcode(sink, push_all(lavfi_frames(320, 180, 0.5, audio=False)),
                    rungs=(RungSpec("360p", 640, 360, 800_000), RungSpec("180p", 320, 180, 250_000)))
    assert sink.track_names() == {"180p"}
    [track] = sink.tracks("180p")
    assert {(f.width, f.height) for f in decode_h264(track, sink.samples("180p"))} == {(320, 180)}


async def test_a_source_below_every_rung_is_encoded_at_its_own_size():
    sink = RecordingSink()
    await transcode(sink, push_all(lavfi_frames(256, 144, 0.5, audio=False)),
                    rungs=(RungSpec("360p", 640, 360, 800_000),))
    [track] = sink.tracks("360p")
    assert (track.width, track.height) == (256, 144)
    assert {(f.width, f.height) for f in decode_h264(track, sink.samples("360p"))} == {(256, 144)}


async def test_audio_is_one_aac_track_in_sync_with_video():
    sink = RecordingSink()
    transcoder = await transcode(sink, push_all(lavfi_frames(320, 180, 2.0)),
                                 rungs=(RungSpec("180p", 320, 180, 250_000),))
    [audio] = sink.tracks("audio")
    assert (audio.kind, audio.codec, audio.timescale) == (TrackKind.AUDIO, "aac", 48000)
    assert (audio.sample_rate, audio.channels, audio.bitrate) == (48000, 2, 128_000)
    assert audio.codec_config[:2] == bytes([0x11, 0x90])  # AAC-LC, 48 kHz, stereo
    samples = sink.samples("audio")
    video = sink.samples("180p")
    assert abs(samples[0].dts / 48000 - video[0].dts / 90000) <= 1 / 30
    # contiguous 1024-sample frames covering the two seconds
    assert [b.dts - a.dts for a, b in zip(samples, samples[1:])] == [1024] * (len(samples) - 1)
    assert (samples[-1].dts + 1024) / 48000 == pytest.approx(2.0, abs=2 * 1024 / 48000)
    # the bitstream is real AAC: FFmpeg decodes it to 48 kHz stereo
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = audio.codec_config
    decoded = [f for s in samples for f in decoder.decode(av.Packet(s.data))]
    assert sum(f.samples for f in decoded) == 1024 * len(samples)
    assert {(f.sample_rate, f.layout.nb_channels) for f in decoded} == {(48000, 2)}
    assert transcoder.stats().audio_frames_encoded == len(samples)


@pytest.mark.parametrize("jump", [10.0, -100.0])
async def test_a_source_jump_leaves_no_gap_and_keeps_audio_in_sync(jump):
    first = lavfi_frames(320, 180, 1.0)
    second = shifted(lavfi_frames(320, 180, 1.0), 1.0 + jump)
    sink = RecordingSink()
    await transcode(sink, push_all(first + second), rungs=(RungSpec("180p", 320, 180, 250_000),))
    video = [s.dts for s in sink.samples("180p")]
    audio = [s.dts for s in sink.samples("audio")]
    assert len(video) == 60
    steps = [b - a for a, b in zip(video, video[1:])]
    assert min(steps) > 0 and max(steps) <= 2 * VIDEO_TICKS_PER_FRAME
    assert all(b > a for a, b in zip(audio, audio[1:]))
    assert video[-1] / 90000 == pytest.approx(2.0, abs=0.1)
    # both tracks end together: the shared offset moved audio with video
    assert audio[-1] / 48000 == pytest.approx(video[-1] / 90000, abs=0.05)


async def test_a_discontinuity_resumes_on_the_segment_grid_with_an_idr():
    first = lavfi_frames(480, 270, 1.3)
    second = lavfi_frames(480, 270, 1.2)  # timestamps restart at 0, as after a reconnect

    def feed(transcoder: LadderTranscoder) -> None:
        push_all(first)(transcoder)
        transcoder.discontinuity()
        push_all(second)(transcoder)

    sink = RecordingSink()
    await transcode(sink, feed, rungs=RUNGS)
    marker = sink.events.index(("discontinuity",))
    for rung in RUNGS:
        before = [e[2] for e in sink.events[:marker] if e[0] == "sample" and e[1] == rung.name]
        after = [e[2] for e in sink.events[marker:] if e[0] == "sample" and e[1] == rung.name]
        assert len(before) == 39 and len(after) == 36  # the whole first period came first
        assert after[0].keyframe
        assert after[0].pts == 2 * 90_000  # the next 1 s grid point after 1.3 s
        assert keyframe_times(after) == [180_000, 270_000]
    audio_after = [e[2] for e in sink.events[marker:] if e[0] == "sample" and e[1] == "audio"]
    assert audio_after[0].dts == 2 * 48_000
    assert len(sink.tracks("audio")) == 1  # same encoder settings: not re-declared


async def test_a_full_rung_queue_drops_frames_but_keeps_segment_starts():
    frames = lavfi_frames(640, 360, 3.0, audio=False)
    rungs = (RungSpec("360p", 640, 360, 800_000), RungSpec("180p", 320, 180, 250_000))

    def bursts(transcoder: LadderTranscoder) -> None:
        # Bursts of 15 frames, far faster than x264, into one-frame queues: each rung keeps about
        # the first frame of a burst. Bursts start at frames 10, 25, 40, ... so the boundary frames
        # (30 and 60) arrive mid-burst and are dropped.
        for index, frame in enumerate(frames):
            if index % 15 == 10:
                time.sleep(0.1)  # let the workers empty their queues
            transcoder.push_video(frame)

    sink = RecordingSink()
    transcoder = await transcode(sink, bursts, rungs=rungs, queue_frames=1)
    stats = transcoder.stats()
    assert stats.frames_dropped > 0
    for rung in stats.rungs:
        assert rung.frames_encoded + rung.frames_dropped == 90
    for spec in rungs:
        samples = sink.samples(spec.name)
        # every segment still starts with an IDR: at the boundary, or at the first frame the
        # rung kept after it when the boundary frame itself was dropped
        first_after = [next(s.pts for s in samples if s.pts >= boundary)
                       for boundary in (0, 90_000, 180_000)]
        assert first_after[1:] != [90_000, 180_000], "no boundary frame was dropped"
        assert keyframe_times(samples) == first_after
        assert len(decode_h264(sink.tracks(spec.name)[0], samples)) == len(samples)


async def test_a_producer_allowed_to_wait_loses_nothing():
    frames = lavfi_frames(640, 360, 2.0, audio=False)
    sink = RecordingSink()
    transcoder = await transcode(sink, push_all(frames), queue_frames=1, block_on_full=5.0)
    stats = transcoder.stats()
    assert stats.frames_dropped == 0
    assert stats.frames_encoded == {"270p": 60, "180p": 60}


async def test_a_frame_rate_cap_halves_frames_and_keeps_idr_alignment():
    rungs = (RungSpec("full", 320, 180, 250_000),
             RungSpec("half", 256, 144, 150_000, max_frame_rate=15.0))
    sink = RecordingSink()
    await transcode(sink, push_all(lavfi_frames(320, 180, 2.0, audio=False)), rungs=rungs)
    half = sink.samples("half")
    assert len(half) == 30
    assert [b.pts - a.pts for a, b in zip(half, half[1:])] == [6000] * 29
    assert keyframe_times(half) == keyframe_times(sink.samples("full")) == [0, 90_000]
    assert sink.tracks("half")[0].frame_rate == 15.0


def samples_by_period(sink: RecordingSink, name: str) -> list[list[EncodedSample]]:
    """``name``'s samples, split at each discontinuity."""
    periods: list[list[EncodedSample]] = [[]]
    for event in sink.events:
        if event[0] == "discontinuity":
            periods.append([])
        elif event[0] == "sample" and event[1] == name:
            periods[-1].append(event[2])
    return periods


async def test_a_rung_above_a_shrunk_source_continues_at_the_source_size():
    big = lavfi_frames(640, 360, 1.0, audio=False)
    small = shifted(lavfi_frames(320, 180, 1.0, audio=False), 1.0)
    rungs = (RungSpec("360p", 640, 360, 800_000), RungSpec("180p", 320, 180, 250_000))
    sink = RecordingSink()
    await transcode(sink, push_all(big + small), rungs=rungs)
    declared = [(e[1].name, e[1].width, e[1].height, e[1].bitrate)
                for e in sink.events if e[0] == "track"]
    # 180p is unchanged, so it is not re-declared; 360p would be an upscale of the smaller
    # source, so it goes on at the source size (a new init segment) with its own bitrate cap
    assert sorted(declared) == [("180p", 320, 180, 250_000), ("360p", 320, 180, 800_000),
                                ("360p", 640, 360, 800_000)]
    assert sink.events.index(("discontinuity",)) < max(
        i for i, e in enumerate(sink.events) if e[0] == "track")
    periods = {rung.name: samples_by_period(sink, rung.name) for rung in rungs}
    for name in ("360p", "180p"):
        before, after = periods[name]
        assert len(before) == 30 and len(after) == 30, name
        assert after[0].keyframe and after[0].pts == 2 * 90_000
        assert keyframe_times(after) == [180_000]
    # the same output grid on both rungs, before and after the change
    assert [s.pts for s in periods["360p"][1]] == [s.pts for s in periods["180p"][1]]
    assert [s.pts for s in periods["360p"][0]] == [s.pts for s in periods["180p"][0]]
    first, capped = sink.tracks("360p")
    assert {(f.width, f.height) for f in decode_h264(first, periods["360p"][0])} == {(640, 360)}
    assert {(f.width, f.height) for f in decode_h264(capped, periods["360p"][1])} == {(320, 180)}


async def test_a_capped_rung_returns_to_its_own_size_when_the_source_grows_back():
    big = lavfi_frames(640, 360, 1.0, audio=False)
    small = shifted(lavfi_frames(320, 180, 1.0, audio=False), 1.0)
    again = shifted(lavfi_frames(640, 360, 1.0, audio=False), 2.0)
    rungs = (RungSpec("360p", 640, 360, 800_000), RungSpec("180p", 320, 180, 250_000))
    sink = RecordingSink()
    await transcode(sink, push_all(big + small + again), rungs=rungs)
    assert [(t.width, t.height) for t in sink.tracks("360p")] == [(640, 360), (320, 180),
                                                                   (640, 360)]
    assert len(sink.tracks("180p")) == 1
    assert sink.events.count(("discontinuity",)) == 2
    high, low = samples_by_period(sink, "360p"), samples_by_period(sink, "180p")
    assert [len(p) for p in high] == [len(p) for p in low] == [30, 30, 30]
    for period_high, period_low in zip(high, low):  # aligned in every period
        assert [s.pts for s in period_high] == [s.pts for s in period_low]
        assert keyframe_times(period_high) == keyframe_times(period_low)
    third = sink.tracks("360p")[2]
    assert {(f.width, f.height) for f in decode_h264(third, high[2])} == {(640, 360)}


async def test_a_larger_source_redeclares_a_rung_at_its_new_size():
    small = lavfi_frames(320, 180, 0.5, audio=False)
    big = shifted(lavfi_frames(640, 360, 0.5, audio=False), 0.5)
    sink = RecordingSink()
    await transcode(sink, push_all(small + big), rungs=(RungSpec("360p", 640, 360, 800_000),))
    sizes = [(t.width, t.height) for t in sink.tracks("360p")]
    assert sizes == [(320, 180), (640, 360)]
    events = [e[0] for e in sink.events]
    assert events.index("discontinuity") < len(events) - 1 - events[::-1].index("track")


async def test_pushing_after_close_is_an_error():
    sink = RecordingSink()
    transcoder = await transcode(sink, push_all(lavfi_frames(160, 90, 0.2, audio=False)),
                                 rungs=(RungSpec("90p", 160, 90, 100_000),))
    with pytest.raises(RuntimeError):
        transcoder.push_video(lavfi_frames(160, 90, 0.1, audio=False)[0])
    assert sink.events[-1] == ("end",)
