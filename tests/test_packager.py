"""The packager state machine: where parts and segments are cut, and how periods continue."""

from __future__ import annotations

import random

import pytest

from ingest.media import EncodedSample
from origin.packager import (PackagerSettings, PartReady, SegmentOpened, SegmentReady,
                             StreamPackager, TrackPackager)

SETTINGS = PackagerSettings(segment_duration=2.0, part_duration=0.5)
FRAME = 3000  # 30 fps at 90 kHz
AAC_FRAME = 1024  # at 48 kHz
IDR = b"\x00\x00\x00\x01\x65\x88\x84"
NON_IDR = b"\x00\x00\x00\x01\x41\x9a\x02"


def video_samples(count: int, start: int = 0, gop: int = 60, duration: int = FRAME):
    for i in range(count):
        key = i % gop == 0
        yield EncodedSample(dts=start + i * FRAME, pts=start + i * FRAME, duration=duration,
                            keyframe=key, data=IDR if key else NON_IDR)


def audio_samples(count: int, start: int = 0):
    for i in range(count):
        t = start + i * AAC_FRAME
        yield EncodedSample(dts=t, pts=t, duration=AAC_FRAME, keyframe=True, data=b"\x21\x00")


def run(packager: TrackPackager, samples) -> list:
    events = []
    for sample in samples:
        events += packager.push(sample, wall_anchor=1000.0)
    return events


def of(kind, events):
    return [e for e in events if isinstance(e, kind)]


def test_video_cuts_parts_on_the_grid_and_segments_on_keyframes(video_track):
    events = run(TrackPackager(video_track, SETTINGS), video_samples(122))
    parts = of(PartReady, events)
    segments = of(SegmentReady, events)
    assert [s.msn for s in segments] == [0, 1]
    assert [s.part_count for s in segments] == [4, 4]
    assert [s.duration for s in segments] == [2.0, 2.0]
    # 8 parts of two whole segments, plus none yet of segment 2 (two frames only).
    assert [(p.msn, p.index) for p in parts] == [(0, 0), (0, 1), (0, 2), (0, 3),
                                                 (1, 0), (1, 1), (1, 2), (1, 3)]
    assert all(p.duration == pytest.approx(0.5) for p in parts)
    assert [p.independent for p in parts[:4]] == [True, False, False, False]
    assert segments[0].data == b"".join(p.data for p in parts[:4])


def test_a_part_is_ready_when_the_frame_after_its_last_arrives(video_track):
    packager = TrackPackager(video_track, SETTINGS)
    events = run(packager, video_samples(15))  # frames 0-14: part 0, the last one's end unknown
    assert not of(PartReady, events)
    events = run(packager, video_samples(1, start=15 * FRAME, gop=1000))
    assert [(p.msn, p.index) for p in of(PartReady, events)] == [(0, 0)]


def pushes(packager: TrackPackager, samples) -> list[list]:
    return [packager.push(sample, wall_anchor=1000.0) for sample in samples]


@pytest.mark.parametrize("track, samples", [("video_track", lambda: video_samples(200)),
                                            ("audio_track", lambda: audio_samples(400))])
def test_a_segment_is_complete_with_its_last_part(track, samples, request):
    # A video segment ended when the keyframe starting the next one was cut, a frame after its
    # last part (an audio one a sample after): meanwhile its playlist hinted a part that never
    # came, and every player asking for it got 404 at every segment's end.
    batches = pushes(TrackPackager(request.getfixturevalue(track), SETTINGS), samples())
    ends = [batch for batch in batches if of(SegmentReady, batch)]
    assert len(ends) >= 3
    for batch in ends:
        segment = of(SegmentReady, batch)[0]
        assert [(p.msn, p.index) for p in of(PartReady, batch)][-1:] == \
            [(segment.msn, segment.part_count - 1)]


