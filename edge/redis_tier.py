"""The second cache tier: Redis, shared by the nodes of a fleet.

Two jobs. As a ``Cache`` (async ``get``/``set`` with a TTL) it is the tier below the node's memory
LRU. And it writes every live stream produced on this node through to Redis, so other nodes (and
this node after a restart) can serve it:

- objects (init segments, parts, segments) under ``livedge:obj:`` + ``origin.window.object_key``,
  with a TTL by kind (``TierTimings``);
- the stream's window events, without media bytes (``origin.wire``), appended to the Redis Stream
  ``livedge:stream:{name}:events`` (trimmed to about a window); readers replay it with XRANGE and
  follow it with XREAD BLOCK, which wakes them as soon as an event is added;
- ``livedge:stream:{name}:info``, a hash with the window settings, the newest declaration of each
  track and the producing node: what a log trimmed from the front no longer holds;
- ``livedge:streams``, the directory of live streams: name -> producing node and heartbeat.

``{name}`` is a Redis Cluster hash tag: a stream's log and info share a slot, objects spread out.

Nothing here may delay the live path. ``on_window_event`` (a node stream listener, called on the
loop) only appends to a bounded queue; one writer task pipelines the queue to Redis. A slow or dead
Redis fills the queue (the oldest entries are dropped and counted), never a part's arrival in the
memory tier nor the answer to a blocked playlist request. Outages are logged once; a probe retries
with backoff (0.2 s doubling to 5 s) and the writer resumes, first rewriting what a restarted Redis
has lost (each stream's info, init segments and directory entry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from edge.errors import Unavailable
from origin.live import StreamEnded, TrackDeclared, WindowEvent
from origin.packager import PackagerSettings, PartReady, SegmentOpened, SegmentReady
from origin.rendition import init_uri, part_uri, segment_uri
from origin.window import LiveSettings, object_key
from origin.wire import (WireError, decode_event, decode_settings, encode_event, encode_settings,
                         pack_event, unpack_event)

log = logging.getLogger("livedge.redis")

DIRECTORY_KEY = "livedge:streams"
_OBJECT_PREFIX = "livedge:obj:"

# A track's init generation (``TrackDeclared``/``SegmentOpened.init_generation``) in the log's entry
# fields; absent means 0 (``init.mp4``), so logs written before it existed read the same.

# Errors that mean "Redis cannot be reached right now", as opposed to a refused command.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a demoted master during a Sentinel failover
    OSError, asyncio.TimeoutError)


def object_redis_key(key: str) -> str:
    """The Redis key of an object stored under ``key`` (an ``origin.window.object_key``)."""
    return _OBJECT_PREFIX + key


def events_key(stream: str) -> str:
    return f"livedge:stream:{{{stream}}}:events"


def info_key(stream: str) -> str:
    return f"livedge:stream:{{{stream}}}:info"


class StreamResumer(Protocol):
    """Continues a log with a stream produced here (``edge.replica.LocalResumer``). Called on the
    loop: ``hold`` at the stream's first event, then exactly one of ``resume`` or ``release``."""

    def hold(self, name: str) -> None: ...

    def resume(self, name: str, history: list[WindowEvent]) -> bool: ...

    def release(self, name: str) -> None: ...


# -- deployment ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RedisConfig:
    """How to reach Redis. ``url``: ``redis://``, ``rediss://`` (TLS) or ``unix://``; with
    ``sentinels`` ((host, port) pairs) the master of ``sentinel_service`` is found through Sentinel
    and ``url`` only lends credentials and the database; ``cluster``: ``url`` names any node of a
    Redis Cluster. Times in seconds."""

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str = "mymaster"
    cluster: bool = False
    socket_timeout: float = 5.0
    connect_timeout: float = 2.0


