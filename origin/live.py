"""A stream produced on this node: the packager feeding a ``StreamWindow``.

``LiveStream`` is the ``MediaSink`` a transcoder writes to. It stores each init segment, part and
segment in the ``ObjectStore`` (the edge's first cache tier) as soon as it exists, pinned while the
playlists list it, then tells the window and any listeners (the Redis tier, peers).

After a restart a stream can continue the log it left in a shared tier: ``hold`` its first
samples, then ``resume`` from the replayed events (numbering continues after a discontinuity) or
``release`` them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Callable

from ingest.media import EncodedSample, TrackInfo
from origin.packager import (PackagerEvent, PackagerSettings, PartReady, SegmentOpened,
                             SegmentReady, StreamPackager)
from origin.rendition import init_uri, part_uri, segment_uri
from origin.window import (ANY_RENDITION, LiveSettings, ObjectStore, StreamStats, StreamWindow,
                           object_key)

__all__ = ["ANY_RENDITION", "LiveSettings", "LiveStream", "ObjectStore", "StreamEnded",
           "StreamStats", "TrackDeclared", "WindowEvent", "object_key"]


@dataclass(frozen=True)
class TrackDeclared:
    track: TrackInfo
    init_segment: bytes  # stored under ``init_uri(init_generation)``
    init_generation: int = 0  # see ``TrackPackager.init_generation``


@dataclass(frozen=True)
class StreamEnded:
    pass


# What listeners hear, in order. Part and segment events carry their bytes.
WindowEvent = TrackDeclared | PackagerEvent | StreamEnded

# Samples held at most while a resume is being decided (``LiveStream.hold``): a few seconds of a
# ladder; past it the stream starts without waiting.
HOLD_LIMIT = 500


class LiveStream(StreamWindow):
    """One stream being produced on this node."""

    def __init__(self, name: str, settings: LiveSettings, store: ObjectStore,
                 clock: Callable[[], float] = time.time) -> None:
        packager_settings = PackagerSettings(settings.segment_duration, settings.part_duration)
        super().__init__(name, settings, store, packager_settings.part_target, clock)
        self._packager = StreamPackager(packager_settings)
        self.listeners: list[Callable[[str, WindowEvent], None]] = []
        # Restart resume (see ``resume``): packager MSNs are shifted past the replayed window.
        self._segment_opened = False
        self._msn_offset = 0
        self._resumed = False
        self._continued_tracks: set[str] = set()  # tracks whose first resumed segment was cut
        self._closed: dict[tuple[str, int], int] = {}  # (track, msn) -> parts: see ``resume``
        self._fetch_missing: Callable[[str, str], Awaitable[bytes | None]] | None = None
        self._held: list[tuple[str, EncodedSample]] | None = None  # see ``hold``

    # -- MediaSink --------------------------------------------------------------------------------------
    def add_track(self, track: TrackInfo) -> None:
        self._packager.add_track(track)
        self._declare(track.name)

    def _declare(self, track_name: str) -> None:
        """Store the init segment of the track's packager under its generation's URI (pinned:
        the window unpins an older one when no listed segment needs it), list, tell."""
        packager = self._packager.tracks[track_name]
        generation = packager.init_generation
        self._store.set_now(object_key(self.name, track_name, init_uri(generation)),
                            packager.init_segment, pinned=True)
        self.declare_track(packager.track, generation)
        self._tell(TrackDeclared(packager.track, packager.init_segment, generation))

    def add_sample(self, track_name: str, sample: EncodedSample) -> None:
        if track_name not in self.tracks:
            return
        if self._held is not None:
            self._held.append((track_name, sample))
            if len(self._held) >= HOLD_LIMIT:
                self.release()
            return
        self.samples_in += 1
        self._apply(self._packager.push(track_name, sample, self._clock()))

    def discontinuity(self) -> None:
        self.release()
        self._apply(self._packager.discontinuity(self._clock()))

    def end(self) -> None:
        """No more media: close the open segments and end every playlist (``EXT-X-ENDLIST``)."""
        if self.ended:
            return
        self.release()
        self._apply(self._packager.finish(self._clock()))
        self.end_playlists()
        self._tell(StreamEnded())

    # -- restart resume ----------------------------------------------------------------------------
    def hold(self) -> None:
        """Hold samples until ``resume`` or ``release`` (at most ``HOLD_LIMIT``): whether this
        stream continues a log is being asked (the Redis tier does, at the stream's first track
        declaration). Does nothing once a segment was cut."""
        if not self._segment_opened and not self.ended and self._held is None:
            self._held = []

    def release(self) -> None:
        """Package the held samples now, and stop holding."""
        held, self._held = self._held, None
        for track_name, sample in held or ():
            self.add_sample(track_name, sample)

    def resume(self, history: Iterable[WindowEvent],
               fetch_missing: Callable[[str, str], Awaitable[bytes | None]] | None = None) -> bool:
        """Continue a stream produced before this ``LiveStream`` existed (a node restart, a
        publisher coming back after the node lost its memory, a publisher moving to this node after
        its node crashed).

        ``history`` is the stream's events as a replica hears them (no media bytes needed): its
        complete segments are listed again, and the packager's segments are numbered from the
        highest media sequence number in ``history`` plus one, the first of each track carrying
        ``EXT-X-DISCONTINUITY``. Objects the history lists are not in this node's store; the
        window reads them with ``fetch_missing(rendition, name)`` (the lower cache tiers).
        Listeners are not told the replayed events (they came from the shared log).

        A log that ends inside a segment (its producer crashed) is continued too: that segment is
        closed where it stopped, as a shorter segment of the parts it has (players may have loaded
        some of them, so its number is not given to other media; its bytes are its parts', read
        with ``fetch_missing``, see ``closed_segments``). A segment opened with no part yet is
        left out: its number goes to the first new segment.

        Only possible before this stream cut its first segment and while it is not ended; returns
        whether it resumed: False too when ``history`` has no segment to list. Held samples are
        released either way.
        """
        if self._segment_opened or self.ended or self._resumed:
            self.release()
            return False
        events = list(history)
        replayed = list(replayable_window(events, close_unfinished=True))
        finished = {(event.track, event.msn) for event in events if isinstance(event, SegmentReady)}
        numbers = [event.msn for event in replayed if isinstance(event, SegmentReady)]
        if not numbers:
            self.release()
            return False
        for event in replayed:
            if isinstance(event, TrackDeclared):
                if event.track.name not in self.tracks:  # what this stream declared wins
                    self.declare_track(event.track, event.init_generation)
            else:
                if isinstance(event, SegmentReady) and (event.track, event.msn) not in finished:
                    self._closed[(event.track, event.msn)] = event.part_count
                self.apply_event(event)
        self._continue_generations(events)
        self._msn_offset = max(numbers) + 1
        self._resumed = True
        self._fetch_missing = fetch_missing
        self.release()
        return True

    def _continue_generations(self, history: list[WindowEvent]) -> None:
        """Number this stream's init segments after the resumed log's, so that no URI the log
        lists is given other bytes: a track declared as the log last declared it takes that
        generation, one in another format the next unused."""
        for name, packager in self._packager.tracks.items():
            declared = [event for event in history
                        if isinstance(event, TrackDeclared) and event.track.name == name]
            used = {event.init_generation for event in declared} | {
                event.init_generation for event in history
                if isinstance(event, SegmentOpened) and event.track == name}
            same = [event.init_generation for event in declared if event.track == packager.track]
            if same:
                generation = same[-1]
            elif used:
                generation = max(used) + 1
            else:
                continue
            if generation != packager.init_generation:
                packager.init_generation = generation
                self._declare(name)

    def closed_segments(self) -> list[tuple[str, str]]:
        """(rendition, name) of the segments ``resume`` closed from a crashed producer's parts.
        Their bytes exist nowhere but as parts, which the shared tier keeps only briefly: read
        them early (``fetch_object``) to keep them in this node's store."""
        return [(track, segment_uri(msn)) for track, msn in self._closed]

    async def fetch_object(self, rendition: str, name: str) -> bytes | None:
        data = self.object(rendition, name)
        if data is None and self._fetch_missing is not None:
            data = await self._fetch_missing(rendition, name)
            if data is None:
                data = await self._join_closed(rendition, name)
        return data

    async def _join_closed(self, rendition: str, name: str) -> bytes | None:
        """A segment ``resume`` closed: its parts' bytes, concatenated (what ``SegmentReady``
        carries), kept in the store once read; None if a part is gone."""
        assert self._fetch_missing is not None
        msn = next((msn for (track, msn) in self._closed
                    if track == rendition and segment_uri(msn) == name), None)
        if msn is None:
            return None
        parts = [await self._fetch_missing(rendition, part_uri(msn, index))
                 for index in range(self._closed[(rendition, msn)])]
        if any(part is None for part in parts):
            return None
        data = b"".join(parts)  # type: ignore[arg-type]
        self._store.set_now(object_key(self.name, rendition, name), data)
        return data

    def _continued(self, event: PackagerEvent) -> PackagerEvent:
        """``event`` numbered after a resumed window; a track's first segment is a discontinuity."""
        if isinstance(event, SegmentOpened):
            self._segment_opened = True
        if not self._resumed:
            return event
        event = replace(event, msn=event.msn + self._msn_offset)
        if isinstance(event, SegmentOpened) and event.track not in self._continued_tracks:
            self._continued_tracks.add(event.track)
            event = replace(event, discontinuity=True)
        return event

    def _apply(self, events: list[PackagerEvent]) -> None:
        for event in events:
            event = self._continued(event)
            if isinstance(event, PartReady):
                self._store.set_now(object_key(self.name, event.track,
                                               part_uri(event.msn, event.index)),
                                    event.data, pinned=True)
                self.parts_produced += 1
            elif isinstance(event, SegmentReady):
                self._store.set_now(object_key(self.name, event.track, segment_uri(event.msn)),
                                    event.data, pinned=True)
            self.apply_event(event)
            self._tell(event)

    def _tell(self, event: WindowEvent) -> None:
        for listener in self.listeners:
            listener(self.name, event)


