"""Source timestamps to one continuous output clock shared by every track: pure, no I/O.

Sources hand us timestamps that start anywhere, jump (a camera reconnecting, an encoder restart), go
backwards (a file looping, an MPEG-TS 33-bit wrap) or leave holes. The packager wants one clock that
starts at 0, only moves forward, and keeps audio and video in sync. So:

- ``output = source + offset``, with ONE offset for all tracks: whatever keeps video in place keeps the
  audio recorded with it in place too.
- The first timestamp seen (of any track) becomes 0.
- A jump is judged on the output clock, per track: forward by more than ``max_gap`` seconds, or backward
  by more than one frame interval. The offset then changes so the track continues one nominal frame
  interval after its last output. Since the offset is shared, the other tracks, which usually jump by
  the same amount in the source, land next to their own last output without triggering anything.
- Smaller irregularities pass through (a short real hole stays a hole), except that output never
  goes backwards on a track: a timestamp at or before the track's last output is pushed just after it.
- ``restart(at)`` starts a new period (a reconnect): the next timestamp of any track maps to ``at``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_GAP = 1.0  # seconds
MIN_STEP = 1e-6  # seconds; how far a timestamp that did not advance is pushed past the previous one


@dataclass(frozen=True)
class TimelineJump:
    """A jump the timeline absorbed: on ``track``, source time ``source_time`` would have landed
    ``gap`` seconds after that track's previous output (negative = backwards)."""

    track: str
    source_time: float
    gap: float


class Timeline:
    """Maps per-track source times (seconds) to the shared output clock (seconds)."""

    def __init__(self, max_gap: float = DEFAULT_MAX_GAP) -> None:
        if max_gap <= 0:
            raise ValueError("max_gap must be positive")
        self.max_gap = max_gap
        self.jump_count = 0
        self.last_jump: TimelineJump | None = None
        self._offset: float | None = None  # None until the first timestamp of a period
        self._period_start = 0.0
        self._last_output: dict[str, float] = {}

    def map(self, track: str, source_time: float, frame_interval: float) -> float:
        """The output time, in seconds, of a sample of ``track`` at ``source_time`` seconds.
        ``frame_interval`` is the track's nominal sample duration in seconds (1/fps for video,
        1024/48000 for AAC); it is the size a jump shrinks to."""
        if self._offset is None:
            self._offset = self._period_start - source_time
        output = source_time + self._offset
        last = self._last_output.get(track)
        if last is None:
            output = max(output, self._period_start)
        else:
            gap = output - last
            if gap > self.max_gap or gap < -frame_interval:
                self.jump_count += 1
                self.last_jump = TimelineJump(track, source_time, gap)
                self._offset = last + frame_interval - source_time
                output = last + frame_interval
            elif output <= last:
                output = last + MIN_STEP
        self._last_output[track] = output
        return output

    def restart(self, at: float) -> None:
        """Begin a new period: the next timestamp seen (of any track) maps to ``at`` seconds, which must
        not be before the furthest output so far (the clock never goes back)."""
        if at < self.furthest():
            raise ValueError(f"restart at {at} s is before the furthest output {self.furthest()} s")
        self._offset = None
        self._period_start = at
        self._last_output.clear()

    def furthest(self) -> float:
        """The latest output time of any track, in seconds (0.0 before the first sample)."""
        return max(self._last_output.values(), default=self._period_start)

    def last_output(self, track: str) -> float | None:
        """The track's latest output time in seconds, or None if it has none in this period."""
        return self._last_output.get(track)
