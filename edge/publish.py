"""Publish sessions, shared by every push ingest (WHIP, WebSocket).

A publication owns one ladder transcoder writing into the stream's live window. When the publisher
goes, the window closes its open segments and waits ``publish_grace_seconds``: a publisher that comes
back in time continues the same playlists after an ``EXT-X-DISCONTINUITY``; otherwise the playlists
end with ``EXT-X-ENDLIST`` and the stream is dropped a window later.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from edge.errors import Conflict, TooManyRequests, Unavailable
from edge.limits import client_key
from edge.node import Node
from edge.tokens import Claims
from edge.webhooks import Webhooks
from ingest.media import EncodedSample, TrackInfo
from ingest.transcoder import LadderTranscoder
from origin.live import LiveStream

log = logging.getLogger("livedge.publish")

# Why a publication ended, as its eviction callbacks and the on_unpublish webhook are told.
PUBLISHER_LEFT = "publisher left"
TAKEN_OVER = "taken over by a new publisher"
SHUTTING_DOWN = "the node is shutting down"


class _PublicationSink:
    """The transcoder's sink for one publication: the end of a publisher is a pause of the stream
    (a discontinuity), not the end of its playlists."""

    def __init__(self, stream: LiveStream) -> None:
        self._stream = stream

    def add_track(self, track: TrackInfo) -> None:
        self._stream.add_track(track)

    def add_sample(self, track_name: str, sample: EncodedSample) -> None:
        self._stream.add_sample(track_name, sample)

    def discontinuity(self) -> None:
        self._stream.discontinuity()

    def end(self) -> None:
        self._stream.discontinuity()


@dataclass(eq=False)
class Publication:
    stream_name: str
    session_id: str
    kind: str
    address: str
    subject: str
    transcoder: LadderTranscoder
    ended: bool = False
    _evicted_callbacks: list[Callable[[str], None]] = field(default_factory=list)

    def on_evicted(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` runs on the loop when a takeover or shutdown ends this publication."""
        self._evicted_callbacks.append(callback)

    def _evict(self, reason: str) -> None:
        for callback in self._evicted_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("eviction callback failed", extra={"stream": self.stream_name})


