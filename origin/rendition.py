"""What one rendition's media playlist lists: a rolling window of segments and the newest parts.

Pure: it applies packager events and answers questions (is this part there yet? how far ahead is
this request? which objects left the window?). The asyncio layer (``origin.live``) stores bytes and
wakes waiting requests.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from origin.packager import PackagerEvent, PartReady, SegmentOpened, SegmentReady
from origin.playlist import MediaPlaylist, PartEntry, RenditionReport, SegmentEntry

ADVANCE_PART_LIMIT = 3  # RFC 8216bis 6.2.5.2: a part request further ahead than this gets 400
PART_LISTING_TARGET_DURATIONS = 3  # parts are listed only for segments this close to the live edge


_INIT_NAME = re.compile(r"init(?:-[1-9][0-9]*)?\.mp4")


def init_uri(generation: int = 0) -> str:
    """The init segment of a track's ``generation``-th format (``TrackPackager.init_generation``).
    Each format gets its own URI because players cache init segments by URI: a new one at the
    same URI would be decoded as the old one. The first keeps ``init.mp4``."""
    return "init.mp4" if generation == 0 else f"init-{generation}.mp4"


def is_init_name(name: str) -> bool:
    """Whether ``name`` is what ``init_uri`` gives for some generation."""
    return _INIT_NAME.fullmatch(name) is not None


def segment_uri(msn: int) -> str:
    return f"seg{msn}.m4s"


def part_uri(msn: int, index: int) -> str:
    return f"part{msn}.{index}.m4s"


class Readiness(enum.Enum):
    READY = "ready"  # answer now
    WAIT = "wait"  # hold the request until the rendition changes
    TOO_FAR = "too_far"  # 400: the request is beyond what a client may block for
    GONE = "gone"  # the object slid out of the window (404)


@dataclass
class _Segment:
    msn: int
    program_date_time: float
    discontinuity: bool
    init_generation: int
    parts: list[PartEntry] = field(default_factory=list)
    duration: float = 0.0
    complete: bool = False
    size: int = 0  # bytes, once complete


@dataclass(frozen=True)
class WindowChange:
    """Object names (relative to the rendition) that stopped being listed by this change."""

    unlisted: tuple[str, ...]


@dataclass(frozen=True)
class RenditionSettings:
    segment_duration: float
    part_duration: float
    window_segments: int
    target_duration: int


class RenditionLog:
    """The playlist state of one rendition. Event order: opened, parts, ready, per segment;
    ``declare`` the track's format (init generation) before its segments."""

    def __init__(self, settings: RenditionSettings) -> None:
        self.settings = settings
        self._segments: list[_Segment] = []  # oldest first; the last may be open
        self.discontinuity_sequence = 0
        self.init_generation = 0  # the declared format's: the next segment's
        self._inits = {0}  # generations whose init segment is still needed
        # What is listed by name, for object requests (every part or segment request asks):
        # the segment a segment name stands for, and the part names.
        self._segment_names: dict[str, _Segment] = {}
        self._part_names: set[str] = set()
        self.ended = False
        self.version = 0  # bumps on every change; renders and waiters key on it

    # -- applying events ----------------------------------------------------------------------------
    def declare(self, init_generation: int) -> WindowChange:
        """The track (re)declared its format: segments opened from now on need the init segment
        of ``init_generation``. An older init no listed segment needs is unlisted."""
        self.version += 1
        self.init_generation = init_generation
        self._inits.add(init_generation)
        return WindowChange(self._unneeded_inits())

    def apply(self, event: PackagerEvent) -> WindowChange:
        self.version += 1
        if isinstance(event, SegmentOpened):
            segment = _Segment(event.msn, event.program_date_time, event.discontinuity,
                               event.init_generation)
            self._segments.append(segment)
            self._segment_names[segment_uri(event.msn)] = segment
            self._inits.add(event.init_generation)  # a replayed log's may predate ``declare``
        elif isinstance(event, PartReady):
            segment = self._segment(event.msn)
            name = part_uri(event.msn, event.index)
            segment.parts.append(PartEntry(event.duration, name, event.independent))
            self._part_names.add(name)
        elif isinstance(event, SegmentReady):
            segment = self._segment(event.msn)
            segment.complete = True
            segment.duration = event.duration
            segment.size = event.size
        return WindowChange(self._slide())

    def end(self) -> None:
        self.version += 1
        self.ended = True
        if self._segments and not self._segments[-1].complete:
            self._forget(self._segments.pop())  # an unfinished segment is not listed after ENDLIST

    def _segment(self, msn: int) -> _Segment:
        if not self._segments or self._segments[-1].msn != msn:
            raise ValueError(f"event for segment {msn} which is not the open one")
        return self._segments[-1]

    def _slide(self) -> tuple[str, ...]:
        unlisted: list[str] = []
        complete = [s for s in self._segments if s.complete]
        while len(complete) > self.settings.window_segments:
            oldest = self._segments.pop(0)
            complete.pop(0)
            if oldest.discontinuity:
                self.discontinuity_sequence += 1
            unlisted += self._forget(oldest)
        return tuple(unlisted) + self._unneeded_inits() if unlisted else ()

    def _forget(self, segment: _Segment) -> list[str]:
        """``segment`` left the window: its names, no longer listed."""
        names = [segment_uri(segment.msn), *(part.uri for part in segment.parts)]
        self._segment_names.pop(names[0], None)
        self._part_names.difference_update(names[1:])
        return names

    def _unneeded_inits(self) -> tuple[str, ...]:
        """Init segments of past formats that no listed segment needs any more (forgotten)."""
        needed = {segment.init_generation for segment in self._segments} | {self.init_generation}
        unneeded = sorted(self._inits - needed)
        self._inits -= set(unneeded)
        return tuple(init_uri(generation) for generation in unneeded)

    # -- questions ------------------------------------------------------------------------------------
    @property
    def has_media(self) -> bool:
        return any(segment.parts for segment in self._segments)

    def last_part(self) -> tuple[int, int] | None:
        """(msn, index) of the newest part, or None before the first."""
        for segment in reversed(self._segments):
            if segment.parts:
                return segment.msn, len(segment.parts) - 1
        return None

    def readiness(self, msn: int, part: int | None) -> Readiness:
        """Whether a blocking reload for ``_HLS_msn=msn`` (and ``_HLS_part=part``) can be answered."""
        if self.ended:
            return Readiness.READY
        newest = self._segments[-1] if self._segments else None
        newest_msn = newest.msn if newest else -1
        if msn > newest_msn + 2:
            return Readiness.TOO_FAR
        if msn > newest_msn:  # the next segment's parts (a preload hint's): none exists yet
            return Readiness.WAIT
        for segment in reversed(self._segments):  # most ask for the newest
            if segment.msn != msn:
                continue
            if part is None or (segment.complete and part >= len(segment.parts)):
                # A part index past the end of a complete segment means part 0 of the next one.
                return self.readiness(msn + 1, 0) if part is not None else (
                    Readiness.READY if segment.complete else Readiness.WAIT)
            if part < len(segment.parts):
                return Readiness.READY
            if part > len(segment.parts) - 1 + ADVANCE_PART_LIMIT:
                return Readiness.TOO_FAR
            return Readiness.WAIT
        if self._segments and msn < self._segments[0].msn:
            return Readiness.READY  # already behind the window: the current playlist answers it
        return Readiness.WAIT

    def object_state(self, name: str) -> Readiness:
        """For a part or segment name: READY if listed, WAIT if it is the next part (preload
        hint) or segment being produced, GONE otherwise. An init segment is READY while a listed
        segment (or the next one) needs it."""
        if name in self._part_names:
            return Readiness.READY
        segment = self._segment_names.get(name)
        if segment is not None:
            return Readiness.READY if segment.complete else Readiness.WAIT
        if is_init_name(name):
            return Readiness.READY if name in map(init_uri, self._inits) else Readiness.GONE
        if not self.ended and name == self.preload_hint():
            return Readiness.WAIT
        return Readiness.GONE

    def preload_hint(self) -> str | None:
        if self.ended or not self._segments:
            return None
        newest = self._segments[-1]
        if newest.complete:
            return part_uri(newest.msn + 1, 0)
        return part_uri(newest.msn, len(newest.parts))

    def segment_sizes(self) -> list[tuple[float, int]]:
        """(duration seconds, bytes) of the complete segments in the window, for bandwidth."""
        return [(s.duration, s.size) for s in self._segments if s.complete and s.duration > 0]

    def playlist(self, skip: bool = False,
                 reports: tuple[RenditionReport, ...] = ()) -> MediaPlaylist:
        settings = self.settings
        complete = [s for s in self._segments if s.complete]
        open_segment = self._segments[-1] if self._segments and not self._segments[-1].complete \
            else None
        # Parts are listed for segments within three target durations of the live edge.
        budget = PART_LISTING_TARGET_DURATIONS * settings.target_duration
        if open_segment:
            budget -= sum(part.duration for part in open_segment.parts)
        with_parts = 0
        for segment in reversed(complete):
            if budget <= 0:
                break
            budget -= segment.duration
            with_parts += 1
        entries = tuple(
            SegmentEntry(msn=s.msn, duration=s.duration, uri=segment_uri(s.msn),
                         program_date_time=s.program_date_time, discontinuity=s.discontinuity,
                         parts=tuple(s.parts) if i >= len(complete) - with_parts else (),
                         map_uri=init_uri(s.init_generation))
            for i, s in enumerate(complete))
        can_skip_until = 6.0 * settings.target_duration
        skipped = 0
        if skip:
            # Skip the segments that end before the skip boundary (CAN-SKIP-UNTIL from the end).
            total = sum(s.duration for s in complete) + (
                sum(p.duration for p in open_segment.parts) if open_segment else 0.0)
            elapsed = 0.0
            for segment in complete:
                elapsed += segment.duration
                if total - elapsed < can_skip_until:
                    break
                skipped += 1
        # The next segment (open, or hinted) needs the declared format's init unless it is open
        # with an older one (declared while it was being cut: the next one switches).
        next_init = init_uri(open_segment.init_generation if open_segment else self.init_generation)
        listed = entries[skipped:]
        return MediaPlaylist(
            target_duration=settings.target_duration,
            media_sequence=complete[0].msn if complete else (open_segment.msn if open_segment
                                                                else 0),
            map_uri=listed[0].map_uri if listed else next_init,
            segments=entries,
            part_target=settings.part_duration,
            discontinuity_sequence=self.discontinuity_sequence,
            open_parts=tuple(open_segment.parts) if open_segment else (),
            open_segment_discontinuity=bool(open_segment and open_segment.discontinuity),
            open_segment_program_date_time=open_segment.program_date_time if open_segment
            else None,
            open_segment_map_uri=next_init,
            preload_hint_uri=self.preload_hint(),
            rendition_reports=reports,
            part_hold_back=3.0 * settings.part_duration,
            can_skip_until=can_skip_until,
            skipped_segments=skipped,
            ended=self.ended,
        )
