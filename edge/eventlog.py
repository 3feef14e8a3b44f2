"""The window events of the streams produced here, kept in memory for peers to follow.

It is to peer fill what the Redis stream log is to the Redis tier: a bounded log per stream (a window
and a little more), the latest track declarations, and a wait for what comes next (the peer API's
long polls and followers). Events are kept without their media bytes; peers read objects
separately.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from origin.live import LiveStream, StreamEnded, TrackDeclared, WindowEvent
from origin.packager import PartReady, SegmentReady
from origin.window import LiveSettings

ENDED_RETENTION_SECONDS = 60.0  # an ended stream's log stays this long for late followers


@dataclass
class _Log:
    settings: LiveSettings
    part_target: float
    started_at: float
    capacity: int
    # track -> (the id of the first entry after it, the declaration)
    declarations: dict[str, tuple[int, TrackDeclared]] = field(default_factory=dict)
    entries: deque[tuple[int, WindowEvent]] = field(default_factory=deque)
    next_id: int = 1
    # Readers waiting for the next entry: futures, resolved as the entry is logged, so a
    # follower's answer is on its way before the fast lane's wake (edge/fastlane.py) runs.
    waiters: list[asyncio.Future] = field(default_factory=list)
    ended_at: float | None = None


@dataclass(frozen=True)
class LocalHistory:
    settings: LiveSettings
    part_target: float
    started_at: float
    events: tuple[WindowEvent, ...]  # declarations first, then the log in order
    last_id: int


def _without_media(event: WindowEvent) -> WindowEvent:
    if isinstance(event, (PartReady, SegmentReady)):
        return replace(event, data=b"")
    if isinstance(event, TrackDeclared):
        return replace(event, init_segment=b"")
    return event


def _settle(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class LocalEventLog:
    """A node stream listener (``node.stream_listeners``) and the source of the peer API."""

    def __init__(self, lookup: Callable[[str], LiveStream | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._clock = clock
        self._logs: dict[str, _Log] = {}

    def on_window_event(self, name: str, event: WindowEvent) -> None:
        log = self._logs.get(name)
        if log is None or (log.ended_at is not None and not isinstance(event, StreamEnded)):
            stream = self._lookup(name)
            if stream is None:
                return
            part_target = stream._rendition_settings.part_duration
            # Enough for the window of every rung plus audio, with room for parts.
            parts = int(stream.settings.segment_duration / stream.settings.part_duration) + 3
            capacity = 8 * (stream.settings.window_segments + 3) * (parts + 2)
            log = self._logs[name] = _Log(stream.settings, part_target, time.time(), capacity)
        event = _without_media(event)
        if isinstance(event, TrackDeclared):
            log.declarations[event.track.name] = (log.next_id, event)
        else:
            log.entries.append((log.next_id, event))
            log.next_id += 1
            while len(log.entries) > log.capacity:
                log.entries.popleft()
        if isinstance(event, StreamEnded):
            log.ended_at = self._clock()
        for waiter in log.waiters:
            _settle(waiter)
        log.waiters.clear()
        self._expire()

    def wake_all(self) -> None:
        """Answer every waiting reader now (with what it has): the node is shutting down."""
        for log in self._logs.values():
            for waiter in log.waiters:
                _settle(waiter)
            log.waiters.clear()

    def history(self, name: str) -> LocalHistory | None:
        log = self._logs.get(name)
        if log is None:
            return None
        events = (*(event for _, event in log.declarations.values()),
                  *(event for _, event in log.entries))
        last_id = log.entries[-1][0] if log.entries else 0
        return LocalHistory(log.settings, log.part_target, log.started_at, events, last_id)

    async def events_after(self, name: str, after: int, block: float) -> tuple[int, list] | None:
        """Events with ids above ``after`` (waiting up to ``block`` seconds for one) and the id to
        ask from next; None if the stream is unknown here. Track declarations that happened since
        are included before the events that follow them."""
        log = self._logs.get(name)
        if log is None:
            return None
        if not log.entries or log.entries[-1][0] <= after:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            log.waiters.append(waiter)
            timer = loop.call_later(block, _settle, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                if waiter in log.waiters:
                    log.waiters.remove(waiter)
            log = self._logs.get(name) or log
        # Declarations made since ``after`` come first (a format change precedes its media).
        events: list[WindowEvent] = [event for first_id, event in log.declarations.values()
                                     if first_id > after]
        last = after
        for entry_id, event in log.entries:
            if entry_id > after:
                events.append(event)
                last = entry_id
        return last, events

    def streams(self) -> list[str]:
        return [name for name, log in self._logs.items() if log.ended_at is None]

    def _expire(self) -> None:
        horizon = self._clock() - ENDED_RETENTION_SECONDS
        for name in [n for n, log in self._logs.items()
                     if log.ended_at is not None and log.ended_at < horizon]:
            del self._logs[name]
