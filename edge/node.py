"""The node's streams: each live stream with the producer that feeds it (a pull, the demo).

One object per stream, as MediaMTX's path manager: ``Node`` creates the ``LiveStream`` window, the
ladder transcoder writing into it and the source feeding the transcoder, and tears them down together.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from edge.cache import MemoryCache
from edge.config import Settings
from edge.errors import Conflict, Unavailable
from edge.viewers import ViewerTracker
from ingest.demo import DemoSource
from ingest.ladder import RungSpec
from ingest.media import MediaSink
from ingest.pull import PullSource
from ingest.transcoder import LadderTranscoder
from origin.live import LiveSettings, LiveStream, StreamStats, WindowEvent

if TYPE_CHECKING:
    from edge.publish import Publishing

log = logging.getLogger("livedge.node")

DEMO_STREAM = "demo"


@dataclass
class _Entry:
    stream: LiveStream
    source: PullSource | None = None
    task: asyncio.Task | None = None
    transcoders: list[LadderTranscoder] = field(default_factory=list)


class Node:
    """Streams produced on this node, and the snapshots operators and metrics read."""

    def __init__(self, settings: Settings, cache: MemoryCache) -> None:
        self.settings = settings
        self.cache = cache
        self.viewer_tracker = ViewerTracker(window_seconds=3 * settings.segment_duration + 5)
        self._entries: dict[str, _Entry] = {}
        self.publishing: Publishing | None = None  # set by the app: push ingest sessions
        self.draining = False  # SIGTERM: refuse publishes, report not ready
        # Extra /readyz details by name (the Redis tier's snapshot); they never make the node unready.
        self.readiness_details: dict[str, Callable[[], object]] = {}
        # Told every window event of every stream produced here (the Redis tier, peers).
        self.stream_listeners: list[Callable[[str, WindowEvent], None]] = []
        self._live_settings = LiveSettings(settings.segment_duration, settings.part_duration,
                                           settings.window_segments)

    # -- lookups -------------------------------------------------------------------------------------
    def live_stream(self, name: str) -> LiveStream | None:
        entry = self._entries.get(name)
        return entry.stream if entry else None

    def stream_stats(self) -> list[StreamStats]:
        return [entry.stream.stats() for entry in self._entries.values()]

    def transcode_stats(self) -> dict[str, object]:
        return {name: entry.transcoders[-1].stats()
                for name, entry in self._entries.items() if entry.transcoders}

    def source_states(self) -> dict[str, dict[str, object]]:
        return {name: {"state": entry.source.state.name.lower(),
                       "last_error": entry.source.last_error}
                for name, entry in self._entries.items() if entry.source is not None}

    def viewers(self, stream: str) -> int:
        return self.viewer_tracker.count(stream)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        extra = {name: detail() for name, detail in self.readiness_details.items()}
        return not self.draining, {"streams": len(self._entries), "draining": self.draining, **extra}

    # -- producing -----------------------------------------------------------------------------------
    def create_stream(self, name: str) -> LiveStream:
        """A new live window for ``name``; 409 if the name is live here already."""
        if name in self._entries:
            raise Conflict(f"stream {name} is already live")
        if len(self._entries) >= self.settings.max_publishers:
            raise Unavailable("this node is at its stream limit")
        stream = LiveStream(name, self._live_settings, self.cache)
        stream.listeners.extend(self.stream_listeners)
        self._entries[name] = _Entry(stream)
        return stream

    def new_transcoder(self, name: str, sink: MediaSink | None = None) -> LadderTranscoder:
        """A ladder transcoder writing into stream ``name`` (or into ``sink``, which wraps it)."""
        entry = self._entries[name]
        transcoder = LadderTranscoder(
            sink or entry.stream, asyncio.get_running_loop(), self.rungs(),
            segment_duration=self.settings.segment_duration,
            audio_bitrate=self.settings.audio_bitrate, preset=self.settings.x264_preset,
            tune=self.settings.x264_tune, passthrough=self.settings.passthrough_source)
        entry.transcoders[:] = [transcoder]
        return transcoder

    def rungs(self) -> list[RungSpec]:
        return [RungSpec(r.name, r.width, r.height, r.video_bitrate, r.max_frame_rate)
                for r in self.settings.ladder]

    async def add_pull(self, name: str, url: str) -> None:
        self.create_stream(name)
        self._start_source(name, PullSource(url, self.new_transcoder(name)))

    async def add_demo(self) -> None:
        self.create_stream(DEMO_STREAM)
        self._start_source(DEMO_STREAM, DemoSource(self.new_transcoder(DEMO_STREAM)))

    def _start_source(self, name: str, source: PullSource) -> None:
        entry = self._entries[name]
        entry.source = source
        entry.task = asyncio.create_task(source.run(), name=f"source:{name}")
        log.info("pulling stream", extra={"stream": name})

    async def remove_stream(self, name: str) -> bool:
        entry = self._entries.pop(name, None)
        if entry is None:
            return False
        if entry.source is not None:
            entry.source.stop()
        if entry.task is not None:
            entry.task.cancel()
            await asyncio.gather(entry.task, return_exceptions=True)
        entry.stream.end()
        self.viewer_tracker.forget(name)
        log.info("stream removed", extra={"stream": name})
        return True

    async def close(self) -> None:
        for name in list(self._entries):
            await self.remove_stream(name)
