"""A stream produced on this node: the packager feeding a ``StreamWindow``.

``LiveStream`` is the ``MediaSink`` a transcoder writes to. It stores each init segment, part and
segment in the ``ObjectStore`` (the edge's first cache tier) as soon as it exists, pinned while the
playlists list it, then tells the window and any listeners (the Redis tier, peers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ingest.media import EncodedSample, TrackInfo
from origin.packager import (PackagerEvent, PackagerSettings, PartReady, SegmentReady,
                             StreamPackager)
from origin.rendition import init_uri, part_uri, segment_uri
from origin.window import (ANY_RENDITION, LiveSettings, ObjectStore, StreamStats, StreamWindow,
                           object_key)

__all__ = ["ANY_RENDITION", "LiveSettings", "LiveStream", "ObjectStore", "StreamEnded",
           "StreamStats", "TrackDeclared", "WindowEvent", "object_key"]


@dataclass(frozen=True)
class TrackDeclared:
    track: TrackInfo
    init_segment: bytes


@dataclass(frozen=True)
class StreamEnded:
    pass


# What listeners hear, in order. Part and segment events carry their bytes.
WindowEvent = TrackDeclared | PackagerEvent | StreamEnded


class LiveStream(StreamWindow):
    """One stream being produced on this node."""

    def __init__(self, name: str, settings: LiveSettings, store: ObjectStore,
                 clock: Callable[[], float] = time.time) -> None:
        packager_settings = PackagerSettings(settings.segment_duration, settings.part_duration)
        super().__init__(name, settings, store, packager_settings.part_target, clock)
        self._packager = StreamPackager(packager_settings)
        self.listeners: list[Callable[[str, WindowEvent], None]] = []

    # -- MediaSink --------------------------------------------------------------------------------------
    def add_track(self, track: TrackInfo) -> None:
        packager = self._packager.add_track(track)
        self._store.set_now(object_key(self.name, track.name, init_uri()), packager.init_segment,
                            pinned=True)
        self.declare_track(track)
        self._tell(TrackDeclared(track, packager.init_segment))

    def add_sample(self, track_name: str, sample: EncodedSample) -> None:
        if track_name not in self.tracks:
            return
        self.samples_in += 1
        self._apply(self._packager.push(track_name, sample, self._clock()))

    def discontinuity(self) -> None:
        self._apply(self._packager.discontinuity(self._clock()))

    def end(self) -> None:
        """No more media: close the open segments and end every playlist (``EXT-X-ENDLIST``)."""
        if self.ended:
            return
        self._apply(self._packager.finish(self._clock()))
        self.end_playlists()
        self._tell(StreamEnded())

    def _apply(self, events: list[PackagerEvent]) -> None:
        for event in events:
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