def connect(config: RedisConfig) -> Any:
    """A redis-py asyncio client for ``config`` (``Redis`` or ``RedisCluster``). No I/O happens
    here. Client-side retries are off: the tier has its own outage handling, and a retry loop
    inside a GET would hold a viewer's request instead of answering 503."""
    options: dict[str, Any] = {"socket_timeout": config.socket_timeout,
                               "socket_connect_timeout": config.connect_timeout}
    if config.cluster:
        from redis.asyncio.cluster import RedisCluster
        if not config.url:
            raise ValueError("a Redis Cluster needs REDIS_URL naming one of its nodes")
        return RedisCluster.from_url(config.url, **options)
    options["retry"] = Retry(NoBackoff(), 0)
    if config.sentinels:
        from redis.asyncio.sentinel import Sentinel
        auth = {key: value for key, value in parse_url(config.url).items()
                if key in ("username", "password", "db")} if config.url else {}
        if config.url and config.url.startswith("rediss://"):
            auth["ssl"] = True
        sentinel = Sentinel(list(config.sentinels), sentinel_kwargs={
            "socket_timeout": config.socket_timeout,
            "socket_connect_timeout": config.connect_timeout}, **options, **auth)
        return sentinel.master_for(config.sentinel_service)
    if not config.url:
        raise ValueError("REDIS_URL is not set")
    return aioredis.from_url(config.url, **options)


# -- what is kept, and how long --------------------------------------------------------------------
@dataclass(frozen=True)
class TierTimings:
    """TTLs (seconds) of what the tier writes, from the window settings. Parts are listed only
    near the live edge; segments for the window plus ``dvr_seconds``; a stream's log, info and init
    segments while it is live (refreshed by heartbeats) and a window after it ends."""

    part_ttl: float
    segment_ttl: float
    stream_ttl: float
    ended_ttl: float
    parts_per_segment: int
    window_segments: int

    @classmethod
    def for_window(cls, settings: LiveSettings, dvr_seconds: float,
                   heartbeat_interval: float) -> TierTimings:
        target = settings.target_duration
        window = settings.window_segments * target
        segment_ttl = window + dvr_seconds + target
        return cls(part_ttl=4.0 * target, segment_ttl=segment_ttl,
                   stream_ttl=segment_ttl + 3 * heartbeat_interval, ended_ttl=window + target,
                   parts_per_segment=math.ceil(settings.segment_duration
                                               / settings.part_duration) + 1,
                   window_segments=settings.window_segments)

    def ttl_for(self, name: str) -> float:
        """The TTL of an object by its name in a rendition (``init.mp4``, ``part…``, ``seg…``)."""
        if name.startswith("part"):
            return self.part_ttl
        if name.startswith("seg"):
            return self.segment_ttl
        return self.stream_ttl

    def log_length(self, tracks: int) -> int:
        """Events to keep in a stream's log: a window and a little more, for every track."""
        return max(1000, max(tracks, 1) * (self.window_segments + 3)
                   * (self.parts_per_segment + 3))


# -- snapshots -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RedisTierStats:
    """For metrics and ``/readyz``. Latencies are seconds over the last few hundred round trips;
    ``dropped`` counts queued writes lost to a full queue; reads are object GETs."""

    available: bool
    queued: int
    queued_bytes: int
    dropped: int
    writes: int
    written_bytes: int
    errors: int
    outages: int
    last_error: str | None
    latency_p50: float
    latency_p99: float
    hits: int
    misses: int
    read_bytes: int
    streams: int  # streams this node writes through


@dataclass(frozen=True)
class StreamHistory:
    """A stream as its shared log holds it. ``events`` start with the info hash's track
    declarations, then the log's events in order (ids in ``ids``, ``None`` for declarations).
    ``settings``/``part_target`` are the producer's, or ``None`` if the info hash is gone."""

    settings: LiveSettings | None
    part_target: float | None
    started_at: float | None
    node: str | None
    events: tuple[WindowEvent, ...]
    ids: tuple[str | None, ...]
    last_id: str  # where to XREAD from

    @property
    def ended(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], StreamEnded)


@dataclass(eq=False)
class _Produced:
    """Write-through state of one stream produced here (one per ``LiveStream``, not per name)."""

    name: str
    started_at: float
    tracks: dict[str, TrackDeclared] = field(default_factory=dict)  # newest, with init bytes
    cut: set[str] = field(default_factory=set)  # tracks with a segment since their declaration
    # Declarations replaced by another format before any segment of theirs: their init is not
    # written, as it could replace bytes the same URI has in a resumed log (``LiveStream.resume``
    # renumbers a restarted stream's inits after the log's).
    void: list[TrackDeclared] = field(default_factory=list)
    decided: bool = False  # resume-or-fresh decided (see ``RedisTier._decide``)
    held: bool = False  # the resumer holds its media until the decision
    fresh: bool = True  # the first write replaces whatever log the name had
    shadowed: bool = False  # another node writes this name's log: this one stays out of Redis
    lost: bool = False  # another node took this stream's log over: it is never written again
    announced: bool = False
    ended: bool = False


