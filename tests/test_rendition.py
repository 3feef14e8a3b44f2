"""The rendition window: blocking-reload readiness, sliding, part listing, delta updates."""

from __future__ import annotations

import re

import pytest

from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.playlist import render_media_playlist
from origin.rendition import (Readiness, RenditionLog, RenditionSettings, init_uri,
                              is_init_name)

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
    # The dropped segment's objects are gone with it; the complete ones stay.
    assert [log.object_state(name) for name in ("part4.0.m4s", "seg4.m4s", "part4.2.m4s")] \
        == [Readiness.GONE] * 3
    assert log.object_state("part3.3.m4s") is Readiness.READY


def test_objects_that_slid_out_of_the_window_are_gone():
    log = RenditionLog(SETTINGS)
    feed(log, segments=5)  # a window of three: segments 0 and 1 slid out
    for msn in (0, 1):
        assert log.object_state(f"seg{msn}.m4s") is Readiness.GONE
        assert log.object_state(f"part{msn}.3.m4s") is Readiness.GONE
    assert log.object_state("seg2.m4s") is Readiness.READY
    assert log.object_state("part2.0.m4s") is Readiness.READY
    assert log.object_state("part5.0.m4s") is Readiness.WAIT  # the preload hint


# -- one init URI per format -------------------------------------------------------------------------
@pytest.mark.parametrize("generation, uri", [(0, "init.mp4"), (1, "init-1.mp4"), (12, "init-12.mp4")])
def test_init_uri_per_generation(generation, uri):
    assert init_uri(generation) == uri
    assert is_init_name(uri)


@pytest.mark.parametrize("name", ["init-0.mp4", "init-.mp4", "init-1.m4s", "xinit.mp4",
                                  "init-01.mp4", "seg1.m4s", "init.mp4/x", "init-1a.mp4"])
def test_other_names_are_not_init_names(name):
    assert not is_init_name(name)


def feed_formats(log: RenditionLog, formats: list[int]) -> list[tuple[str, ...]]:
    """One complete 2 s segment per item of ``formats`` (its init generation), declaring the
    format (and opening with a discontinuity) whenever it changes. Returns what each change
    unlisted."""
    unlisted: list[tuple[str, ...]] = []
    for msn, generation in enumerate(formats):
        changed = generation != log.init_generation
        if changed:
            unlisted.append(log.declare(generation).unlisted)
        unlisted.append(log.apply(SegmentOpened("v", msn, 1000.0 + 2 * msn, changed,
                                                generation)).unlisted)
        for index in range(4):
            log.apply(PartReady("v", msn, index, 0.5, index == 0, b"x"))
        unlisted.append(log.apply(SegmentReady("v", msn, 2.0, 4, 4, b"x" * 4)).unlisted)
    return unlisted


def maps_of(playlist) -> list[tuple[int, str]]:
    return [(s.msn, s.map_uri) for s in playlist.segments[playlist.skipped_segments:]]


@pytest.mark.parametrize("formats, map_uri, maps", [
    # window_segments=3: the last three segments are listed.
    ([0, 0, 0], "init.mp4", [(0, "init.mp4"), (1, "init.mp4"), (2, "init.mp4")]),
    # Changed after segment 1: the segments after the discontinuity need init-1.mp4.
    ([0, 0, 1], "init.mp4", [(0, "init.mp4"), (1, "init.mp4"), (2, "init-1.mp4")]),
    # The window slid: the first listed segment is of the old format, its MAP heads the playlist.
    ([0, 0, 0, 1, 1], "init.mp4", [(2, "init.mp4"), (3, "init-1.mp4"), (4, "init-1.mp4")]),
    # Slid past the change: only the new format is listed.
    ([0, 0, 1, 1, 1], "init-1.mp4", [(2, "init-1.mp4"), (3, "init-1.mp4"), (4, "init-1.mp4")]),
    # Two changes in the window.
    ([0, 1, 2], "init.mp4", [(0, "init.mp4"), (1, "init-1.mp4"), (2, "init-2.mp4")]),
])
def test_each_segment_names_the_init_of_its_format(formats, map_uri, maps):
    log = RenditionLog(SETTINGS)
    feed_formats(log, formats)
    playlist = log.playlist()
    assert playlist.map_uri == map_uri
    assert maps_of(playlist) == maps


