"""The LL-HLS packager: a pure state machine that cuts encoded samples into CMAF parts and segments.

Samples go in (with the wall-clock time as an input, for ``EXT-X-PROGRAM-DATE-TIME``); events come
out: a segment opened, a part ready (with its fMP4 bytes), a segment ready. No I/O, no asyncio.

Cutting rules, shared by every track so renditions stay aligned:
- Time is cut on a grid anchored at output time 0: segments every ``segment_duration``, parts every
  ``part_duration`` from the segment's grid start (and at the segment's grid end).
- A video segment starts only on a keyframe at or after the segment's grid end (the transcoder puts
  IDR frames on the grid, so every rung cuts at the same instant). An audio segment starts with the
  first frame that would cross the grid end.
- An audio part closes before a sample that would end past the part's grid end, and as soon as a
  sample reaches it, so a part is ready the moment its last sample arrives.
- A video part boundary falls before the frame nearest the grid point: a part closes before a
  frame that starts less than half a frame interval before its grid end (or later), and as soon as
  the frame that ends there is known (durations come from the next frame). At the segment's grid
  end only the IDR starts the next part (the transcoder puts it on the grid, or on the first frame
  after it), so a frame that straddles the grid end closes the last part. Either way a video part
  is at most half a frame off the grid at each end, never a one-frame sliver before an IDR that a
  browser's millisecond timestamps placed a frame late.
- After a discontinuity (a republish or reconnect) every track resumes at the next segment grid point
  after the furthest track, with one shared offset, so audio and video stay in sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ingest.media import EncodedSample, TrackInfo, TrackKind
from origin import fmp4


# Audio frames (1024 samples) do not divide the part grid, so a part may end one AAC frame past it,
# and a video part may start and end half a frame off it; PART-TARGET states the larger bound (a
# frame at 24 fps or more), and no part is ever cut longer than it.
PART_TARGET_MARGIN = max(1024 / 48_000, 1 / 24)


@dataclass(frozen=True)
class PackagerSettings:
    segment_duration: float  # target, seconds
    part_duration: float  # the part grid step, seconds

    @property
    def part_target(self) -> float:
        """The ``PART-TARGET`` to advertise: the longest part this packager cuts, in seconds."""
        return math.ceil((self.part_duration + PART_TARGET_MARGIN) * 1000) / 1000


@dataclass(frozen=True)
class SegmentOpened:
    track: str
    msn: int
    program_date_time: float  # seconds since the epoch
    discontinuity: bool
    init_generation: int = 0  # which init segment of the track it needs (``TrackPackager``)


@dataclass(frozen=True)
class PartReady:
    track: str
    msn: int
    index: int  # position of the part in its segment, from 0
    duration: float  # seconds
    independent: bool
    data: bytes  # one moof+mdat


@dataclass(frozen=True)
class SegmentReady:
    track: str
    msn: int
    duration: float  # seconds
    part_count: int
    size: int  # bytes; replicas of the event carry no data but keep the size
    data: bytes  # the parts' bytes, concatenated


PackagerEvent = SegmentOpened | PartReady | SegmentReady


class TrackPackager:
    """Cuts the samples of one track. Times below are ticks of ``track.timescale`` on the output timeline."""

    def __init__(self, track: TrackInfo, settings: PackagerSettings, first_msn: int = 0,
                 init_generation: int = 0) -> None:
        self.track = track
        self.init_segment = fmp4.init_segment(track)
        # Counts the track's distinct init segments: its segments name the one they need, so a
        # player never decodes them with another (``origin.rendition.init_uri``).
        self.init_generation = init_generation
        self._is_video = track.kind is TrackKind.VIDEO
        self._segment_ticks = round(settings.segment_duration * track.timescale)
        self._part_ticks = round(settings.part_duration * track.timescale)
        self._longest_part = math.floor(settings.part_target * track.timescale)
        self._tolerance = track.timescale // 1000  # 1 ms: absorbs rounding of source timestamps
        self._next_msn = first_msn
        # For a track joining a running stream: the output time (ticks) of segment ``first_msn``
        # on the grid, so its first segment takes the number the other tracks give that instant.
        self._first_msn_at: int | None = None
        self._fragment_sequence = 1
        self._held: EncodedSample | None = None  # a sample whose duration the next dts will tell
        self._last_duration = round(track.timescale / (track.frame_rate or 30.0)) if self._is_video \
            else 1024
        self._half_frame = self._last_duration // 2 if self._is_video else 0
        # Open segment and part.
        self._segment_open = False
        self._segment_msn = 0
        self._segment_start = 0
        self._segment_grid_start = 0
        self._segment_grid_end = 0
        self._segment_parts: list[bytes] = []
        self._segment_duration = 0
        self._part_grid_end = 0
        self._part_samples: list[EncodedSample] = []
        # Period: output time = input dts + offset; samples before period_start are dropped.
        self.offset = 0
        self.period_start = 0
        self._pending_discontinuity = False
        self.end_time = 0  # end of the last sample cut, output ticks
        self.dropped_samples = 0

    # -- inputs ---------------------------------------------------------------------------------
    def push(self, sample: EncodedSample, wall_anchor: float) -> list[PackagerEvent]:
        """Add one sample (decode order). ``wall_anchor`` is the epoch time of output time 0."""
        events: list[PackagerEvent] = []
        if self._held is not None:
            held, self._held = self._held, None
            duration = sample.dts - held.dts
            if duration <= 0:
                duration = self._last_duration
            self._cut(replace(held, duration=duration), wall_anchor, events)
            if sample.keyframe and self._segment_open and self._opens_segment(sample):
                # The open segment ends here, not when this keyframe is cut a frame later:
                # meanwhile its playlist would hint a part of it that never comes (a 404 for
                # every player at every segment's end).
                self._close_segment(events)
        if sample.duration > 0 and not self._is_video:
            self._cut(sample, wall_anchor, events)
        else:
            # Video durations come from the next frame's dts: live sources (WebRTC above all) do
            # not keep a steady frame interval, and a nominal duration would leave gaps between
            # parts that players treat as holes in the buffer. It costs one frame of latency.
            if sample.duration > 0:
                self._last_duration = sample.duration
            self._held = sample
        return events

    def finish(self, wall_anchor: float) -> list[PackagerEvent]:
        """Close the open part and segment (the source ended or is about to restart)."""
        events: list[PackagerEvent] = []
        if self._held is not None:
            held, self._held = self._held, None
            self._cut(replace(held, duration=self._last_duration), wall_anchor, events)
        self._close_segment(events)
        return events

    def start_period(self, offset: int, period_start: int, discontinuity: bool) -> None:
        """Begin a period (after ``finish``): later samples map to ``dts + offset``; the first
        segment of the period carries ``EXT-X-DISCONTINUITY`` when ``discontinuity``."""
        self.offset = offset
        self.period_start = period_start
        self._pending_discontinuity = discontinuity

    def number_from(self, grid_time: int) -> None:
        """Number segments by the grid from ``grid_time`` (output ticks, a segment grid point):
        the first segment opened there gets ``first_msn``, one opened N grid steps later
        ``first_msn + N`` (a track joining a running stream, whose first keyframe may come late)."""
        self._first_msn_at = grid_time

    @property
    def next_msn(self) -> int:
        return self._next_msn

    def numbering(self) -> tuple[int, float | None]:
        """(MSN, output seconds of its grid point) of the segment being cut, else of the next
        one; the time is None before this track cut anything (where it starts is not known)."""
        timescale = self.track.timescale
        if self._segment_open:
            return self._segment_msn, self._segment_grid_start / timescale
        held = self._held
        if self.end_time and held is not None and held.keyframe \
                and not self._pending_discontinuity:
            # The segment ended as this keyframe arrived (``push``): where it will open the next.
            grid_start = self._grid_start(self._grid_anchor(self._on_output_clock(held)))
            return self._next_msn, grid_start / timescale
        if self.end_time:
            next_start = -(-self.end_time // self._segment_ticks) * self._segment_ticks
            return self._next_msn, next_start / timescale
        return self._next_msn, None

    # -- cutting ------------------------------------------------------------------------------------
    def _cut(self, sample: EncodedSample, wall_anchor: float, events: list[PackagerEvent]) -> None:
        sample = self._on_output_clock(sample)
        start = sample.dts
        if start < self.period_start:
            self.dropped_samples += 1
            return
        end = start + sample.duration
        self._last_duration = sample.duration
        if not self._segment_open:
            if self._is_video and not sample.keyframe:
                self.dropped_samples += 1  # a decoder cannot start here
                return
            self._open_segment(self._grid_anchor(sample), wall_anchor, events)
        elif self._starts_new_segment(sample, start, end):
            self._close_segment(events)
            self._open_segment(self._grid_anchor(sample), wall_anchor, events)
        if self._part_samples and (self._past_part_end(start, end)
                                   or end - self._part_samples[0].dts > self._longest_part):
            self._close_part(events)
            self._part_grid_end = self._next_part_boundary(self._part_grid_end)
        while self._part_grid_end <= start + self._tolerance:
            self._part_grid_end = self._next_part_boundary(self._part_grid_end)
        self._part_samples.append(sample)
        self.end_time = end
        # For video ``end`` is where the next frame starts: if it starts the next part, this one
        # is complete now.
        if end + self._half_frame >= self._part_grid_end - self._tolerance:
            self._close_part(events)
            if not self._is_video and self._part_grid_end == self._segment_grid_end:
                self._close_segment(events)  # the next sample starts the next one: say so now
            self._part_grid_end = self._next_part_boundary(self._part_grid_end)

    def _past_part_end(self, start: int, end: int) -> bool:
        """Whether a sample from ``start`` to ``end`` belongs after the open part's grid end."""
        if not self._is_video:
            return end > self._part_grid_end + self._tolerance
        if self._part_grid_end == self._segment_grid_end:
            return False  # only the next segment's IDR ends the last part
        return start + self._half_frame >= self._part_grid_end - self._tolerance

    def _starts_new_segment(self, sample: EncodedSample, start: int, end: int) -> bool:
        if self._is_video:
            # A keyframe's presentation time places it on the grid: with B-frames (a passed-through
            # source) its decode time comes a little earlier.
            return sample.keyframe and max(start, sample.pts) + self._tolerance \
                >= self._segment_grid_end
        return end > self._segment_grid_end + self._tolerance

    def _opens_segment(self, keyframe: EncodedSample) -> bool:
        """Whether ``keyframe`` (video, or any audio sample), still uncut, will start the next
        segment."""
        keyframe = self._on_output_clock(keyframe)
        start = keyframe.dts
        return start >= self.period_start and self._starts_new_segment(keyframe, start, start)

    def _on_output_clock(self, sample: EncodedSample) -> EncodedSample:
        """``sample`` with its times in output ticks (this period's offset added)."""
        return replace(sample, dts=sample.dts + self.offset, pts=sample.pts + self.offset)

    def _grid_anchor(self, sample: EncodedSample) -> int:
        """Where a segment starting with ``sample`` sits on the grid (its presentation time for
        video, so B-frame sources cut where the ladder does)."""
        return max(sample.dts, sample.pts) if self._is_video else sample.dts

    def _grid_start(self, start: int) -> int:
        """The grid point of a segment that starts at ``start``."""
        grid_start = (start + self._tolerance) // self._segment_ticks * self._segment_ticks
        if self._segment_grid_end > grid_start and not self._pending_discontinuity:
            grid_start = self._segment_grid_end  # audio cut just before the grid point
        return grid_start

    def _open_segment(self, start: int, wall_anchor: float, events: list[PackagerEvent]) -> None:
        grid_start = self._grid_start(start)
        if self._first_msn_at is not None:
            self._next_msn += max(0, (grid_start - self._first_msn_at) // self._segment_ticks)
            self._first_msn_at = None
        self._segment_open = True
        self._segment_msn = self._next_msn
        self._next_msn += 1
        self._segment_start = start
        self._segment_grid_start = grid_start
        self._segment_grid_end = grid_start + self._segment_ticks
        self._segment_parts = []
        self._segment_duration = 0
        self._part_grid_end = self._next_part_boundary(grid_start)
        events.append(SegmentOpened(
            track=self.track.name, msn=self._segment_msn,
            program_date_time=wall_anchor + start / self.track.timescale,
            discontinuity=self._pending_discontinuity, init_generation=self.init_generation))
        self._pending_discontinuity = False

    def _next_part_boundary(self, after: int) -> int:
        """The first part boundary after ``after``: the part grid, plus the segment's grid end."""
        steps = (after - self._segment_grid_start) // self._part_ticks + 1
        boundary = self._segment_grid_start + steps * self._part_ticks
        if after < self._segment_grid_end < boundary:
            return self._segment_grid_end
        return boundary

    def _close_part(self, events: list[PackagerEvent]) -> None:
        if not self._part_samples:
            return
        samples, self._part_samples = self._part_samples, []
        data = fmp4.media_fragment(self.track, self._fragment_sequence, samples[0].dts, samples)
        self._fragment_sequence += 1
        duration = sum(sample.duration for sample in samples)
        independent = samples[0].keyframe if self._is_video else True
        self._segment_duration += duration
        events.append(PartReady(
            track=self.track.name, msn=self._segment_msn, index=len(self._segment_parts),
            duration=duration / self.track.timescale, independent=independent, data=data))
        self._segment_parts.append(data)

    def _close_segment(self, events: list[PackagerEvent]) -> None:
        """Close the open segment, its open part first."""
        if not self._segment_open:
            return
        self._close_part(events)
        self._segment_open = False
        if not self._segment_parts:
            return
        events.append(SegmentReady(
            track=self.track.name, msn=self._segment_msn,
            duration=self._segment_duration / self.track.timescale,
            part_count=len(self._segment_parts), size=sum(map(len, self._segment_parts)),
            data=b"".join(self._segment_parts)))


class StreamPackager:
    """The packagers of every track of one stream, with their shared clock and periods."""

    def __init__(self, settings: PackagerSettings) -> None:
        self.settings = settings
        self.tracks: dict[str, TrackPackager] = {}
        self._wall_anchor: float | None = None  # epoch seconds of output time 0
        self._period_offset: float | None = None  # seconds added to input times in this period
        self._resume_at = 0.0  # output seconds where the current period starts
        self._periods_started = 0

    def add_track(self, track: TrackInfo) -> TrackPackager:
        """Declare a track; re-declaring one (a format change) restarts it with a discontinuity,
        and with a new init generation if its init segment changed.

        A track joining a stream that already has others (a ladder rung added when the source
        grew, or declared a moment after the others at the start) is numbered like them: players
        switching renditions match segments by media sequence number. Its first segment takes
        the number the others give that point of the grid."""
        previous = self.tracks.get(track.name)
        # Numbered like the others of its kind (players switch among those), else like any.
        others = [p for name, p in self.tracks.items() if name != track.name]
        leader = max([p for p in others if p.track.kind is track.kind] or others,
                     key=lambda p: p.next_msn, default=None)
        if previous is not None:
            # Its numbers go on without a gap: a player blocked on the next one gets it.
            packager = TrackPackager(track, self.settings, first_msn=previous.next_msn,
                                     init_generation=previous.init_generation)
            if packager.init_segment != previous.init_segment:
                packager.init_generation += 1
        else:
            msn, grid_seconds = leader.numbering() if leader else (0, None)
            packager = TrackPackager(track, self.settings, first_msn=msn)
            if grid_seconds is not None and self._period_offset is not None:
                segment = self.settings.segment_duration
                packager.number_from(round(grid_seconds / segment)
                                     * round(segment * track.timescale))
        if self._period_offset is not None:
            packager.start_period(self._offset_ticks(track), self._period_start_ticks(track),
                                  discontinuity=previous is not None)
        self.tracks[track.name] = packager
        return packager

    def push(self, track_name: str, sample: EncodedSample, now: float) -> list[PackagerEvent]:
        packager = self.tracks[track_name]
        if self._period_offset is None:
            self._begin_period(sample.dts / packager.track.timescale, now)
        return packager.push(sample, self._wall_anchor or now)

    def discontinuity(self, now: float) -> list[PackagerEvent]:
        """The source restarted: close every track; the next sample starts a new period."""
        events = self.finish(now)
        furthest = max((p.end_time / p.track.timescale for p in self.tracks.values()), default=0.0)
        segment = self.settings.segment_duration
        self._resume_at = math.ceil(furthest / segment - 1e-9) * segment if furthest else 0.0
        self._period_offset = None
        return events

    def finish(self, now: float) -> list[PackagerEvent]:
        events: list[PackagerEvent] = []
        for packager in self.tracks.values():
            events += packager.finish(self._wall_anchor or now)
        return events

    def _begin_period(self, first_input_seconds: float, now: float) -> None:
        segment = self.settings.segment_duration
        # Anchor the period on the grid point at or below the first sample, so a source whose clock
        # starts at 0 keeps its timestamps and tracks that start a little apart keep their offset.
        grid_floor = math.floor(first_input_seconds / segment) * segment
        self._period_offset = self._resume_at - grid_floor
        # Each period re-anchors the wall clock, so a pause between publishes shows in the dates.
        self._wall_anchor = now - (first_input_seconds + self._period_offset)
        for packager in self.tracks.values():
            packager.start_period(self._offset_ticks(packager.track),
                                  self._period_start_ticks(packager.track),
                                  discontinuity=self._periods_started > 0)
        self._periods_started += 1

    def _offset_ticks(self, track: TrackInfo) -> int:
        return round((self._period_offset or 0.0) * track.timescale)

    def _period_start_ticks(self, track: TrackInfo) -> int:
        return round(self._resume_at * track.timescale)