@dataclass(frozen=True, slots=True)
class _Item:
    stream: _Produced
    event: WindowEvent
    size: int  # media bytes carried


class RedisTier:
    """The Redis tier of one node. ``start()`` before use, ``close()`` at shutdown.

    ``resumer``, if set, is told when a stream produced here starts (``hold``: its media waits),
    then asked to ``resume`` it if Redis holds a live log under its name (a restart, or a log
    whose writer on another node went quiet: see ``_decide``), else to
    ``release`` it. A stream that did not resume replaces the name's old log.
    """

    def __init__(self, client: Any, settings: LiveSettings, node_id: str, *,
                 dvr_seconds: float = 30.0, heartbeat_interval: float = 2.0,
                 queue_items: int = 10_000, queue_bytes: int = 64 * 2**20,
                 decide_timeout: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self.settings = settings
        self.part_target = PackagerSettings(settings.segment_duration,
                                            settings.part_duration).part_target
        self.node_id = node_id
        self.timings = TierTimings.for_window(settings, dvr_seconds, heartbeat_interval)
        self.heartbeat_interval = heartbeat_interval
        # How long a log goes unwritten before its writer counts as gone (``_writer_gone``): a
        # few part targets, and room for a writer's batching and round trips.
        self.writer_quiet = 3 * self.part_target + 0.5
        self.resumer: StreamResumer | None = None
        self._queue_items = queue_items
        self._queue_bytes = queue_bytes
        self._decide_timeout = decide_timeout
        self._clock = clock
        self._produced: dict[str, _Produced] = {}
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._up = asyncio.Event()
        self._up.set()
        self._available = True
        self._resync_needed = False
        self._shutting_down = False
        self._tasks: list[asyncio.Task] = []
        self._probe: asyncio.Task | None = None
        self._latencies: deque[float] = deque(maxlen=512)
        # Counters.
        self._dropped = 0
        self._writes = 0
        self._written_bytes = 0
        self._errors = 0
        self._outages = 0
        self._last_error: str | None = None
        self._hits = 0
        self._misses = 0
        self._read_bytes = 0
        self._drop_logged = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the writer and the heartbeat. A Redis that is down now is not an error: the tier
        starts unavailable and the probe keeps trying."""
        try:
            await self._timed(self._client.ping())
        except OUTAGE_ERRORS as error:
            self._failed(error)
        self._tasks = [asyncio.create_task(self._write_loop(), name="redis-writer"),
                       asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat")]

    def shutting_down(self) -> None:
        """The node is stopping: from now on, streams ending here are interrupted, not ended: no
        ``StreamEnded`` is written, so the log stays live (until it expires) for a restarted node
        or a returning publisher to resume, and other nodes do not tell players it is over."""
        self._shutting_down = True

    async def wait_drained(self) -> None:
        """Until the queue is empty and its last batch written (or dropped)."""
        await self._idle.wait()

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Write what is queued (at most ``flush_timeout`` seconds, if Redis is up), then stop."""
        if not self._idle.is_set() and self._available and self._tasks:
            try:
                await asyncio.wait_for(self._idle.wait(), flush_timeout)
            except TimeoutError:
                log.warning("redis writes still queued at shutdown",
                            extra={"queued": len(self._queue)})
        if self._shutting_down and self._available:
            interrupted = [stream for stream in self._produced.values()
                           if stream.announced and not stream.ended and not stream.shadowed]
            if interrupted:
                pipe = self._client.pipeline(transaction=False)
                for stream in interrupted:
                    pipe.hset(DIRECTORY_KEY, stream.name, self._directory_entry(stream, True))
                try:
                    await asyncio.wait_for(pipe.execute(), flush_timeout)
                except (*OUTAGE_ERRORS, redis.exceptions.RedisError):
                    pass
        tasks = [*self._tasks, *([self._probe] if self._probe else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        await self._client.aclose()

    # -- availability ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._available

    async def wait_available(self) -> None:
        await self._up.wait()

    def _failed(self, error: BaseException) -> None:
        """Redis could not be reached: log once per outage and probe until it answers."""
        self._errors += 1
        self._last_error = f"{type(error).__name__}: {error}"[:300]
        if self._available:
            self._available = False
            self._outages += 1
            self._up.clear()
            log.warning("redis unavailable: serving from memory, queueing writes",
                        extra={"error": self._last_error})
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_up(), name="redis-probe")
        # Streams waiting to learn whether they resume a log start anew now, not after the outage.
        for stream in self._produced.values():
            if stream.held and self.resumer is not None:
                stream.held = False
                self.resumer.release(stream.name)

    async def _probe_until_up(self) -> None:
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            try:
                await self._timed(self._client.ping())
                break
            except OUTAGE_ERRORS as error:
                self._last_error = f"{type(error).__name__}: {error}"[:300]
                delay = min(delay * 2, 5.0)
        self._available = True
        self._resync_needed = True
        self._drop_logged = False
        self._up.set()
        log.info("redis available again", extra={"queued": len(self._queue)})

    async def _timed(self, awaitable: Any) -> Any:
        started = time.perf_counter()
        result = await awaitable
        self._latencies.append(time.perf_counter() - started)
        return result

    # -- Cache protocol ----------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        """The object under ``key`` (an ``object_key``), or ``None`` if Redis does not hold it.
        Raises ``Unavailable`` (503) while Redis cannot be reached: failing fast, not waiting."""
        if not self._available:
            raise Unavailable("the shared cache is unavailable")
        try:
            value = await self._timed(self._client.get(object_redis_key(key)))
        except OUTAGE_ERRORS as error:
            self._failed(error)
            raise Unavailable("the shared cache is unavailable") from None
        if value is None:
            self._misses += 1
        else:
            self._hits += 1
            self._read_bytes += len(value)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` now (not through the queue). Failures are counted, not raised: a tier
        that cannot store is a tier that misses later."""
        if not self._available:
            return
        try:
            await self._timed(self._client.set(object_redis_key(key), value,
                                               px=None if ttl is None else max(1, int(ttl * 1000))))
            self._writes += 1
            self._written_bytes += len(value)
        except OUTAGE_ERRORS as error:
            self._failed(error)

    # -- reading streams ---------------------------------------------------------------------------
    async def read_history(self, name: str) -> StreamHistory | None:
        """Stream ``name`` as Redis holds it, or ``None`` if Redis holds nothing of it. Raises
        ``Unavailable`` while Redis cannot be reached."""
        if not self._available:
            raise Unavailable("the shared cache is unavailable")
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(info_key(name))
            pipe.xrange(events_key(name))
            info, entries = await self._timed(pipe.execute())
        except OUTAGE_ERRORS as error:
            self._failed(error)
            raise Unavailable("the shared cache is unavailable") from None
        if not info and not entries:
            return None
        info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
        settings = part_target = None
        if "settings" in info:
            try:
                settings, part_target = decode_settings(json.loads(info["settings"]))
            except (WireError, ValueError):
                log.warning("bad stream settings in redis", extra={"stream": name})
        events: list[WindowEvent] = []
        ids: list[str | None] = []
        for field_name, value in sorted(info.items()):
            if field_name.startswith("track:"):
                try:
                    events.append(unpack_event(value))
                    ids.append(None)
                except WireError:
                    log.warning("bad track declaration in redis", extra={"stream": name})
        last_id = "0-0"
        for entry_id, fields in entries:
            last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                events.append(decode_event(fields))
                ids.append(last_id)
            except WireError:
                self._errors += 1  # an entry we cannot read is skipped, not fatal
        started_at = _float_or_none(info.get("started_at"))
        node = info["node"].decode() if isinstance(info.get("node"), bytes) else info.get("node")
        return StreamHistory(settings, part_target, started_at, node, tuple(events), tuple(ids),
                             last_id)

    def stop_following(self, name: str) -> None:
        """Nothing to release: each XREAD BLOCK is a request of its own."""

    async def read_events(self, name: str, after: str, block: float,
                          count: int = 1000) -> tuple[str, list[WindowEvent]]:
        """Events of stream ``name`` after entry id ``after``, waiting up to ``block`` seconds for
        one (XREAD BLOCK), and the id to read from next. No events when none came; entries that do
        not decode are skipped and counted. Raises ``Unavailable`` while Redis is down."""
        if not self._available:
            raise Unavailable("the shared cache is unavailable")
        try:
            answer = await self._client.xread({events_key(name): after}, count=count,
                                              block=max(1, int(block * 1000)))
        except OUTAGE_ERRORS as error:
            self._failed(error)
            raise Unavailable("the shared cache is unavailable") from None
        events: list[WindowEvent] = []
        for _, entries in _xread_entries(answer):
            for entry_id, fields in entries:
                after = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    events.append(decode_event(fields))
                except WireError:
                    self._errors += 1
        return after, events

    async def stream_exists(self, name: str) -> bool:
        if not self._available:
            raise Unavailable("the shared cache is unavailable")
        try:
            return bool(await self._timed(self._client.exists(events_key(name))))
        except OUTAGE_ERRORS as error:
            self._failed(error)
            raise Unavailable("the shared cache is unavailable") from None

    async def live_streams(self) -> dict[str, dict[str, object]]:
        """The fleet's live streams: name -> {"node", "heartbeat", "started_at"}, leaving out
        entries whose heartbeat is older than three intervals (their node stopped)."""
        if not self._available:
            raise Unavailable("the shared cache is unavailable")
        try:
            entries = await self._timed(self._client.hgetall(DIRECTORY_KEY))
        except OUTAGE_ERRORS as error:
            self._failed(error)
            raise Unavailable("the shared cache is unavailable") from None
        now = self._clock()
        live = {}
        for name, value in entries.items():
            try:
                entry = json.loads(value)
                fresh = now - float(entry["heartbeat"]) <= 3 * self.heartbeat_interval
            except (ValueError, KeyError, TypeError):
                continue
            if fresh:
                live[name.decode() if isinstance(name, bytes) else name] = entry
        return live

    # -- writing through ---------------------------------------------------------------------------
    def on_window_event(self, name: str, event: WindowEvent) -> None:
        """Node stream listener: queue ``event`` of stream ``name`` for the writer. Never blocks,
        never raises: when the queue is full the oldest entries are dropped and counted."""
        stream = self._produced.get(name)
        if stream is not None and stream.lost:
            if isinstance(event, StreamEnded):
                del self._produced[name]  # a later stream of this name decides afresh
            return
        if stream is None or stream.ended:
            stream = self._produced[name] = _Produced(name, self._clock())
            if self.resumer is not None and self._available:
                stream.held = True
                self.resumer.hold(name)  # until ``_decide``, a moment later
        if isinstance(event, TrackDeclared):
            replaced = stream.tracks.get(event.track.name)
            if replaced is not None and event.track.name not in stream.cut \
                    and replaced.init_generation != event.init_generation:
                stream.void.append(replaced)
            stream.cut.discard(event.track.name)
            stream.tracks[event.track.name] = event
            size = len(event.init_segment)
        elif isinstance(event, (PartReady, SegmentReady)):
            size = len(event.data)
        elif isinstance(event, StreamEnded):
            if self._shutting_down:
                return  # interrupted, not ended: see ``shutting_down``
            stream.ended = True
            size = 0
        else:
            if isinstance(event, SegmentOpened):
                stream.cut.add(event.track)
            size = 0
        self._queue.append(_Item(stream, event, size))
        self._queued_bytes += size
        while len(self._queue) > self._queue_items or self._queued_bytes > self._queue_bytes:
            self._drop_oldest()
        self._idle.clear()
        self._wake.set()

    def _drop_oldest(self) -> None:
        dropped = self._queue.popleft()
        self._queued_bytes -= dropped.size
        self._dropped += 1
        if not self._drop_logged:
            self._drop_logged = True
            log.warning("redis write queue full: dropping the oldest writes",
                        extra={"queued": len(self._queue)})

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._available:
                await self._up.wait()
                continue
            batch = self._take_batch()
            try:
                if self._resync_needed:
                    await self._resync()
                for stream in {item.stream for item in batch if not item.stream.decided}:
                    await self._decide(stream)
                batch = [item for item in batch if not item.stream.shadowed]
                await self._write(batch)
            except Unavailable:  # a read on the way (``_decide``) found Redis down
                self._put_back(batch)
            except OUTAGE_ERRORS as error:
                self._put_back(batch)
                self._failed(error)
            except redis.exceptions.RedisError as error:
                # A refused command (out of memory, wrong type...): retrying would loop forever.
                self._errors += 1
                self._dropped += len(batch)
                self._last_error = f"{type(error).__name__}: {error}"[:300]
                log.warning("redis refused writes; dropped them", extra={"error": self._last_error})
            except Exception:
                self._errors += 1
                self._dropped += len(batch)
                log.exception("redis writer failed; dropped a batch")

    def _take_batch(self, max_items: int = 256, max_bytes: int = 8 * 2**20) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._queue and len(batch) < max_items and (not batch or size < max_bytes):
            item = self._queue.popleft()
            self._queued_bytes -= item.size
            size += item.size
            batch.append(item)
        return batch

    def _put_back(self, batch: list[_Item]) -> None:
        self._queue.extendleft(reversed(batch))
        self._queued_bytes += sum(item.size for item in batch)
        while len(self._queue) > self._queue_items or self._queued_bytes > self._queue_bytes:
            self._drop_oldest()

    async def _decide(self, stream: _Produced) -> None:
        """Before the first write of a stream: resume the log its name has in Redis (a restart,
        or a publisher that moved here from a node that died), or replace it; or stay out of
        Redis if another node is writing that log right now (two producers of one name; the
        first keeps the shared log). Redis failing to answer in time means a new log, at once:
        the stream's media is held meanwhile.

        Another node's directory entry stays fresh for up to three heartbeats after that node
        died, and a publisher reconnects within seconds: so an entry naming another node is
        believed only while that node's log is written (``_writer_gone``). A crashed writer's log
        is resumed (continued after a discontinuity), never replaced. Should the other node be
        alive after all (a stalled writer, a publisher in its grace period there), its next
        heartbeat finds this node's claim and it stops writing the log (``lost``)."""
        resumed = False
        try:
            entry = await asyncio.wait_for(self._timed(
                self._client.hget(DIRECTORY_KEY, stream.name)), self._decide_timeout)
            owner = _json_or_none(entry)
            if self._owned_elsewhere(owner) and not await asyncio.wait_for(
                    self._writer_gone(stream.name), self._decide_timeout + self.writer_quiet):
                stream.shadowed = True
                log.warning("stream is live on another node: not writing it to redis",
                            extra={"stream": stream.name, "node": owner.get("node")})
            elif stream.held and self.resumer is not None:
                history = await asyncio.wait_for(self.read_history(stream.name),
                                                 self._decide_timeout)
                if history is not None and not history.ended:
                    resumed = self.resumer.resume(stream.name, list(history.events))
        except Unavailable:
            pass
        except OUTAGE_ERRORS as error:
            self._failed(error)
        except Exception:
            log.exception("resuming a stream failed", extra={"stream": stream.name})
        finally:
            stream.fresh = not resumed
            stream.decided = True
            if stream.held and not resumed and self.resumer is not None:
                self.resumer.release(stream.name)
            stream.held = False
        if resumed:
            log.info("stream resumed from redis", extra={"stream": stream.name})

    async def _writer_gone(self, name: str) -> bool:
        """Whether the log of stream ``name`` has gone unwritten for ``writer_quiet`` seconds,
        by Redis's clock (entry ids are its milliseconds): a node producing a stream adds a part
        every part target, so a quiet log has no live writer. A log quiet for less is looked at
        again once it would have been quiet long enough."""
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            pipe.xrevrange(events_key(name), count=1)
            pipe.time()
            newest, (seconds, micros) = await self._timed(pipe.execute())
            if not newest:
                return True
            entry_id = newest[0][0]
            written_ms = int((entry_id.decode() if isinstance(entry_id, bytes)
                              else entry_id).split("-")[0])
            quiet = int(seconds) + int(micros) / 1e6 - written_ms / 1000
            if quiet >= self.writer_quiet:
                return True
            if attempt == 0:
                await asyncio.sleep(self.writer_quiet - quiet + 0.05)
        return False

    async def _write(self, batch: Sequence[_Item]) -> None:
        """Objects first, then the events that list them, so a reader woken by an event always
        finds its object (two round trips: in a cluster one pipeline would run in parallel)."""
        timings = self.timings
        objects = self._client.pipeline(transaction=False)
        events = self._client.pipeline(transaction=False)
        object_bytes = 0
        touched: dict[_Produced, None] = {}  # in order of first write
        ended: set[_Produced] = set()  # streams whose end is in this batch
        for item in batch:
            stream, event = item.stream, item.event
            if not stream.announced:
                self._announce(objects, events, stream)
            touched[stream] = None
            if isinstance(event, TrackDeclared) and any(event is v for v in stream.void):
                pass  # listed (replicas follow the log) but never needed: see ``_Produced.void``
            elif isinstance(event, TrackDeclared):
                # Each format's init has its own key: segments still listed from before a format
                # change keep theirs, until it expires (after them: stream_ttl > segment_ttl).
                objects.set(object_redis_key(object_key(stream.name, event.track.name,
                                                        init_uri(event.init_generation))),
                            event.init_segment, px=_ms(timings.stream_ttl))
                events.hset(info_key(stream.name), f"track:{event.track.name}",
                            pack_event(event))
            elif isinstance(event, PartReady):
                objects.set(object_redis_key(object_key(stream.name, event.track,
                                                        part_uri(event.msn, event.index))),
                            event.data, px=_ms(timings.part_ttl))
            elif isinstance(event, SegmentReady):
                objects.set(object_redis_key(object_key(stream.name, event.track,
                                                        segment_uri(event.msn))),
                            event.data, px=_ms(timings.segment_ttl))
            elif isinstance(event, StreamEnded):
                ended.add(stream)
            object_bytes += item.size
            events.xadd(events_key(stream.name), encode_event(event),
                        maxlen=timings.log_length(len(stream.tracks)), approximate=True)
        for stream in touched:
            self._expire_stream(events, stream, timings.ended_ttl if stream in ended
                                else timings.stream_ttl)
            if stream in ended:
                events.hdel(DIRECTORY_KEY, stream.name)
        if len(objects):
            await self._timed(objects.execute())
        written = len(objects) + len(events)
        await self._timed(events.execute())
        self._writes += written
        self._written_bytes += object_bytes
        for stream in ended:
            if self._produced.get(stream.name) is stream:
                del self._produced[stream.name]

    def _announce(self, objects: Any, events: Any, stream: _Produced) -> None:
        """A stream's info hash, init segments and directory entry (again, after an outage)."""
        if stream.fresh:
            events.delete(events_key(stream.name), info_key(stream.name))
            stream.fresh = False
        events.hset(info_key(stream.name), mapping={
            "settings": json.dumps(encode_settings(self.settings, self.part_target)),
            "started_at": repr(stream.started_at), "node": self.node_id,
            **{f"track:{name}": pack_event(declared)
               for name, declared in stream.tracks.items()}})
        for name, declared in stream.tracks.items():
            objects.set(object_redis_key(object_key(stream.name, name,
                                                    init_uri(declared.init_generation))),
                        declared.init_segment, px=_ms(self.timings.stream_ttl))
        if not stream.ended:
            events.hset(DIRECTORY_KEY, stream.name, self._directory_entry(stream))
        stream.announced = True

    def _expire_stream(self, pipe: Any, stream: _Produced, ttl: float) -> None:
        pipe.pexpire(events_key(stream.name), _ms(ttl))
        pipe.pexpire(info_key(stream.name), _ms(ttl))
        for name, declared in stream.tracks.items():
            pipe.pexpire(object_redis_key(object_key(stream.name, name,
                                                     init_uri(declared.init_generation))),
                         _ms(ttl))

    def _directory_entry(self, stream: _Produced, interrupted: bool = False) -> str:
        entry = {"node": self.node_id, "heartbeat": self._clock(), "started_at": stream.started_at}
        if interrupted:
            entry["interrupted"] = True  # any node may resume it at once
        return json.dumps(entry)

    async def _resync(self) -> None:
        """After an outage: Redis may have restarted empty; rewrite every live stream's info,
        init segments and directory entry before the queued events."""
        objects = self._client.pipeline(transaction=False)
        events = self._client.pipeline(transaction=False)
        for stream in self._produced.values():
            if stream.announced and not stream.ended and not stream.shadowed:
                self._announce(objects, events, stream)
                self._expire_stream(events, stream, self.timings.stream_ttl)
        if len(objects):
            await self._timed(objects.execute())
        if len(events):
            await self._timed(events.execute())
        self._resync_needed = False

    async def _heartbeat_loop(self) -> None:
        """Keep live streams listed and their log, info and init segments from expiring (a stream
        may be quiet for a while: a publisher in its grace period); take over the log of a
        stream another node was writing once that node stops."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self._available or self._shutting_down:
                continue
            streams = [s for s in self._produced.values() if s.announced and not s.ended
                       and not s.shadowed]
            shadowed = [s for s in self._produced.values() if s.shadowed and not s.ended
                        and not s.lost]
            pipe = self._client.pipeline(transaction=False)
            stale_before = self._clock() - 3 * self.heartbeat_interval
            for stream in streams:  # first: their answers say whether the entry is still ours
                pipe.eval(_KEEP_ENTRY, 1, DIRECTORY_KEY, stream.name,
                          self._directory_entry(stream), self.node_id, repr(stale_before))
            for stream in streams:
                self._expire_stream(pipe, stream, self.timings.stream_ttl)
            for stream in shadowed:
                pipe.hget(DIRECTORY_KEY, stream.name)
            if not len(pipe):
                continue
            try:
                answers = await self._timed(pipe.execute())
            except OUTAGE_ERRORS as error:
                self._failed(error)
                continue
            except redis.exceptions.RedisError as error:
                self._errors += 1
                self._last_error = f"{type(error).__name__}: {error}"[:300]
                continue
            for stream, kept in zip(streams, answers):
                if not kept:
                    stream.shadowed = stream.lost = True
                    log.warning("another node took over the redis log of a stream produced here:"
                                " no longer writing it", extra={"stream": stream.name})
            for stream, entry in zip(shadowed, answers[len(answers) - len(shadowed):]):
                if not self._owned_elsewhere(_json_or_none(entry)):
                    stream.shadowed = False  # its next write starts a new log under the name
                    stream.fresh = True
                    log.info("taking over the redis log of a stream",
                             extra={"stream": stream.name})

    def _owned_elsewhere(self, owner: dict[str, Any] | None) -> bool:
        """Whether a directory entry says another node is writing that stream's log now."""
        try:
            return owner is not None and owner.get("node") != self.node_id \
                and not owner.get("interrupted") \
                and self._clock() - float(owner.get("heartbeat", 0)) <= 3 * self.heartbeat_interval
        except (TypeError, ValueError):
            return False

    # -- snapshots ---------------------------------------------------------------------------------
    def stats(self) -> RedisTierStats:
        latencies = sorted(self._latencies)
        return RedisTierStats(
            available=self._available, queued=len(self._queue), queued_bytes=self._queued_bytes,
            dropped=self._dropped, writes=self._writes, written_bytes=self._written_bytes,
            errors=self._errors, outages=self._outages, last_error=self._last_error,
            latency_p50=_percentile(latencies, 0.50), latency_p99=_percentile(latencies, 0.99),
            hits=self._hits, misses=self._misses, read_bytes=self._read_bytes,
            streams=sum(1 for stream in self._produced.values()
                        if not stream.ended and not stream.shadowed))


# A heartbeat's directory write (KEYS[1] the directory; ARGV: stream, entry, this node, the
# heartbeat time before which an entry is stale): written unless a live entry of another node holds
# the name, which means that node took the stream's log over (see ``RedisTier._decide``). 1 if
# written.
_KEEP_ENTRY = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, entry = pcall(cjson.decode, current)
  if ok and type(entry) == 'table' and entry['node'] ~= ARGV[3] and not entry['interrupted']
      and tonumber(entry['heartbeat']) and tonumber(entry['heartbeat']) >= tonumber(ARGV[4]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _json_or_none(value: object) -> dict[str, Any] | None:
    try:
        decoded = json.loads(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def _float_or_none(value: object) -> float | None:
    try:
        return float(value.decode() if isinstance(value, bytes)  # type: ignore[arg-type]
                     else value)
    except (TypeError, ValueError, AttributeError):
        return None


def _xread_entries(answer: Any) -> list[tuple[Any, list[tuple[Any, Any]]]]:
    """XREAD's answer as (key, entries) pairs, whether RESP2 (a list) or RESP3 (a dict)."""
    if not answer:
        return []
    if isinstance(answer, dict):
        return [(key, value[0] if value and isinstance(value[0], list) else value)
                for key, value in answer.items()]
    return [(key, entries) for key, entries in answer]


# -- the log's entries: ``origin.wire`` plus the init generation ----------------------------------
