"""Streams produced on another node, served here from the Redis tier.

A ``ReplicaStream`` is the serving half of a stream (``origin.window.StreamWindow``) fed from the
stream's shared log: XRANGE rebuilds the current window, XREAD BLOCK follows it, and each event
wakes blocked playlist requests as it would on the producing node. Objects are read through the
tiers by an ``ObjectReader``: the node's memory LRU, then Redis, one GET per key however many
viewers ask at once, misses remembered briefly, hits kept in memory (unpinned, with a TTL).

``ReplicaDirectory`` is the stream lookup the HLS routes use: a stream produced here first, else a
replica, created on demand. HTTP lookups are synchronous, so a new replica is returned at once,
still loading: the multivariant handler waits for ``is_ready()``; other requests get 503 until the
first read completes, and 404 once Redis says the stream does not exist.

``EventGate`` is the pure part: which events of a log (possibly trimmed at the front, replayed
after a retried write, or restarted under the same name) a window can take.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from edge.cache import MemoryCache
from edge.errors import NotFound, Unavailable
from edge.redis_tier import StreamHistory, TierTimings
from origin.live import LiveStream, StreamEnded, TrackDeclared, WindowEvent
from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.rendition import RenditionSettings, init_uri
from origin.window import ANY_RENDITION, LiveSettings, StreamWindow, object_key

log = logging.getLogger("livedge.replica")


class StreamSource(Protocol):
    """What replicas read streams and objects through: ``edge.redis_tier.RedisTier``, or any
    other shared log with the same contract (peer fill). ``get`` and the reads raise
    ``Unavailable`` while the source cannot be reached; ``wait_available`` returns once it can."""

    timings: TierTimings

    @property
    def available(self) -> bool: ...

    async def wait_available(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def read_history(self, name: str) -> StreamHistory | None: ...

    async def read_events(self, name: str, after: str,
                          block: float) -> tuple[str, list[WindowEvent]]: ...

    async def stream_exists(self, name: str) -> bool: ...

    def stop_following(self, name: str) -> None:
        """The replica of ``name`` reads no more events: release what its reads held open."""


# -- which events a window can take (pure) ---------------------------------------------------------
class Verdict(enum.Enum):
    APPLY = "apply"
    SKIP = "skip"  # already applied, or cannot be listed (before the track's first whole segment)
    RESET = "reset"  # the log restarted (numbers went back, or events after the end): start over


@dataclass
class _TrackPosition:
    msn: int
    parts: int = 0  # parts applied in segment ``msn``
    complete: bool = False
    broken: bool = False  # a part went missing: wait for the next segment


class EventGate:
    """Admits a log's events in an order ``RenditionLog`` accepts: per track, a segment opens,
    its parts follow by index, it completes. Duplicates (a write retried after a timeout) are
    skipped; a gap (writes dropped during an outage) skips the rest of that segment; numbers going
    back mean the producer started the stream over."""

    def __init__(self) -> None:
        self._tracks: dict[str, _TrackPosition] = {}
        self.ended = False

    def admit(self, event: WindowEvent) -> Verdict:
        if self.ended:
            return Verdict.SKIP if isinstance(event, StreamEnded) else Verdict.RESET
        if isinstance(event, StreamEnded):
            self.ended = True
            return Verdict.APPLY
        if isinstance(event, TrackDeclared):
            return Verdict.APPLY
        position = self._tracks.get(event.track)
        if isinstance(event, SegmentOpened):
            if position is not None and event.msn < position.msn:
                return Verdict.RESET
            if position is not None and event.msn == position.msn:
                return Verdict.SKIP
            self._tracks[event.track] = _TrackPosition(event.msn)
            return Verdict.APPLY
        if position is None or event.msn != position.msn or position.complete \
                or position.broken:
            if position is not None and event.msn > position.msn:
                position.broken = True  # this segment's opening was lost
            return Verdict.SKIP
        if isinstance(event, PartReady):
            if event.index < position.parts:
                return Verdict.SKIP
            if event.index > position.parts:
                position.broken = True
                return Verdict.SKIP
            position.parts += 1
            return Verdict.APPLY
        if isinstance(event, SegmentReady):
            if event.part_count != position.parts:
                position.broken = True
                return Verdict.SKIP
            position.complete = True
            return Verdict.APPLY
        return Verdict.SKIP


# -- reading objects through the tiers -------------------------------------------------------------
@dataclass(frozen=True)
class ReaderStats:
    memory_hits: int
    redis_reads: int  # GETs sent to Redis
    coalesced: int  # requests that shared another request's GET
    negative_hits: int  # requests answered "absent" from the short negative cache
    unavailable: int  # requests answered 503: Redis down and the object not in memory


class ObjectReader:
    """Reads objects through the memory tier and Redis for every replica of this node."""

    def __init__(self, memory: MemoryCache, tier: StreamSource, negative_ttl: float = 0.5,
                 negative_max: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._memory = memory
        self._tier = tier
        self._negative_ttl = negative_ttl
        self._negative_max = negative_max
        self._clock = clock
        self._negative: dict[str, float] = {}  # key -> when the miss stops counting
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self._memory_hits = 0
        self._redis_reads = 0
        self._coalesced = 0
        self._negative_hits = 0
        self._unavailable = 0

    async def read(self, key: str, ttl: float) -> bytes | None:
        """The object under ``key`` (an ``object_key``), or ``None`` if no tier holds it. A Redis
        hit is kept in memory for ``ttl`` seconds. Raises ``Unavailable`` (503) when only Redis
        could answer and it is down."""
        data = self._memory.get_now(key)
        if data is not None:
            self._memory_hits += 1
            return data
        expires = self._negative.get(key)
        if expires is not None:
            if self._clock() < expires:
                self._negative_hits += 1
                return None
            del self._negative[key]
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._inflight[key] = asyncio.ensure_future(self._fetch(key, ttl))
            pending.add_done_callback(lambda done: self._settled(key, done))
        else:
            self._coalesced += 1
        try:
            # Shielded: a viewer who hangs up does not cancel the GET others are waiting for.
            return await asyncio.shield(pending)
        except Unavailable:
            self._unavailable += 1
            raise

    async def _fetch(self, key: str, ttl: float) -> bytes | None:
        self._redis_reads += 1
        data = await self._tier.get(key)
        if data is None:
            if len(self._negative) >= self._negative_max:
                now = self._clock()
                self._negative = {k: t for k, t in self._negative.items() if t > now}
                if len(self._negative) >= self._negative_max:
                    self._negative.clear()
            self._negative[key] = self._clock() + self._negative_ttl
        else:
            self._memory.set_now(key, data, ttl=ttl)
        return data

    def _settled(self, key: str, done: asyncio.Future) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a GET nobody awaits any more is not reported

    def forget(self, key: str) -> None:
        """Drop a remembered miss (the object was just announced)."""
        self._negative.pop(key, None)

    def stats(self) -> ReaderStats:
        return ReaderStats(self._memory_hits, self._redis_reads, self._coalesced,
                           self._negative_hits, self._unavailable)


# -- a stream produced here continuing its log (restart) -------------------------------------------
class LocalResumer:
    """The Redis tier's ``StreamResumer`` for streams produced on this node: a restarted node's
    new ``LiveStream`` continues the log, reading the objects listed before the restart through
    ``reader``."""

    def __init__(self, local: Callable[[str], LiveStream | None], reader: ObjectReader,
                 ttl_for: Callable[[str], float]) -> None:
        self._local = local
        self._reader = reader
        self._ttl_for = ttl_for
        self._warming: set[asyncio.Future] = set()

    def hold(self, name: str) -> None:
        stream = self._local(name)
        if stream is not None:
            stream.hold()

    def resume(self, name: str, history: list[WindowEvent]) -> bool:
        stream = self._local(name)

        async def fetch_missing(rendition: str, object_name: str) -> bytes | None:
            return await self._reader.read(object_key(name, rendition, object_name),
                                           self._ttl_for(object_name))

        if stream is None or not stream.resume(history, fetch_missing):
            return False
        closed = stream.closed_segments()
        if closed:
            # A segment closed from a crashed producer's parts exists only as those parts, which
            # Redis keeps a few target durations: join them now, while the window lists it.
            task = asyncio.ensure_future(asyncio.gather(
                *(stream.fetch_object(rendition, object_name) for rendition, object_name in closed),
                return_exceptions=True))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)
        return True

    def release(self, name: str) -> None:
        stream = self._local(name)
        if stream is not None:
            stream.release()


# -- one replicated stream -------------------------------------------------------------------------
class ReplicaState(enum.Enum):
    LOADING = "loading"  # the first read of the log has not completed
    LIVE = "live"
    MISSING = "missing"  # Redis holds no such stream
    RETIRED = "retired"  # no longer followed; the directory has dropped it


class ReplicaStream(StreamWindow):
    """The window of a stream produced elsewhere, followed through Redis. ``start()`` it;
    ``close()`` stops following. ``settings``/``part_target`` are this node's, used only until
    the producer's are read from Redis."""

    def __init__(self, name: str, tier: StreamSource, reader: ObjectReader, memory: MemoryCache,
                 settings: LiveSettings, part_target: float, *,
                 on_retired: Callable[[ReplicaStream], None] = lambda replica: None,
                 poll: float = 1.0, expiry_check: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name, settings, memory, part_target, clock)
        self.state = ReplicaState.LOADING
        self._tier = tier
        self._reader = reader
        self._memory = memory
        self._gate = EventGate()
        self._last_id = "0-0"
        self._on_retired = on_retired
        # (stream, event) for each event applied: the event log this node's HTTP workers follow.
        self.listeners: list[Callable[[str, WindowEvent], None]] = []
        self._poll = poll
        self._expiry_check = expiry_check
        self._task: asyncio.Task | None = None
        self.loaded = asyncio.Event()  # set once the state is no longer LOADING

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"replica:{self.name}")

    async def close(self) -> None:
        self._retire()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- what HTTP sees ----------------------------------------------------------------------------
    def is_loading(self) -> bool:
        return self.state is ReplicaState.LOADING

    async def until_loaded(self, timeout: float) -> None:
        if self.state is ReplicaState.LOADING:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.loaded.wait(), timeout)

    def is_ready(self) -> bool:
        if self.state is ReplicaState.MISSING:
            raise NotFound(f"stream {self.name} is not live")
        return super().is_ready()

    def has_rendition(self, rendition: str) -> bool:
        """Raises ``Unavailable`` while the window is still being read (the answer is not known
        yet) and ``NotFound`` if the stream does not exist."""
        if self.state is ReplicaState.LOADING:
            raise Unavailable(f"stream {self.name} is loading, retry")
        if self.state is ReplicaState.MISSING:
            raise NotFound(f"stream {self.name} is not live")
        return super().has_rendition(rendition)

    async def fetch_object(self, rendition: str, name: str) -> bytes | None:
        return await self._reader.read(object_key(self.name, rendition, name),
                                       self._tier.timings.ttl_for(name))

    # -- following the log -------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            if await self._load():
                await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("replica failed", extra={"stream": self.name})
        finally:
            self._tier.stop_following(self.name)
        self._retire()

    async def _load(self) -> bool:
        while True:
            try:
                history = await self._tier.read_history(self.name)
                break
            except Unavailable:
                await self._tier.wait_available()
        if history is None:
            self._set_state(ReplicaState.MISSING)
            return False
        if history.settings is not None and history.part_target is not None:
            self._adopt(history.settings, history.part_target)
        if history.started_at is not None:
            self.started_at = history.started_at
        for event in history.events:
            if not self._admit(event):
                return False
        self._last_id = history.last_id
        self._set_state(ReplicaState.LIVE)
        log.info("replicating stream", extra={"stream": self.name, "node": history.node})
        return True

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while self.state is ReplicaState.LIVE:
            try:
                self._last_id, events = await self._tier.read_events(self.name, self._last_id,
                                                                     self._poll)
            except Unavailable:
                await self._tier.wait_available()
                continue
            for event in events:
                if not self._admit(event):
                    return
            if events:
                quiet_since = loop.time()
            elif loop.time() - quiet_since > self._expiry_check:
                quiet_since = loop.time()
                try:
                    exists = await self._tier.stream_exists(self.name)
                except Unavailable:
                    continue
                if not exists:  # expired: its producer is gone for good
                    if not self.ended:
                        self.end_playlists()
                    return

    def _admit(self, event: WindowEvent) -> bool:
        """Apply ``event`` if the gate lets it through; False when the replica must stop."""
        verdict = self._gate.admit(event)
        if verdict is Verdict.RESET:
            log.info("stream restarted under the same name: replica dropped",
                     extra={"stream": self.name})
            return False
        if verdict is Verdict.SKIP:
            return True
        if isinstance(event, TrackDeclared):
            # Each format has its own init URI, but a restarted producer may give one new bytes:
            # never serve the declared one from memory, nor a miss remembered before it existed.
            key = object_key(self.name, event.track.name, init_uri(event.init_generation))
            self._memory.delete(key)
            self._reader.forget(key)
            self.declare_track(event.track, event.init_generation)
        elif isinstance(event, StreamEnded):
            self.end_playlists()
        else:
            self.apply_event(event)
        for listener in self.listeners:
            listener(self.name, event)
        return True

    def _adopt(self, settings: LiveSettings, part_target: float) -> None:
        """Render with the producer's window settings (before any track is declared)."""
        self.settings = settings
        self._rendition_settings = RenditionSettings(
            settings.segment_duration, part_target, settings.window_segments,
            settings.target_duration)

    def _set_state(self, state: ReplicaState) -> None:
        self.state = state
        self.loaded.set()
        self._changed_rendition(ANY_RENDITION)  # waiting requests look again (and may 404)

    def _retire(self) -> None:
        if self.state in (ReplicaState.RETIRED, ReplicaState.MISSING):
            if self.state is ReplicaState.MISSING:
                self._on_retired(self)
            return
        self._set_state(ReplicaState.RETIRED)
        self._on_retired(self)


