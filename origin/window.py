"""A stream's window as viewers see it: rendition logs, rendered playlists, waiting requests.

``StreamWindow`` is the serving half shared by a stream produced here (``origin.live.LiveStream``)
and a replica of a stream produced elsewhere (fed the same events through Redis or a peer). It keeps
no media itself: bytes live in an ``ObjectStore`` under ``object_key`` names.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

from ingest.media import TrackInfo, TrackKind
from origin import h264
from origin.packager import PackagerEvent
from origin.playlist import (AudioRendition, MultivariantPlaylist, RenditionReport, VariantStream,
                             render_media_playlist, render_multivariant_playlist,
                             target_duration_for)
from origin.rendition import Readiness, RenditionLog, RenditionSettings, init_uri

AUDIO_GROUP = "aac"
ANY_RENDITION = "*"  # not a valid rendition name: waits for a change anywhere in the stream


class ObjectStore(Protocol):
    """Where the bytes live (``edge.cache.MemoryCache`` satisfies it)."""

    def set_now(self, key: str, value: bytes, ttl: float | None = None,
                pinned: bool = False) -> bool: ...

    def get_now(self, key: str) -> bytes | None: ...

    def unpin(self, key: str) -> None: ...


@dataclass(frozen=True)
class LiveSettings:
    segment_duration: float
    part_duration: float
    window_segments: int

    @cached_property  # asked on every request
    def target_duration(self) -> int:
        return target_duration_for(self.segment_duration)


@dataclass(frozen=True)
class RenditionStats:
    name: str
    kind: str
    width: int
    height: int
    frame_rate: float
    target_bitrate: int
    measured_bitrate: int  # average over the window, bits/s
    last_msn: int | None
    last_part: int | None


@dataclass(frozen=True)
class StreamStats:
    name: str
    started_at: float
    renditions: tuple[RenditionStats, ...]
    parts_produced: int
    samples_in: int
    ended: bool


def object_key(stream: str, rendition: str, name: str) -> str:
    return f"{stream}/{rendition}/{name}"


class StreamWindow:
    """What the playlists of one stream list, and requests waiting for them to change."""

    def __init__(self, name: str, settings: LiveSettings, store: ObjectStore,
                 part_target: float, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.settings = settings
        self.started_at = clock()
        self._store = store
        self._clock = clock
        self._rendition_settings = RenditionSettings(
            settings.segment_duration, part_target, settings.window_segments,
            settings.target_duration)
        self.tracks: dict[str, TrackInfo] = {}
        self._logs: dict[str, RenditionLog] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._on_change: dict[str, list[Callable[[], None]]] = {}
        self._rendered: dict[tuple[str, bool, str], str] = {}
        self._codecs: dict[str, str] = {}
        self.parts_produced = 0
        self.samples_in = 0
        self.ended = False

    # -- changes -------------------------------------------------------------------------------------
    def declare_track(self, track: TrackInfo, init_generation: int = 0) -> None:
        """A track (rendition) exists, or changed format. Its init segment is stored under
        ``init_uri(init_generation)``; one of an older format stays pinned while listed
        segments need it."""
        self.tracks[track.name] = track
        self._codecs[track.name] = _codecs_of(track)
        if track.name not in self._logs:
            self._logs[track.name] = RenditionLog(self._rendition_settings)
        change = self._logs[track.name].declare(init_generation)
        for name in change.unlisted:
            self._store.unpin(object_key(self.name, track.name, name))
        self._changed_rendition(track.name)

    def apply_event(self, event: PackagerEvent) -> None:
        """List what the packager made (its bytes are already in the store)."""
        change = self._logs[event.track].apply(event)
        for name in change.unlisted:
            self._store.unpin(object_key(self.name, event.track, name))
        self._changed_rendition(event.track)

    def end_playlists(self) -> None:
        """Every playlist ends (``EXT-X-ENDLIST``); waiting requests are answered."""
        self.ended = True
        for name, log in self._logs.items():
            log.end()
            self._changed_rendition(name)

    def _changed_rendition(self, rendition: str) -> None:
        """Wake what waits on ``rendition`` and on any rendition; ``ANY_RENDITION`` wakes all."""
        self._rendered.clear()
        keys = list(self._changed) if rendition == ANY_RENDITION else (rendition, ANY_RENDITION)
        for key in keys:
            event = self._changed.pop(key, None)
            if event is not None:
                event.set()
        callbacks = [self._on_change.pop(key) for key in list(self._on_change)] \
            if rendition == ANY_RENDITION else [self._on_change.pop(key, []) for key in keys]
        for batch in callbacks:
            for callback in batch:
                callback()

    # -- serving ---------------------------------------------------------------------------------------
    def has_rendition(self, rendition: str) -> bool:
        return rendition in self._logs

    def is_loading(self) -> bool:
        """True while the window does not know its tracks yet (a replica reading its log)."""
        return False

    async def until_loaded(self, timeout: float) -> None:
        """Return once the window knows its tracks (at once here; a replica reads its log first),
        or after ``timeout`` seconds."""

    def is_ready(self) -> bool:
        """Every track has media: the multivariant playlist can be offered."""
        return bool(self._logs) and all(log.has_media for log in self._logs.values())

    async def wait_changed(self, rendition: str, timeout: float) -> bool:
        """Wait until ``rendition`` (or any, with ``ANY_RENDITION``) changes; False on timeout."""
        event = self._changed.get(rendition)
        if event is None:
            event = self._changed[rendition] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def call_on_change(self, rendition: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, at the next change of ``rendition`` (of any rendition, with
        ``ANY_RENDITION``). For waiters that are not
        tasks (the fast lane parks thousands): the callback must be quick and must not raise."""
        self._on_change.setdefault(rendition, []).append(callback)

    def readiness(self, rendition: str, msn: int, part: int | None) -> Readiness:
        return self._logs[rendition].readiness(msn, part)

    def object_state(self, rendition: str, name: str) -> Readiness:
        return self._logs[rendition].object_state(name)

    def media_playlist(self, rendition: str, skip: bool = False, query: str = "") -> str:
        """The rendered playlist, shared by every request that asks between two changes."""
        cache_key = (rendition, skip, query)
        text = self._rendered.get(cache_key)
        if text is None:
            reports = tuple(
                RenditionReport(f"../{other}/index.m3u8", *last)
                for other, log in self._logs.items()
                if other != rendition and (last := log.last_part()) is not None)
            playlist = self._logs[rendition].playlist(skip=skip, reports=reports)
            text = self._rendered[cache_key] = render_media_playlist(playlist, query)
        return text

    def multivariant_playlist(self, query: str = "") -> str:
        """The rendered multivariant playlist, shared like ``media_playlist``'s (a stream's start
        answers every viewer waiting for it at once)."""
        cache_key = (ANY_RENDITION, False, query)
        text = self._rendered.get(cache_key)
        if text is None:
            text = self._rendered[cache_key] = self._render_multivariant(query)
        return text

    def _render_multivariant(self, query: str) -> str:
        audio = tuple(
            AudioRendition(AUDIO_GROUP, "default", f"{name}/index.m3u8", track.channels or 2)
            for name, track in self.tracks.items() if track.kind is TrackKind.AUDIO)[:1]
        audio_codecs = [self._codecs[name] for name, t in self.tracks.items()
                        if t.kind is TrackKind.AUDIO][:1]
        audio_peak, audio_average = (self._bitrates(audio[0].uri.split("/")[0]) if audio
                                     else (0, 0))
        variants = []
        for name, track in self.tracks.items():
            if track.kind is not TrackKind.VIDEO:
                continue
            peak, average = self._bitrates(name)
            variants.append(VariantStream(
                uri=f"{name}/index.m3u8", bandwidth=peak + audio_peak,
                average_bandwidth=(average + audio_average) if average else None,
                codecs=",".join([self._codecs[name], *audio_codecs]),
                width=track.width, height=track.height, frame_rate=track.frame_rate,
                audio_group=AUDIO_GROUP if audio else None, name=name))
        variants.sort(key=lambda variant: variant.bandwidth, reverse=True)
        return render_multivariant_playlist(MultivariantPlaylist(tuple(variants), audio), query)

    def _bitrates(self, rendition: str) -> tuple[int, int]:
        """(peak, average) bits/s measured over the window; before a full segment, the target with
        headroom for the peak."""
        sizes = self._logs[rendition].segment_sizes()
        if not sizes:
            target = self.tracks[rendition].bitrate
            return int(target * 1.25), 0
        peak = max(size * 8 / duration for duration, size in sizes)
        average = sum(size for _, size in sizes) * 8 / sum(duration for duration, _ in sizes)
        return int(peak), int(average)

    def init_segment(self, rendition: str) -> bytes | None:
        """The init segment of the rendition's declared format (its next segment's)."""
        log = self._logs.get(rendition)
        return self.object(rendition, init_uri(log.init_generation if log else 0))

    def object(self, rendition: str, name: str) -> bytes | None:
        """The bytes of an init segment, part or segment of this stream, if still stored."""
        return self._store.get_now(object_key(self.name, rendition, name))

    async def fetch_object(self, rendition: str, name: str) -> bytes | None:
        """Like ``object``; a replica overrides it to read through its lower cache tiers."""
        return self.object(rendition, name)

    def stats(self) -> StreamStats:
        renditions = []
        for name, track in self.tracks.items():
            last = self._logs[name].last_part()
            renditions.append(RenditionStats(
                name=name, kind=track.kind.value, width=track.width, height=track.height,
                frame_rate=track.frame_rate, target_bitrate=track.bitrate,
                measured_bitrate=self._bitrates(name)[1],
                last_msn=last[0] if last else None, last_part=last[1] if last else None))
        return StreamStats(self.name, self.started_at, tuple(renditions), self.parts_produced,
                           self.samples_in, self.ended)


def _codecs_of(track: TrackInfo) -> str:
    if track.codec == "h264":
        sps, _ = h264.parameter_sets(track.codec_config)
        return h264.codecs_string(h264.parse_sps(sps))
    return h264.AAC_LC_CODECS