class Publishing:
    def __init__(self, node: Node, webhooks: Webhooks) -> None:
        self._node = node
        self._settings = node.settings
        self._webhooks = webhooks
        self._active: dict[str, Publication] = {}
        self._grace: dict[str, asyncio.Task] = {}
        # One lock per stream with a begin or an end under way. Ending awaits the transcoder close
        # between dropping the publication and starting the grace period; a publisher returning
        # in that window found the stream neither published nor in grace (a wrong 409, issue #8).
        # Holding the lock across both steps makes it wait for the close and then continue.
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()
        self._per_address: Counter[str] = Counter()
        self._per_subject: Counter[str] = Counter()
        # The fleet: which other edge ingests a stream (None: none, or no fleet).
        self.elsewhere: Callable[[str], str | None] = lambda stream: None

    def active(self, stream: str) -> Publication | None:
        return self._active.get(stream)

    def active_count(self) -> int:
        return len(self._active)

    async def begin(self, stream: str, claims: Claims, address: str, kind: str) -> Publication:
        """Start publishing ``stream`` (the token was verified by the caller)."""
        subject = claims.subject or "-"
        if self._node.draining:
            raise Unavailable("this node is draining; publish to another")
        key = client_key(address)  # an IPv6 /64 is one address, as for every other limit
        if self._per_address[key] >= self._settings.max_sessions_per_address:
            raise TooManyRequests("too many publish sessions from this address")
        if self._per_subject[subject] >= self._settings.max_sessions_per_subject:
            raise TooManyRequests("too many publish sessions for this token subject")
        self._per_address[key] += 1
        self._per_subject[subject] += 1
        try:
            async with self._exclusive(stream):
                return await self._begin(stream, claims, address, subject, kind)
        except BaseException:
            self._release(address, subject)
            raise

    async def _begin(self, stream: str, claims: Claims, address: str, subject: str,
                     kind: str) -> Publication:
        current = self._active.get(stream)
        takeover = claims.raw.get("takeover") is True
        if current is not None and not takeover:
            raise Conflict(f"stream {stream} is already being published")
        if current is None and not takeover and self.elsewhere(stream):
            raise Conflict(f"stream {stream} is already being published on another edge")
        if current is None and self._node.live_stream(stream) is not None \
                and stream not in self._grace and not self._ended(stream):
            raise Conflict(f"stream {stream} is already live here (pulled)")
        await self._webhooks.on_publish(stream, subject, address, kind)
        if current is not None:  # a takeover: the old publisher goes, the playlists carry on
            current._evict(TAKEN_OVER)
            await self._finish(current, TAKEN_OVER)
        grace = self._grace.pop(stream, None)
        if grace is not None:
            grace.cancel()
        if self._ended(stream):
            await self._node.remove_stream(stream)
        live = self._node.live_stream(stream) or self._node.create_stream(stream)
        transcoder = self._node.new_transcoder(stream, sink=_PublicationSink(live))
        publication = Publication(stream, secrets.token_urlsafe(12), kind, address, subject,
                                  transcoder)
        self._active[stream] = publication
        log.info("publish started", extra={"stream": stream, "session": publication.session_id})
        return publication

    async def end(self, publication: Publication) -> None:
        """The publisher is gone: flush its transcoder and start the grace period. Idempotent.

        A publisher of the same stream that comes meanwhile waits until this returns, then
        continues the stream as after any grace period. Cancelling the caller (its connection
        handler, say) does not cancel the end: a stream without its grace period would never end."""
        if publication.ended:
            return
        await asyncio.shield(self._end(publication))

    async def _end(self, publication: Publication) -> None:
        stream = publication.stream_name
        async with self._exclusive(stream):
            if publication.ended:  # taken over (or shut down) while we waited for the lock
                return
            await self._finish(publication, PUBLISHER_LEFT)
            if self._active.get(stream) is None and stream not in self._grace:
                self._grace[stream] = asyncio.create_task(self._expire(stream),
                                                          name=f"grace:{stream}")

    async def _finish(self, publication: Publication, reason: str) -> None:
        """Every way a publication ends (its publisher left, a takeover, shutdown) comes here: its
        slots are freed, its transcoder flushed, and on_unpublish told why."""
        publication.ended = True
        if self._active.get(publication.stream_name) is publication:
            del self._active[publication.stream_name]
        self._release(publication.address, publication.subject)
        try:
            await asyncio.to_thread(publication.transcoder.close)
        finally:
            log.info("publish ended", extra={"stream": publication.stream_name,
                                              "session": publication.session_id})
            self._webhooks.on_unpublish(publication.stream_name, publication.subject,
                                        publication.address, publication.kind, reason)

    async def _expire(self, stream: str) -> None:
        await asyncio.sleep(self._settings.publish_grace_seconds)
        live = self._node.live_stream(stream)
        if live is not None:
            live.end()
        # Keep the ended playlists a window long so players read EXT-X-ENDLIST, then drop them.
        await asyncio.sleep(self._settings.segment_duration * self._settings.window_segments)
        self._grace.pop(stream, None)
        await self._node.remove_stream(stream)

    @asynccontextmanager
    async def _exclusive(self, stream: str) -> AsyncIterator[None]:
        """Serialize the begins and ends of one stream (each has awaits: webhook, transcoder close)."""
        lock = self._locks.setdefault(stream, asyncio.Lock())
        self._lock_users[stream] += 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[stream] -= 1
            if self._lock_users[stream] <= 0:
                del self._lock_users[stream]
                del self._locks[stream]

    def _ended(self, stream: str) -> bool:
        live = self._node.live_stream(stream)
        return live is not None and live.ended

    def _release(self, address: str, subject: str) -> None:
        key = client_key(address)
        self._per_address[key] -= 1
        self._per_subject[subject] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]
        if self._per_subject[subject] <= 0:
            del self._per_subject[subject]

    async def close(self) -> None:
        """Node shutdown: end every publication now (no grace)."""
        for publication in list(self._active.values()):
            publication._evict(SHUTTING_DOWN)
            await self._finish(publication, SHUTTING_DOWN)
        for task in self._grace.values():
            task.cancel()
        await asyncio.gather(*self._grace.values(), return_exceptions=True)
        self._grace.clear()