def test_the_next_segment_opens_when_its_keyframe_is_cut(video_track):
    packager = TrackPackager(video_track, SETTINGS)
    batches = pushes(packager, video_samples(62))  # frames 0-61; 60 is the IDR at 2 s
    assert [e.msn for e in of(SegmentReady, batches[60])] == [0]
    assert [e.msn for e in of(SegmentOpened, batches[61])] == [1]
    assert [(p.msn, p.index) for p in of(PartReady, packager.finish(1000.0))] == [(1, 0)]


@pytest.mark.parametrize("late", [0, 810])  # the keyframe on the 2 s grid point, or 9 ms after
def test_between_a_segments_end_and_its_keyframes_cut_the_next_is_numbered_by_the_grid(
        video_track, late):
    # A rung joining now takes the leader's numbering: the next segment is 1, at 2 s (the next
    # grid point after the keyframe's time said 4 s when the keyframe came late).
    packager = TrackPackager(video_track, SETTINGS)
    frames = [*video_samples(60), EncodedSample(60 * FRAME + late, 60 * FRAME + late, FRAME,
                                                True, IDR)]
    batches = pushes(packager, frames)
    assert of(SegmentReady, batches[-1]) and not of(SegmentOpened, batches[-1])
    assert packager.numbering() == (1, 2.0)