def replayable_window(history: Iterable[WindowEvent], *,
                      close_unfinished: bool = False) -> Iterator[WindowEvent]:
    """The events of ``history`` a resumed window can list: every track declaration, then, per
    track in their order, the events of segments seen whole (opened, parts, ready). A log trimmed
    from the front starts inside a segment: left out, as is a segment with a gap in its parts.
    ``StreamEnded`` is left out too.

    A producer that stopped abruptly leaves a segment open at the end of a track: left out, or
    with ``close_unfinished`` closed after the parts it has (a ``SegmentReady`` with their
    duration, ``size`` 0 and no data); one with no part yet is left out either way."""
    declared: list[WindowEvent] = []
    complete: list[WindowEvent] = []
    open_segments: dict[str, list[WindowEvent]] = {}  # track -> events of its open segment
    for event in history:
        if isinstance(event, TrackDeclared):
            declared.append(event)
        elif isinstance(event, SegmentOpened):
            open_segments[event.track] = [event]
        elif isinstance(event, PartReady):
            segment = open_segments.get(event.track)
            if segment is not None and (segment[0].msn, len(segment) - 1) != \
                    (event.msn, event.index):
                del open_segments[event.track]  # a gap in the log: this segment is not whole
            elif segment is not None:
                segment.append(event)
        elif isinstance(event, SegmentReady):
            segment = open_segments.pop(event.track, None)
            if segment is not None and (segment[0].msn, len(segment) - 1) == \
                    (event.msn, event.part_count):
                complete += segment
                complete.append(event)
    yield from declared
    yield from complete
    if close_unfinished:
        for track, segment in open_segments.items():
            parts = [event for event in segment if isinstance(event, PartReady)]
            if parts:
                yield from segment
                yield SegmentReady(track, segment[0].msn, sum(part.duration for part in parts),
                                   len(parts), 0, b"")
