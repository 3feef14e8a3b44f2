"""Playlist rendering: values in, exact text out."""

from __future__ import annotations

import pytest

from origin.playlist import (AudioRendition, MediaPlaylist, MultivariantPlaylist, PartEntry,
                             RenditionReport, SegmentEntry, VariantStream, render_media_playlist,
                             render_multivariant_playlist, target_duration_for)

LIVE = MediaPlaylist(
    target_duration=2, media_sequence=7, map_uri="init.mp4",
    segments=(
        SegmentEntry(7, 2.0, "seg7.m4s", program_date_time=1700000000.0),
        SegmentEntry(8, 2.0, "seg8.m4s", program_date_time=1700000002.0, parts=(
            PartEntry(0.5, "part8.0.m4s", True), PartEntry(0.5, "part8.1.m4s", False))),
    ),
    part_target=0.522, open_parts=(PartEntry(0.5, "part9.0.m4s", True),),
    open_segment_program_date_time=1700000004.0,
    preload_hint_uri="part9.1.m4s",
    rendition_reports=(RenditionReport("../360p/index.m3u8", 9, 0),),
    part_hold_back=1.566, can_skip_until=12.0)

LIVE_TEXT = """#EXTM3U
#EXT-X-VERSION:9
#EXT-X-TARGETDURATION:2
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.000,PART-HOLD-BACK=1.566
#EXT-X-PART-INF:PART-TARGET=0.522
#EXT-X-MEDIA-SEQUENCE:7
#EXT-X-MAP:URI="init.mp4"
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z
#EXTINF:2.000,
seg7.m4s
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:22.000Z
#EXT-X-PART:DURATION=0.500,URI="part8.0.m4s",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.500,URI="part8.1.m4s"
#EXTINF:2.000,
seg8.m4s
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:24.000Z
#EXT-X-PART:DURATION=0.500,URI="part9.0.m4s",INDEPENDENT=YES
#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part9.1.m4s"
#EXT-X-RENDITION-REPORT:URI="../360p/index.m3u8",LAST-MSN=9,LAST-PART=0
"""


def test_live_media_playlist_renders_every_ll_hls_tag():
    assert render_media_playlist(LIVE) == LIVE_TEXT


def test_query_is_carried_onto_every_uri():
    text = render_media_playlist(LIVE, query="token=abc")
    uris = [line for line in text.splitlines() if "m4s" in line or "mp4" in line]
    assert uris and all("token=abc" in line for line in uris)
    assert 'URI="../360p/index.m3u8?token=abc"' in text


@pytest.mark.parametrize("change, present, absent", [
    (dict(skipped_segments=1), ["#EXT-X-SKIP:SKIPPED-SEGMENTS=1"], ["seg7.m4s"]),
    (dict(ended=True), ["#EXT-X-ENDLIST"], ["PRELOAD-HINT"]),
    (dict(discontinuity_sequence=3), ["#EXT-X-DISCONTINUITY-SEQUENCE:3"], []),
    (dict(open_segment_discontinuity=True), ["#EXT-X-DISCONTINUITY\n#EXT-X-PROGRAM-DATE-TIME"], []),
    (dict(part_target=None), ["#EXT-X-MAP"], ["SERVER-CONTROL", "PART-INF"]),
])
def test_optional_tags(change, present, absent):
    from dataclasses import replace
    text = render_media_playlist(replace(LIVE, **change))
    for fragment in present:
        assert fragment in text
    for fragment in absent:
        assert fragment not in text


def test_discontinuity_precedes_its_segment():
    playlist = MediaPlaylist(2, 0, "init.mp4", (SegmentEntry(0, 2.0, "seg0.m4s"),
                                               SegmentEntry(1, 2.0, "seg1.m4s", discontinuity=True)))
    lines = render_media_playlist(playlist).splitlines()
    assert lines[lines.index("seg1.m4s") - 2] == "#EXT-X-DISCONTINUITY"


def test_multivariant_lists_audio_group_and_variants():
    playlist = MultivariantPlaylist(
        variants=(VariantStream("720p/index.m3u8", 3_200_000, 2_900_000, "avc1.64001f,mp4a.40.2",
                                1280, 720, 30.0, audio_group="aac", name="720p"),),
        audio=(AudioRendition("aac", "default", "audio/index.m3u8", 2),))
    assert render_multivariant_playlist(playlist) == (
        "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-INDEPENDENT-SEGMENTS\n"
        '#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aac",NAME="default",DEFAULT=YES,AUTOSELECT=YES,'
        'CHANNELS="2",URI="audio/index.m3u8"\n'
        '#EXT-X-STREAM-INF:BANDWIDTH=3200000,AVERAGE-BANDWIDTH=2900000,CODECS="avc1.64001f,'
        'mp4a.40.2",RESOLUTION=1280x720,FRAME-RATE=30.000,AUDIO="aac",NAME="720p"\n'
        "720p/index.m3u8\n")


