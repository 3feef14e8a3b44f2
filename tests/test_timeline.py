import pytest

from ingest.timeline import Timeline

FRAME = 1 / 30
AUDIO_FRAME = 1024 / 48000


def feed(timeline: Timeline, events: list[tuple[str, float]]) -> list[float]:
    intervals = {"video": FRAME, "audio": AUDIO_FRAME}
    return [timeline.map(track, source, intervals[track]) for track, source in events]


def interleaved(start: float, seconds: float) -> list[tuple[str, float]]:
    """Video at 30 fps and AAC-sized audio frames from ``start``, in time order."""
    events = [("video", start + i * FRAME) for i in range(round(seconds * 30))]
    events += [("audio", start + i * AUDIO_FRAME) for i in range(round(seconds * 48000 / 1024))]
    return sorted(events, key=lambda event: event[1])


def test_first_timestamp_becomes_zero_and_later_ones_keep_their_spacing():
    timeline = Timeline()
    out = feed(timeline, [("video", 1000.0), ("audio", 1000.01), ("video", 1000.0 + FRAME)])
    assert out == pytest.approx([0.0, 0.01, FRAME])


@pytest.mark.parametrize("jump", [
    5.0,  # a forward jump beyond max_gap (an encoder restarting with a new clock)
    -30.0,  # a backward jump (a file looping, a clock reset)
    -95443.7,  # an MPEG-TS 33-bit wrap (2**33 / 90 kHz)
])
def test_a_jump_shrinks_to_one_frame_for_both_tracks(jump):
    timeline = Timeline()
    before = interleaved(50.0, 1.0)
    after = interleaved(51.0 + jump, 1.0)
    out_before = feed(timeline, before)
    out_after = feed(timeline, after)
    last_video = max(o for (track, _), o in zip(before, out_before) if track == "video")
    first_video = next(o for (track, _), o in zip(after, out_after) if track == "video")
    assert first_video == pytest.approx(last_video + FRAME)
    # the shared offset moved once: audio lands next to the video it was recorded with
    first_audio = next(o for (track, _), o in zip(after, out_after) if track == "audio")
    assert first_audio == pytest.approx(first_video, abs=AUDIO_FRAME)
    assert timeline.jump_count == 1
    assert timeline.last_jump.gap == pytest.approx(jump, abs=0.1)


def test_a_gap_within_max_gap_stays_a_gap():
    timeline = Timeline(max_gap=1.0)
    out = feed(timeline, [("video", 0.0), ("video", 0.5), ("video", 1.2)])
    assert out == pytest.approx([0.0, 0.5, 1.2])
    assert timeline.jump_count == 0


def test_max_gap_is_configurable():
    timeline = Timeline(max_gap=0.2)
    out = feed(timeline, [("video", 0.0), ("video", 0.5)])
    assert out == pytest.approx([0.0, FRAME])


def test_output_never_goes_back_on_a_track():
    timeline = Timeline()
    # jitter: a timestamp slightly (less than a frame) before the previous one, then a repeat
    out = feed(timeline, [("video", 0.0), ("video", 0.1), ("video", 0.09), ("video", 0.09),
                          ("video", 0.2)])
    assert all(later > earlier for earlier, later in zip(out, out[1:]))
    assert out[-1] == pytest.approx(0.2)
    assert timeline.jump_count == 0


def test_tracks_are_monotonic_separately_through_many_jumps():
    timeline = Timeline()
    events = []
    for loop in range(5):  # a 1 s file looping 5 times
        events += interleaved(0.0, 1.0)
    out = feed(timeline, events)
    for track in ("video", "audio"):
        times = [o for (t, _), o in zip(events, out) if t == track]
        assert all(later > earlier for earlier, later in zip(times, times[1:]))
    # five seconds of media stay five seconds (give or take a frame per loop)
    assert max(out) == pytest.approx(5.0, abs=5 * FRAME)


def test_a_track_starting_late_is_not_shifted():
    timeline = Timeline()
    out = feed(timeline, [("video", 10.0), ("video", 10.0 + FRAME), ("audio", 10.5)])
    assert out[2] == pytest.approx(0.5)


def test_restart_resumes_at_the_given_time():
    timeline = Timeline()
    feed(timeline, interleaved(3.0, 1.0))
    assert timeline.furthest() == pytest.approx(1.0 - FRAME, abs=AUDIO_FRAME)
    timeline.restart(2.0)
    out = feed(timeline, [("audio", 0.0), ("video", 0.0), ("video", FRAME)])
    assert out == pytest.approx([2.0, 2.0, 2.0 + FRAME])
    assert timeline.jump_count == 0


def test_restart_cannot_go_back():
    timeline = Timeline()
    feed(timeline, [("video", 0.0), ("video", 0.5)])
    with pytest.raises(ValueError):
        timeline.restart(0.4)


def test_max_gap_must_be_positive():
    with pytest.raises(ValueError):
        Timeline(max_gap=0)