def test_an_old_init_is_unlisted_when_its_last_segment_slides_out():
    log = RenditionLog(SETTINGS)
    unlisted = [names for names in feed_formats(log, [0, 0, 1, 1, 1, 1]) if names]
    # Segment 1 (the last of init.mp4) slides out as segment 4 completes, segment 2 with 5.
    assert unlisted == [("seg0.m4s", "part0.0.m4s", "part0.1.m4s", "part0.2.m4s",
                         "part0.3.m4s"),
                        ("seg1.m4s", "part1.0.m4s", "part1.1.m4s", "part1.2.m4s",
                         "part1.3.m4s", "init.mp4"),
                        ("seg2.m4s", "part2.0.m4s", "part2.1.m4s", "part2.2.m4s",
                         "part2.3.m4s")]
    assert log.object_state("init.mp4") is Readiness.GONE
    assert log.object_state("init-1.mp4") is Readiness.READY


def test_a_format_declared_before_any_segment_of_the_old_one_unlists_it_at_once():
    log = RenditionLog(SETTINGS)
    assert log.declare(1).unlisted == ("init.mp4",)
    assert log.declare(1).unlisted == ()
    assert log.object_state("init-1.mp4") is Readiness.READY
    assert log.object_state("init.mp4") is Readiness.GONE


def test_a_declared_format_heads_the_next_segment_and_the_open_one_keeps_its_own():
    log = RenditionLog(SETTINGS)
    feed_formats(log, [0, 0])
    log.declare(1)
    hinted = log.playlist()
    assert hinted.open_segment_map_uri == "init-1.mp4"  # the hinted part2.0 is of the new format
    assert log.object_state("init.mp4") is Readiness.READY  # segments 0 and 1 still need it
    log.apply(SegmentOpened("v", 2, 1004.0, True, 1))
    log.apply(PartReady("v", 2, 0, 0.5, True, b"x"))
    playlist = log.playlist()
    assert (playlist.map_uri, playlist.open_segment_map_uri) == ("init.mp4", "init-1.mp4")
    assert [p.uri for p in playlist.open_parts] == ["part2.0.m4s"]


@pytest.mark.parametrize("formats, skipped, map_uri", [
    # 10 segments listed, CAN-SKIP-UNTIL 12 s: four are skipped.
    ([0] * 10, 4, "init.mp4"),
    ([0] * 4 + [1] * 6, 4, "init-1.mp4"),  # the skip ends at the change
    ([0] * 6 + [1] * 4, 4, "init.mp4"),  # the first segment after the skip is of the old format
    ([0] * 2 + [1] * 8, 4, "init-1.mp4"),  # the skip covers the change
])
def test_a_delta_update_names_the_map_in_force_after_the_skip(formats, skipped, map_uri):
    wide = RenditionLog(RenditionSettings(2.0, 0.522, 10, 2))
    feed_formats(wide, formats)
    playlist = wide.playlist(skip=True)
    assert playlist.skipped_segments == skipped
    assert playlist.map_uri == map_uri == playlist.segments[skipped].map_uri
    text = render_media_playlist(playlist)
    after_skip = text.split("#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n", 1)[1]
    assert after_skip.startswith(f'#EXT-X-MAP:URI="{map_uri}"\n')
    # Every MAP in the delta update is one a listed segment needs.
    listed = {s.map_uri for s in playlist.segments[skipped:]}
    assert set(re.findall(r'#EXT-X-MAP:URI="([^"]+)"', text)) == listed