# -- the lookup the HLS routes use -----------------------------------------------------------------
class LocalStreams(Protocol):
    def live_stream(self, name: str) -> StreamWindow | None: ...


@dataclass(frozen=True)
class ReplicaStats:
    replicas: int
    loading: int
    created: int
    reader: ReaderStats


class ReplicaDirectory:
    """Streams produced here first, else replicas of streams produced elsewhere."""

    def __init__(self, local: LocalStreams, tier: StreamSource, reader: ObjectReader,
                 memory: MemoryCache, settings: LiveSettings, part_target: float, *,
                 max_replicas: int = 1000, missing_ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, **replica_options: float) -> None:
        self._local = local
        self._tier = tier
        self._reader = reader
        self._memory = memory
        self._settings = settings
        self._part_target = part_target
        self._max_replicas = max_replicas
        self._missing_ttl = missing_ttl
        self._clock = clock
        self._replica_options = replica_options
        self._replicas: dict[str, ReplicaStream] = {}
        self.listeners: list[Callable[[str, WindowEvent], None]] = []  # given to every replica
        self._missing: dict[str, float] = {}  # name -> until when "no such stream" holds
        self._closing: set[asyncio.Task] = set()
        self._created = 0

    def live_stream(self, name: str) -> StreamWindow | None:
        """The stream named ``name``: produced here, or a replica (possibly still loading);
        ``None`` if Redis said recently that it does not exist. Raises ``Unavailable`` when a
        replica would be needed and Redis is down, or too many replicas exist."""
        local = self._local.live_stream(name)
        if local is not None:
            replica = self._replicas.pop(name, None)
            if replica is not None:  # produced here now (a publisher came back): stop following
                self._close_later(replica)
            return local
        replica = self._replicas.get(name)
        if replica is not None:
            return replica
        until = self._missing.get(name)
        if until is not None:
            if self._clock() < until:
                return None
            del self._missing[name]
        if not self._tier.available:
            raise Unavailable("the shared cache is unavailable")
        if len(self._replicas) >= self._max_replicas:
            raise Unavailable("this node follows too many streams")
        replica = ReplicaStream(name, self._tier, self._reader, self._memory, self._settings,
                                self._part_target, on_retired=self._retired,
                                **self._replica_options)
        replica.listeners.extend(self.listeners)
        self._replicas[name] = replica
        self._created += 1
        replica.start()
        return replica

    def _retired(self, replica: ReplicaStream) -> None:
        if self._replicas.get(replica.name) is replica:
            del self._replicas[replica.name]
        if replica.state is ReplicaState.MISSING:
            if len(self._missing) > 10_000:
                self._missing.clear()
            self._missing[replica.name] = self._clock() + self._missing_ttl

    def _close_later(self, replica: ReplicaStream) -> None:
        task = asyncio.ensure_future(replica.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def existing(self, name: str) -> StreamWindow | None:
        """The stream named ``name`` if produced or followed here now; never starts a replica."""
        return self._local.live_stream(name) or self._replicas.get(name)

    def replicas(self) -> list[ReplicaStream]:
        return list(self._replicas.values())

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            replicas=len(self._replicas),
            loading=sum(1 for r in self._replicas.values() if r.state is ReplicaState.LOADING),
            created=self._created, reader=self._reader.stats())

    async def close(self) -> None:
        replicas = list(self._replicas.values())
        self._replicas.clear()
        await asyncio.gather(*(replica.close() for replica in replicas), *self._closing,
                             return_exceptions=True)