@pytest.mark.parametrize("longest, target", [(2.0, 2), (2.49, 2), (2.5, 3), (0.4, 1), (10.0, 10)])
def test_target_duration_rounds_to_nearest(longest, target):
    assert target_duration_for(longest) == target


# -- EXT-X-MAP placement (RFC 8216bis 4.4.4.5: a MAP applies until the next one) ------------------
def _maps(text: str) -> list[str]:
    """The playlist's lines reduced to MAP URIs, DISCONTINUITY, SKIP, segment and part URIs."""
    kept = []
    for line in text.splitlines():
        if line.startswith("#EXT-X-MAP:"):
            kept.append("MAP " + line.split('"')[1])
        elif line == "#EXT-X-DISCONTINUITY" or line.startswith("#EXT-X-SKIP"):
            kept.append(line[7:].split(":")[0])
        elif line.startswith("#EXT-X-PART:"):
            kept.append(line.split('"')[1])
        elif line.endswith(".m4s"):
            kept.append(line)
    return kept


_OLD, _NEW = "init.mp4", "init-1.mp4"


@pytest.mark.parametrize("segments, change, expected", [
    # One format: one MAP, at the top.
    ([(7, _OLD, False), (8, _OLD, False)], {}, ["MAP init.mp4", "seg7.m4s", "seg8.m4s"]),
    # A format change after a discontinuity: its MAP follows the DISCONTINUITY.
    ([(7, _OLD, False), (8, _NEW, True)], {},
     ["MAP init.mp4", "seg7.m4s", "DISCONTINUITY", "MAP init-1.mp4", "seg8.m4s"]),
    # The window slid past the change: the first segment's MAP is the only one.
    ([(8, _NEW, True), (9, _NEW, False)], dict(map_uri=_NEW),
     ["MAP init-1.mp4", "DISCONTINUITY", "seg8.m4s", "seg9.m4s"]),
    # A delta update skipping the old format's segments: the MAP in force for the first
    # segment after the skip comes after EXT-X-SKIP, the skipped one is left out.
    ([(7, _OLD, False), (8, _NEW, True), (9, _NEW, False)],
     dict(map_uri=_NEW, skipped_segments=1),
     ["SKIP", "MAP init-1.mp4", "DISCONTINUITY", "seg8.m4s", "seg9.m4s"]),
    # Skipping segments of the same format still states their MAP.
    ([(7, _OLD, False), (8, _OLD, False)], dict(skipped_segments=1),
     ["SKIP", "MAP init.mp4", "seg8.m4s"]),
    # The open segment of a new format: its MAP precedes its parts.
    ([(7, _OLD, False)], dict(open_parts=(PartEntry(0.5, "part8.0.m4s", True),),
                             open_segment_discontinuity=True, open_segment_map_uri=_NEW),
     ["MAP init.mp4", "seg7.m4s", "DISCONTINUITY", "MAP init-1.mp4", "part8.0.m4s"]),
    # Back to the first format: a MAP each time it changes.
    ([(7, _OLD, False), (8, _NEW, True), (9, "init.mp4", True)], {},
     ["MAP init.mp4", "seg7.m4s", "DISCONTINUITY", "MAP init-1.mp4", "seg8.m4s",
      "DISCONTINUITY", "MAP init.mp4", "seg9.m4s"]),
])
def test_every_segment_is_preceded_by_the_map_in_force_for_it(segments, change, expected):
    playlist = MediaPlaylist(
        target_duration=2, media_sequence=segments[0][0], map_uri=_OLD,
        segments=tuple(SegmentEntry(msn, 2.0, f"seg{msn}.m4s", discontinuity=discontinuity,
                                    map_uri=map_uri)
                       for msn, map_uri, discontinuity in segments))
    from dataclasses import replace
    assert _maps(render_media_playlist(replace(playlist, **change))) == expected


def test_map_uris_carry_the_query():
    playlist = MediaPlaylist(2, 7, _OLD, (SegmentEntry(7, 2.0, "seg7.m4s", map_uri=_OLD),
                                          SegmentEntry(8, 2.0, "seg8.m4s", discontinuity=True,
                                                       map_uri=_NEW)))
    text = render_media_playlist(playlist, query="token=abc")
    assert '#EXT-X-MAP:URI="init.mp4?token=abc"' in text
    assert '#EXT-X-MAP:URI="init-1.mp4?token=abc"' in text
