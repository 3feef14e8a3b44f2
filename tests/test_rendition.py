"""The rendition window: blocking-reload readiness, sliding, part listing, delta updates."""

from __future__ import annotations

import pytest

from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.rendition import Readiness, RenditionLog, RenditionSettings

SETTINGS = RenditionSettings(segment_duration=2.0, part_duration=0.522, window_segments=3,
                             target_duration=2)


def feed(log: RenditionLog, segments: int, open_parts: int = 0) -> list[tuple[str, ...]]:
    """Produce ``segments`` complete segments of four 0.5 s parts, then ``open_parts`` parts."""
    unlisted = []
    for msn in range(segments + (1 if open_parts else 0)):
        unlisted.append(log.apply(SegmentOpened("v", msn, 1000.0 + 2 * msn, False)).unlisted)
        for index in range(4 if msn < segments else open_parts):
            log.apply(PartReady("v", msn, index, 0.5, index == 0, b"x" * 10))
        if msn < segments:
            unlisted.append(log.apply(SegmentReady("v", msn, 2.0, 4, 40, b"x" * 40)).unlisted)
    return unlisted


@pytest.fixture
def log() -> RenditionLog:
    rendition = RenditionLog(SETTINGS)
    feed(rendition, segments=4, open_parts=2)  # segments 0-3 complete, segment 4 has parts 0-1
    return rendition


@pytest.mark.parametrize("msn, part, expected", [
    (4, 1, Readiness.READY),  # the newest part
    (4, 2, Readiness.WAIT),  # the next part (preload hint)
    (4, 4, Readiness.WAIT),  # within the advance part limit
    (4, 5, Readiness.TOO_FAR),  # beyond it
    (3, 4, Readiness.READY),  # past the last part of a complete segment: part 0 of the next
    (3, None, Readiness.READY),
    (4, None, Readiness.WAIT),  # segment 4 is not complete yet
    (5, 0, Readiness.WAIT),
    (6, 0, Readiness.WAIT),  # msn + 2 is allowed
    (7, 0, Readiness.TOO_FAR),
    (0, 0, Readiness.READY),  # already slid out of the window
])
def test_readiness(log, msn, part, expected):
    assert log.readiness(msn, part) is expected


def test_window_slides_and_reports_unlisted_objects():
    log = RenditionLog(SETTINGS)
    unlisted = [names for names in feed(log, segments=5) if names]
    assert unlisted[0] == ("seg0.m4s", "part0.0.m4s", "part0.1.m4s", "part0.2.m4s", "part0.3.m4s")
    playlist = log.playlist()
    assert playlist.media_sequence == 2
    assert [s.msn for s in playlist.segments] == [2, 3, 4]


def test_parts_are_listed_only_near_the_live_edge(log):
    playlist = log.playlist()
    # 3 target durations = 6 s: the open segment's 1 s of parts plus segments 3, 2 and 1.
    assert [bool(s.parts) for s in playlist.segments] == [True, True, True]
    assert [p.uri for p in playlist.open_parts] == ["part4.0.m4s", "part4.1.m4s"]
    assert playlist.preload_hint_uri == "part4.2.m4s"
    wide = RenditionLog(RenditionSettings(2.0, 0.522, 10, 2))
    feed(wide, segments=6)
    assert [bool(s.parts) for s in wide.playlist().segments] == [False] * 3 + [True] * 3


def test_delta_update_skips_segments_before_the_skip_boundary():
    wide = RenditionLog(RenditionSettings(2.0, 0.522, 10, 2))
    feed(wide, segments=10)
    playlist = wide.playlist(skip=True)
    # 20 s listed, CAN-SKIP-UNTIL 12 s: the first 4 segments end more than 12 s from the end.
    assert playlist.can_skip_until == 12.0
    assert playlist.skipped_segments == 4
    assert RenditionLog(SETTINGS).playlist(skip=True).skipped_segments == 0


def test_object_state(log):
    assert log.object_state("part4.1.m4s") is Readiness.READY
    assert log.object_state("part4.2.m4s") is Readiness.WAIT  # preload hint
    assert log.object_state("part4.3.m4s") is Readiness.GONE
    assert log.object_state("seg3.m4s") is Readiness.READY
    assert log.object_state("seg4.m4s") is Readiness.WAIT
    assert log.object_state("seg0.m4s") is Readiness.GONE


def test_end_drops_the_open_segment_and_answers_every_wait(log):
    log.end()
    playlist = log.playlist()
    assert playlist.ended and not playlist.open_parts and playlist.preload_hint_uri is None
    assert log.readiness(5, 0) is Readiness.READY