def test_video_durations_come_from_the_next_frame_so_parts_have_no_gaps(video_track):
    # A WebRTC-like source: frames arrive 30-36 ms apart while the producer claims 33.3 ms.
    starts = [0]
    for i in range(1, 200):
        starts.append(starts[-1] + (2700 if i % 3 else 3240))
    keyframes = {0} | {i for i, t in enumerate(starts) if i and t // 180_000 > starts[i - 1] // 180_000}
    samples = [EncodedSample(t, t, FRAME, i in keyframes, IDR if i in keyframes else NON_IDR)
               for i, t in enumerate(starts)]
    events = run(TrackPackager(video_track, SETTINGS), samples)
    parts = of(PartReady, events)
    assert len(parts) >= 10
    # Parts tile time: each ends exactly where a frame (the next part's first) starts.
    elapsed = 0
    for part in parts:
        elapsed += round(part.duration * 90_000)
        assert elapsed in starts


def test_a_frame_straddling_the_segment_end_closes_its_last_part(video_track):
    """Frame 59 starts 24 ms before the 2 s grid point and frame 60, the IDR, 9 ms after it: frame
    59 ends the segment's last part instead of making a fifth part of one frame (hls.js has been
    seen to stall on such a part)."""
    starts = [i * FRAME for i in range(59)] + [177_840] + [180_810 + i * FRAME for i in range(62)]
    samples = [EncodedSample(t, t, FRAME, i in (0, 60), IDR if i in (0, 60) else NON_IDR)
               for i, t in enumerate(starts)]
    events = run(TrackPackager(video_track, SETTINGS), samples)
    first = of(SegmentReady, events)[0]
    assert first.part_count == 4 and first.duration == pytest.approx(180_810 / 90_000)
    last_part = [p for p in of(PartReady, events) if p.msn == 0][-1]
    assert last_part.duration == pytest.approx((180_810 - 135_000) / 90_000)  # 0.509 s
    assert last_part.duration <= SETTINGS.part_target


def test_jittered_video_makes_four_whole_parts_a_segment(video_track):
    """A browser's frames: millisecond timestamps, each 0-8 ms late, IDRs where the transcoder puts
    them (moved onto the grid point when less than half a frame before it, else the first frame
    after it). Every part boundary falls at the frame nearest its grid point: no sliver parts,
    none longer than PART-TARGET."""
    generator = random.Random(7)
    starts: list[int] = []
    keyframes: set[int] = set()
    boundary = 0
    for index in range(400):
        start = round((index * 1000 / 30 + generator.randint(0, 8)) * 90)
        if start < boundary <= start + FRAME // 2:
            start = boundary
        if start >= boundary:
            keyframes.add(index)
            boundary = (start // 180_000 + 1) * 180_000
        starts.append(start)
    samples = [EncodedSample(t, t, FRAME, i in keyframes, IDR if i in keyframes else NON_IDR)
               for i, t in enumerate(starts)]
    events = run(TrackPackager(video_track, SETTINGS), samples)
    segments, parts = of(SegmentReady, events), of(PartReady, events)
    assert len(segments) >= 6
    assert [s.part_count for s in segments] == [4] * len(segments)
    assert all(0.45 <= p.duration <= SETTINGS.part_target for p in parts), \
        sorted(p.duration for p in parts)[:3]


def test_video_waits_for_a_keyframe_to_start(video_track):
    packager = TrackPackager(video_track, SETTINGS)
    samples = list(video_samples(70))[10:]  # starts with 50 non-key frames
    events = run(packager, samples)
    assert packager.dropped_samples == 50
    opened = of(SegmentOpened, events)
    assert opened[0].msn == 0
    assert opened[0].program_date_time == pytest.approx(1000.0 + 2.0)


def test_audio_parts_never_exceed_the_part_target_and_follow_the_grid(audio_track):
    events = run(TrackPackager(audio_track, SETTINGS), audio_samples(400))  # ~8.5 s
    parts = of(PartReady, events)
    segments = of(SegmentReady, events)
    assert all(p.duration <= SETTINGS.part_target for p in parts)
    assert all(p.duration >= 0.85 * SETTINGS.part_target for p in parts)
    assert all(p.independent for p in parts)
    assert [s.msn for s in segments] == [0, 1, 2, 3]
    # Segment ends stay within one AAC frame of the 2 s grid, without drifting.
    ends, total = [], 0.0
    for segment in segments:
        total += segment.duration
        ends.append(total)
    for k, end in enumerate(ends, start=1):
        assert abs(end - 2.0 * k) <= AAC_FRAME / 48_000


@pytest.mark.parametrize("part_duration, part_target", [(0.5, 0.542), (0.2, 0.242), (1.0, 1.042)])
def test_part_target_bounds_a_video_frame_off_the_grid(part_duration, part_target):
    """Half a frame at each end at 24 fps (more than an AAC frame's overhang)."""
    assert PackagerSettings(2.0, part_duration).part_target == part_target


def test_samples_without_duration_take_it_from_the_next_dts(video_track):
    samples = [EncodedSample(s.dts, s.pts, 0, s.keyframe, s.data) for s in video_samples(62)]
    events = run(TrackPackager(video_track, SETTINGS), samples)
    assert [s.duration for s in of(SegmentReady, events)] == [2.0]


def test_finish_closes_the_open_part_and_segment(video_track):
    packager = TrackPackager(video_track, SETTINGS)
    run(packager, video_samples(20))
    events = packager.finish(1000.0)
    assert [(p.msn, p.index) for p in of(PartReady, events)] == [(0, 1)]
    assert [(s.msn, s.part_count) for s in of(SegmentReady, events)] == [(0, 2)]


def test_stream_keeps_audio_and_video_on_one_grid(video_track, audio_track):
    stream = StreamPackager(SETTINGS)
    stream.add_track(video_track)
    stream.add_track(audio_track)
    events = []
    video = list(video_samples(180))
    audio = list(audio_samples(280))
    for i in range(180):
        events += stream.push("180p", video[i], now=500.0)
        while audio and audio[0].dts / 48_000 <= video[i].dts / 90_000:
            events += stream.push("audio", audio.pop(0), now=500.0)
    segments = of(SegmentReady, events)
    video_msns = [s.msn for s in segments if s.track == "180p"]
    audio_msns = [s.msn for s in segments if s.track == "audio"]
    assert video_msns[:2] == audio_msns[:2] == [0, 1]
    opened = {(e.track, e.msn): e.program_date_time for e in of(SegmentOpened, events)}
    assert opened[("180p", 1)] == pytest.approx(opened[("audio", 1)], abs=0.03)


def test_discontinuity_resumes_on_the_next_grid_point_with_one_offset(video_track, audio_track):
    stream = StreamPackager(SETTINGS)
    stream.add_track(video_track)
    stream.add_track(audio_track)
    for sample in video_samples(75):  # 2.5 s
        stream.push("180p", sample, now=100.0)
    for sample in audio_samples(110):
        stream.push("audio", sample, now=100.0)
    closing = stream.discontinuity(now=103.0)
    assert [(s.track, s.msn) for s in of(SegmentReady, closing)] == [("180p", 1), ("audio", 1)]
    # The source restarts its clock at 0; output continues at 4.0 s (the grid point after 2.5 s).
    events = []
    for sample in video_samples(61):
        events += stream.push("180p", sample, now=110.0)
    opened = of(SegmentOpened, events)
    assert opened[0].msn == 2 and opened[0].discontinuity
    assert stream.tracks["180p"].offset == 4 * 90_000
    assert opened[0].program_date_time == pytest.approx(110.0)
    later = of(SegmentOpened, run_stream(stream, "audio", audio_samples(10)))
    assert later[0].msn == 2 and later[0].discontinuity


def run_stream(stream: StreamPackager, track: str, samples) -> list:
    events = []
    for sample in samples:
        events += stream.push(track, sample, now=110.0)
    return events


def test_redeclared_track_restarts_with_a_discontinuity(video_track):
    stream = StreamPackager(SETTINGS)
    stream.add_track(video_track)
    for sample in video_samples(70):
        stream.push("180p", sample, now=1.0)
    stream.discontinuity(now=2.0)
    stream.add_track(video_track)
    events = run_stream(stream, "180p", video_samples(5))
    assert of(SegmentOpened, events)[0].discontinuity
    assert of(SegmentOpened, events)[0].msn == 2


def test_a_format_change_gets_a_new_init_generation_and_an_identical_one_keeps_it(video_track):
    from dataclasses import replace
    stream = StreamPackager(SETTINGS)
    assert stream.add_track(video_track).init_generation == 0
    for sample in video_samples(70):
        stream.push("180p", sample, now=1.0)
    stream.discontinuity(now=2.0)
    # The same description again (a republish): the same init, the same generation.
    assert stream.add_track(video_track).init_generation == 0
    smaller = replace(video_track, width=160, height=90)
    packager = stream.add_track(smaller)
    assert packager.init_generation == 1
    events = run_stream(stream, "180p", video_samples(5))
    assert [(e.msn, e.init_generation) for e in of(SegmentOpened, events)] == [(2, 1)]
    assert stream.add_track(video_track).init_generation == 2  # back: a new generation again


def _joined(video_track, first_keyframe: int, after_discontinuity: bool):
    """A 180p track runs 3.5 s (segment 0 done, 1 open until its 4 s grid end); a 360p rung
    joins, its first keyframe at frame ``first_keyframe`` (mid-period: both tracks go on
    together) or, after a discontinuity, at the new period's start."""
    from dataclasses import replace
    stream = StreamPackager(SETTINGS)
    stream.add_track(video_track)
    for sample in video_samples(105):  # 3.5 s
        stream.push("180p", sample, now=1.0)
    if after_discontinuity:
        stream.discontinuity(now=2.0)
    rung = replace(video_track, name="360p", width=640, height=360)
    joined = stream.add_track(rung)
    frames = range(150) if after_discontinuity else range(105, first_keyframe + 150)
    events = []
    for frame in frames:
        time = frame * FRAME
        # A new encoder starts with a keyframe, then the ladder puts them on the grid.
        keyframe = frame == first_keyframe or (frame > first_keyframe and frame % 60 == 0)
        sample = EncodedSample(time, time, FRAME, keyframe, IDR if keyframe else NON_IDR)
        events += stream.push("360p", sample, now=1.0)
        if not after_discontinuity:
            events += stream.push("180p", replace(sample, data=IDR if frame % 60 == 0
                                                  else NON_IDR, keyframe=frame % 60 == 0),
                                  now=1.0)
    return stream, joined, events


@pytest.mark.parametrize("first_keyframe, first_msn", [
    (105, 1),  # mid-segment 1 (2-4 s): a shorter segment 1, then 2 on the grid
    (120, 2),  # on the grid point of segment 2
    (180, 3),  # a keyframe only one segment later (6 s): numbered by the grid, 3
])
def test_a_rung_joining_mid_stream_is_numbered_like_the_others(video_track, first_keyframe,
                                                                first_msn):
    stream, joined, events = _joined(video_track, first_keyframe, after_discontinuity=False)
    opened = {(e.track, e.msn): e.program_date_time for e in of(SegmentOpened, events)}
    rung = sorted(msn for track, msn in opened if track == "360p")
    assert rung[0] == first_msn and len(rung) >= 2
    # The same number is the same span of time in both renditions: segment N of 180p starts at
    # 2N s (its dates are 1.0 + that), and 360p's first may start later inside it.
    first = rung[0]
    assert 1.0 + 2 * first <= opened[("360p", first)] < 1.0 + 2 * (first + 1)
    for msn in rung[1:]:
        assert opened[("360p", msn)] == pytest.approx(1.0 + 2 * msn)
        assert opened[("180p", msn)] == pytest.approx(1.0 + 2 * msn)


def test_a_rung_joining_at_a_discontinuity_starts_at_the_others_next_number(video_track):
    stream, joined, events = _joined(video_track, 0, after_discontinuity=True)
    opened = [e for e in of(SegmentOpened, events) if e.track == "360p"]
    assert joined.next_msn == opened[-1].msn + 1
    assert opened[0].msn == stream.tracks["180p"].next_msn == 2
    assert stream.tracks["360p"].offset == stream.tracks["180p"].offset == 4 * 90_000


def test_a_joining_video_rung_is_numbered_like_the_video_not_the_audio(video_track, audio_track):
    from dataclasses import replace
    stream = StreamPackager(SETTINGS)
    stream.add_track(video_track)
    stream.add_track(audio_track)
    for sample in video_samples(105):  # 3.5 s: segment 1 open
        stream.push("180p", sample, now=1.0)
    for sample in audio_samples(193):  # 4.1 s: audio opened segment 2 past the 4 s grid point
        stream.push("audio", sample, now=1.0)
    stream.discontinuity(now=2.0)
    assert (stream.tracks["180p"].next_msn, stream.tracks["audio"].next_msn) == (2, 3)
    rung = stream.add_track(replace(video_track, name="360p", width=640, height=360))
    assert rung.next_msn == 2


def test_a_rung_declared_just_after_the_first_samples_of_another_starts_with_it(video_track):
    # At a stream's start the ladder's rungs are declared by their own threads, a few frames
    # apart: a late one joins the open segment 0, keeping its first frames.
    from dataclasses import replace
    stream = StreamPackager(SETTINGS)
    stream.add_track(video_track)
    samples = list(video_samples(130))
    for sample in samples[:3]:
        stream.push("180p", sample, now=1.0)
    late = stream.add_track(replace(video_track, name="360p", width=640, height=360))
    events = []
    for sample in samples[3:]:
        events += stream.push("180p", sample, now=1.0)
        events += stream.push("360p", replace(sample, keyframe=True, data=IDR)
                              if sample.dts == 3 * FRAME else sample, now=1.0)
    opened = [(e.track, e.msn) for e in of(SegmentOpened, events)]
    assert [msn for track, msn in opened if track == "360p"] == [0, 1, 2]
    assert late.dropped_samples == 0
