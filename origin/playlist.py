"""The HLS playlist model (RFC 8216bis with Low-Latency HLS) and its text rendering.

Plain values in, text out: no I/O, no clock. The packager and the live window build these values; the
HTTP layer serves ``render_*`` output. Durations are seconds (float), as playlists state them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

PLAYLIST_VERSION = 9  # EXT-X-SKIP (delta updates) needs 9


@dataclass(frozen=True)
class PartEntry:
    """One ``EXT-X-PART``."""

    duration: float
    uri: str
    independent: bool


@dataclass(frozen=True)
class SegmentEntry:
    """One media segment: its ``EXTINF``, the parts listed for it, and tags that precede it."""

    msn: int
    duration: float
    uri: str
    program_date_time: float | None = None  # seconds since the epoch
    discontinuity: bool = False
    parts: tuple[PartEntry, ...] = ()
    map_uri: str | None = None  # its init segment (EXT-X-MAP); None: the playlist's ``map_uri``


@dataclass(frozen=True)
class RenditionReport:
    """One ``EXT-X-RENDITION-REPORT``: where another rendition of the stream is."""

    uri: str
    last_msn: int
    last_part: int | None


@dataclass(frozen=True)
class MediaPlaylist:
    """A live (or ended) media playlist.

    ``segments`` are complete segments, oldest first. ``open_parts`` are the parts of the segment being
    produced (with MSN ``next_msn``), listed after the last complete segment. ``skipped_segments`` > 0
    renders a delta update: that many leading segments are replaced by ``EXT-X-SKIP``.

    ``map_uri`` is the init segment of the first segment listed (after any skipped ones), and of
    every segment whose own ``map_uri`` is None; ``open_segment_map_uri`` that of the open (or
    hinted) segment. An ``EXT-X-MAP`` is rendered before the first segment listed and wherever the
    init segment changes (RFC 8216bis 4.4.4.5: a MAP applies until the next one).
    """

    target_duration: int
    media_sequence: int
    map_uri: str
    segments: tuple[SegmentEntry, ...]
    part_target: float | None = None
    discontinuity_sequence: int = 0
    open_parts: tuple[PartEntry, ...] = ()
    open_segment_discontinuity: bool = False
    open_segment_program_date_time: float | None = None
    open_segment_map_uri: str | None = None  # None: the last listed segment's
    preload_hint_uri: str | None = None
    rendition_reports: tuple[RenditionReport, ...] = ()
    part_hold_back: float | None = None
    can_skip_until: float | None = None
    skipped_segments: int = 0
    ended: bool = False

    @property
    def next_msn(self) -> int:
        return self.media_sequence + len(self.segments)


@dataclass(frozen=True)
class AudioRendition:
    """One ``EXT-X-MEDIA:TYPE=AUDIO`` entry."""

    group_id: str
    name: str
    uri: str
    channels: int
    default: bool = True


@dataclass(frozen=True)
class VariantStream:
    """One ``EXT-X-STREAM-INF`` entry with its URI."""

    uri: str
    bandwidth: int
    average_bandwidth: int | None
    codecs: str
    width: int
    height: int
    frame_rate: float
    audio_group: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class MultivariantPlaylist:
    variants: tuple[VariantStream, ...]
    audio: tuple[AudioRendition, ...] = field(default=())


def _with_query(uri: str, query: str) -> str:
    if not query:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}{query}"


def _seconds(value: float) -> str:
    # Fixed three decimals: stable text (tests, caches) and millisecond precision.
    return f"{value:.3f}"


def _date_time(epoch_seconds: float) -> str:
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _part_line(part: PartEntry, query: str) -> str:
    line = f'#EXT-X-PART:DURATION={_seconds(part.duration)},URI="{_with_query(part.uri, query)}"'
    return line + (",INDEPENDENT=YES" if part.independent else "")


def _map_line(uri: str, query: str) -> str:
    return f'#EXT-X-MAP:URI="{_with_query(uri, query)}"'


def render_media_playlist(playlist: MediaPlaylist, query: str = "") -> str:
    """Render ``playlist`` as text. ``query`` (e.g. ``token=...``) is appended to every URI listed."""
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{PLAYLIST_VERSION}",
             f"#EXT-X-TARGETDURATION:{playlist.target_duration}"]
    if playlist.part_target is not None:
        control = ["CAN-BLOCK-RELOAD=YES"]
        if playlist.can_skip_until is not None:
            control.append(f"CAN-SKIP-UNTIL={_seconds(playlist.can_skip_until)}")
        if playlist.part_hold_back is not None:
            control.append(f"PART-HOLD-BACK={_seconds(playlist.part_hold_back)}")
        lines.append("#EXT-X-SERVER-CONTROL:" + ",".join(control))
        lines.append(f"#EXT-X-PART-INF:PART-TARGET={_seconds(playlist.part_target)}")
    lines.append(f"#EXT-X-MEDIA-SEQUENCE:{playlist.media_sequence}")
    if playlist.discontinuity_sequence:
        lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{playlist.discontinuity_sequence}")
    # The skipped segments' tags (their MAPs too) are left out: the MAP in force for the first
    # segment after the skip is one of that segment's tags.
    if playlist.skipped_segments:
        lines.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={playlist.skipped_segments}")
    current_map = playlist.map_uri
    lines.append(_map_line(current_map, query))
    for segment in playlist.segments[playlist.skipped_segments:]:
        if segment.discontinuity:
            lines.append("#EXT-X-DISCONTINUITY")
        if (segment.map_uri or playlist.map_uri) != current_map:
            current_map = segment.map_uri or playlist.map_uri
            lines.append(_map_line(current_map, query))
        if segment.program_date_time is not None:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date_time(segment.program_date_time)}")
        lines.extend(_part_line(part, query) for part in segment.parts)
        lines.append(f"#EXTINF:{_seconds(segment.duration)},")
        lines.append(_with_query(segment.uri, query))
    if playlist.open_parts or playlist.preload_hint_uri:
        if playlist.open_segment_discontinuity:
            lines.append("#EXT-X-DISCONTINUITY")
        if playlist.open_segment_map_uri and playlist.open_segment_map_uri != current_map:
            lines.append(_map_line(playlist.open_segment_map_uri, query))
        if playlist.open_segment_program_date_time is not None:
            lines.append(
                f"#EXT-X-PROGRAM-DATE-TIME:{_date_time(playlist.open_segment_program_date_time)}")
        lines.extend(_part_line(part, query) for part in playlist.open_parts)
    if playlist.preload_hint_uri and not playlist.ended:
        lines.append(
            f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{_with_query(playlist.preload_hint_uri, query)}"')
    for report in playlist.rendition_reports:
        attributes = [f'URI="{_with_query(report.uri, query)}"', f"LAST-MSN={report.last_msn}"]
        if report.last_part is not None:
            attributes.append(f"LAST-PART={report.last_part}")
        lines.append("#EXT-X-RENDITION-REPORT:" + ",".join(attributes))
    if playlist.ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def render_multivariant_playlist(playlist: MultivariantPlaylist, query: str = "") -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for audio in playlist.audio:
        lines.append(
            f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="{audio.group_id}",NAME="{audio.name}",'
            f'DEFAULT={"YES" if audio.default else "NO"},AUTOSELECT=YES,'
            f'CHANNELS="{audio.channels}",URI="{_with_query(audio.uri, query)}"')
    for variant in playlist.variants:
        attributes = [f"BANDWIDTH={variant.bandwidth}"]
        if variant.average_bandwidth is not None:
            attributes.append(f"AVERAGE-BANDWIDTH={variant.average_bandwidth}")
        attributes += [f'CODECS="{variant.codecs}"', f"RESOLUTION={variant.width}x{variant.height}",
                       f"FRAME-RATE={variant.frame_rate:.3f}"]
        if variant.audio_group:
            attributes.append(f'AUDIO="{variant.audio_group}"')
        if variant.name:
            attributes.append(f'NAME="{variant.name}"')
        lines.append("#EXT-X-STREAM-INF:" + ",".join(attributes))
        lines.append(_with_query(variant.uri, query))
    return "\n".join(lines) + "\n"


def target_duration_for(longest_segment: float) -> int:
    """``EXT-X-TARGETDURATION``: every EXTINF rounded to the nearest integer must not exceed it."""
    return max(1, math.floor(longest_segment + 0.5))
