"""Prometheus metrics, read from snapshots at scrape time.

Servers never import this module: the collector asks the node for ``stats()`` snapshots when
Prometheus scrapes. The only live instruments are the HTTP request counter (fed by middleware) and
the event-loop lag probe. A node with HTTP workers (edge/workers.py) answers one scrape for all its
processes: each sample labelled with the ``process`` it came from.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from edge.cache import CacheStats
from edge.hls import HlsCounters
from edge.limits import LimitStats
from edge.redis_tier import RedisTierStats
from edge.replica import ReplicaStats
from origin.live import StreamStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A node's merged exposition (HTTP workers) serves the scrapes of this long: it costs the main
# process a read of every worker and a parse of their text, and /metrics needs no credential.
MERGED_REUSE_SECONDS = 1.0


class NodeSnapshots(Protocol):
    def stream_stats(self) -> list[StreamStats]: ...

    def transcode_stats(self) -> dict[str, object]: ...  # stream -> the transcoder's stats()

    def cache_stats(self) -> CacheStats: ...

    def hls_counters(self) -> HlsCounters: ...

    # The Redis tier and replicas (issue 4); None when the node runs without Redis.
    def redis_stats(self) -> RedisTierStats | None: ...

    def replica_stats(self) -> ReplicaStats | None: ...

    # Per-address limits; None when the node has none. Optional: read with getattr.
    def limit_stats(self) -> LimitStats | None: ...


class NodeCollector(Collector):
    def __init__(self, node: NodeSnapshots) -> None:
        self._node = node

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        streams = self._node.stream_stats()
        yield GaugeMetricFamily("livedge_streams_live", "Streams being produced on this node",
                                value=sum(1 for s in streams if not s.ended))
        samples = CounterMetricFamily("livedge_ingest_samples", "Encoded samples packaged",
                                      labels=["stream"])
        parts = CounterMetricFamily("livedge_parts_produced", "LL-HLS parts produced",
                                    labels=["stream"])
        bitrate = GaugeMetricFamily("livedge_rendition_bitrate_bits_per_second",
                                    "Measured average bitrate over the window",
                                    labels=["stream", "rendition"])
        for stream in streams:
            samples.add_metric([stream.name], stream.samples_in)
            parts.add_metric([stream.name], stream.parts_produced)
            for rendition in stream.renditions:
                bitrate.add_metric([stream.name, rendition.name], rendition.measured_bitrate)
        yield samples
        yield parts
        yield bitrate
        realtime = GaugeMetricFamily("livedge_transcode_realtime_factor",
                                     "Media seconds encoded per wall second spent encoding",
                                     labels=["stream"])
        frames_in = CounterMetricFamily("livedge_ingest_frames", "Decoded video frames into the ladder",
                                        labels=["stream"])
        dropped = CounterMetricFamily("livedge_transcode_dropped_frames",
                                      "Frames a rung dropped because it fell behind",
                                      labels=["stream"])
        for name, stats in self._node.transcode_stats().items():
            realtime.add_metric([name], float(getattr(stats, "realtime_factor", 0.0) or 0.0))
            frames_in.add_metric([name], float(getattr(stats, "frames_in", 0) or 0))
            dropped.add_metric([name], float(getattr(stats, "frames_dropped", 0) or 0))
        yield realtime
        yield frames_in
        yield dropped
        cache = self._node.cache_stats()
        yield GaugeMetricFamily("livedge_cache_bytes", "Bytes held by the memory tier",
                                value=cache.bytes)
        yield GaugeMetricFamily("livedge_cache_max_bytes", "Byte budget of the memory tier",
                                value=cache.max_bytes)
        yield GaugeMetricFamily("livedge_cache_entries", "Objects held by the memory tier",
                                value=cache.entries)
        yield CounterMetricFamily("livedge_cache_hits", "Memory tier hits", value=cache.hits)
        yield CounterMetricFamily("livedge_cache_misses", "Memory tier misses", value=cache.misses)
        yield CounterMetricFamily("livedge_cache_evictions", "Memory tier evictions",
                                  value=cache.evictions)
        yield from _tier_metrics(cache, getattr(self._node, "redis_stats", lambda: None)(),
                                 getattr(self._node, "replica_stats", lambda: None)())
        publishers = getattr(self._node, "publisher_stats", dict)()
        if publishers:
            bitrate = GaugeMetricFamily("livedge_publisher_bitrate_bits_per_second",
                                        "WebRTC publisher receive bitrate (RTCP)", labels=["stream"])
            fps = GaugeMetricFamily("livedge_publisher_frame_rate",
                                    "WebRTC publisher decoded frames per second", labels=["stream"])
            loss = GaugeMetricFamily("livedge_publisher_packet_loss_ratio",
                                     "WebRTC packets lost over the last interval (0..1)",
                                     labels=["stream", "kind"])
            jitter = GaugeMetricFamily("livedge_publisher_jitter_seconds",
                                       "WebRTC RTP interarrival jitter", labels=["stream", "kind"])
            for stream, stats in publishers.items():
                bitrate.add_metric([stream], stats.bitrate)
                fps.add_metric([stream], max((t.frame_rate for t in stats.tracks
                                              if t.kind == "video"), default=0.0))
                for track in stats.tracks:
                    loss.add_metric([stream, track.kind], track.loss)
                    jitter.add_metric([stream, track.kind], track.jitter)
            yield from (bitrate, fps, loss, jitter)
        fleet = getattr(self._node, "fleet_stats", lambda: None)()
        if fleet is not None:
            yield GaugeMetricFamily("livedge_peers_alive",
                                    "Other fleet members this node's gossip holds alive",
                                    value=fleet["peers_alive"])
            yield CounterMetricFamily("livedge_fleet_upstream_fetches",
                                      "Objects fetched from another edge or the origin",
                                      value=fleet["upstream_fetches"])
            yield CounterMetricFamily("livedge_fleet_served_to_peers",
                                      "Objects served to other edges", value=fleet["served_to_peers"])
        yield from _limit_metrics(getattr(self._node, "limit_stats", lambda: None)())
        hls = self._node.hls_counters()
        yield GaugeMetricFamily("livedge_blocked_requests", "Requests held for a part right now",
                                value=hls.blocked_requests)
        yield CounterMetricFamily("livedge_blocked_requests", "Requests held for a part",
                                  value=hls.blocked_total)
        yield CounterMetricFamily("livedge_blocked_request_timeouts",
                                  "Held requests answered 503 after the spec's timeout",
                                  value=hls.block_timeouts)
        lane = getattr(self._node, "lane_stats", lambda: None)()
        if lane is not None:
            yield GaugeMetricFamily("livedge_http_connections", "Open HTTP connections",
                                    value=lane.connections)
            for name, documentation, field in _LANE_COUNTERS:
                yield CounterMetricFamily(name, documentation, value=getattr(lane, field))
            yield CounterMetricFamily("livedge_http_connections_refused",
                                      "Connections refused over MAX_CONNECTIONS_PER_ADDRESS",
                                      value=lane.connections_refused)


# The fast lane's counters (edge/fastlane.py, ``LaneStats``): metric, help, field.
_LANE_COUNTERS = (
    ("livedge_fast_lane_answers", "HLS requests answered by the fast lane (edge/fastlane.py)",
     "answered"),
    ("livedge_fast_lane_handovers", "Connections the fast lane handed to aiohttp", "handed_over"),
    ("livedge_fast_lane_read_through",
     "Objects the fast lane read through the lower tiers (memory did not hold them)",
     "read_through"),
    ("livedge_fast_lane_repeated_reloads",
     "Blocking reloads matched against their connection's last one instead of parsed",
     "repeated_reloads"),
    ("livedge_fast_lane_repeated_objects",
     "Object requests matched against their connection's last one instead of parsed",
     "repeated_objects"),
    ("livedge_fast_lane_bursts",
     "Wakes of so many parked requests that they are answered holding the GIL, without garbage "
     "collection", "bursts"),
    ("livedge_fast_lane_burst_answers",
     "Answers of bursts sent straight to their sockets by the burst sender (edge/burst.py)",
     "burst_answers"),
    ("livedge_fast_lane_burst_short_sends",
     "Answers of a burst the kernel did not take whole at once (a full socket buffer, an error): "
     "their rest went through the connection's transport", "burst_short_sends"),
)


def _tier_metrics(memory: CacheStats, redis: RedisTierStats | None, replicas: ReplicaStats | None
                  ) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    """Cache tiers (issue 4): hits and misses per tier, Redis traffic, latency, outages, queue."""
    hits = CounterMetricFamily("livedge_tier_hits", "Object lookups answered by a cache tier",
                               labels=["tier"])
    misses = CounterMetricFamily("livedge_tier_misses", "Object lookups a cache tier could not "
                                 "answer", labels=["tier"])
    hits.add_metric(["memory"], memory.hits)
    misses.add_metric(["memory"], memory.misses)
    if redis is not None:
        hits.add_metric(["redis"], redis.hits)
        misses.add_metric(["redis"], redis.misses)
    yield hits
    yield misses
    evictions = CounterMetricFamily("livedge_tier_evictions", "Objects evicted from a tier for "
                                    "room", labels=["tier"])
    evictions.add_metric(["memory"], memory.evictions)
    yield evictions
    if redis is None:
        return
    yield GaugeMetricFamily("livedge_redis_up", "1 while Redis answers, 0 during an outage",
                            value=1 if redis.available else 0)
    yield CounterMetricFamily("livedge_redis_read_bytes", "Object bytes read from Redis",
                              value=redis.read_bytes)
    yield CounterMetricFamily("livedge_redis_written_bytes", "Object bytes written to Redis",
                              value=redis.written_bytes)
    yield CounterMetricFamily("livedge_redis_writes", "Commands written to Redis",
                              value=redis.writes)
    yield CounterMetricFamily("livedge_redis_errors", "Redis operations that failed",
                              value=redis.errors)
    yield CounterMetricFamily("livedge_redis_outages", "Times Redis became unreachable",
                              value=redis.outages)
    latency = GaugeMetricFamily("livedge_redis_latency_seconds",
                                "Redis round trip over recent operations", labels=["quantile"])
    latency.add_metric(["0.5"], redis.latency_p50)
    latency.add_metric(["0.99"], redis.latency_p99)
    yield latency
    yield GaugeMetricFamily("livedge_redis_queue_items", "Writes queued for Redis",
                            value=redis.queued)
    yield GaugeMetricFamily("livedge_redis_queue_bytes", "Media bytes queued for Redis",
                            value=redis.queued_bytes)
    yield CounterMetricFamily("livedge_redis_queue_dropped", "Queued writes dropped: queue full",
                              value=redis.dropped)
    if replicas is not None:
        yield GaugeMetricFamily("livedge_replicas", "Streams followed from Redis",
                                value=replicas.replicas)
        yield CounterMetricFamily("livedge_tier_coalesced_requests",
                                  "Object requests that shared another request's Redis read",
                                  value=replicas.reader.coalesced)
        yield CounterMetricFamily("livedge_tier_negative_hits",
                                  "Object requests answered from the short negative cache",
                                  value=replicas.reader.negative_hits)
        yield CounterMetricFamily("livedge_tier_unavailable",
                                  "Object requests answered 503: only Redis had them, and it was "
                                  "down", value=replicas.reader.unavailable)


def _limit_metrics(limits: LimitStats | None) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    """Per-address limits (edge/limits.py): what they refused, and who is locked out now."""
    if limits is None:
        return
    refusals = CounterMetricFamily("livedge_limit_refusals",
                                   "Requests refused by a per-address limit", labels=["reason"])
    refusals.add_metric(["publish"], limits.publish_refused)
    refusals.add_metric(["auth"], limits.auth_refused)
    refusals.add_metric(["requests"], limits.requests_refused)
    yield refusals
    yield CounterMetricFamily("livedge_limit_lockouts",
                              "Addresses locked out after repeated failed authentications",
                              value=limits.lockouts)
    yield GaugeMetricFamily("livedge_limit_locked_addresses",
                            "Addresses locked out right now", value=limits.locked_addresses)


class Metrics:
    """The node's registry: snapshot collector plus HTTP and event-loop instruments."""

    def __init__(self, node: NodeSnapshots, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(node))
        self.http_requests = Counter("livedge_http_requests", "HTTP requests answered",
                                     ["route", "status"], registry=self.registry)
        self.loop_lag = Gauge("livedge_event_loop_lag_seconds",
                              "How late the event loop ran a timer, last probe",
                              registry=self.registry)
        self.loop_lag_histogram = Histogram(
            "livedge_event_loop_lag", "Event-loop lag per probe, seconds",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry)
        self.worker_restarts = Counter(
            "livedge_http_worker_restarts", "HTTP workers that died and were started again "
            "(a crash loop restarts within seconds: livedge_process_up can miss it)",
            registry=self.registry)
        # Called before each render: counts kept elsewhere (the fast lane's, summed per answer
        # shape rather than taking the counter's lock for every answer) are added in.
        self.before_render: list[Callable[[], None]] = []
        # A main process with HTTP workers: each worker's own exposition, None where it did not
        # answer (edge/workers.py, ``WorkerSupervisor.scrape``).
        self.other_processes: Callable[[], Awaitable[dict[str, bytes | None]]] | None = None
        self._merged: tuple[float, bytes] | None = None  # (when, the node's exposition)
        self._merging: asyncio.Future[bytes] | None = None

    def render(self) -> bytes:
        """This process's exposition."""
        for flush in self.before_render:
            flush()
        return generate_latest(self.registry)

    async def render_node(self) -> bytes:
        """The node's exposition: this process's, merged with its workers' when it has some
        (one merge for concurrent scrapes, reused for ``MERGED_REUSE_SECONDS``)."""
        if self.other_processes is None:
            return self.render()
        if self._merged is not None and self._clock() - self._merged[0] < MERGED_REUSE_SECONDS:
            return self._merged[1]
        if self._merging is None:
            merging = self._merging = asyncio.ensure_future(self._merge(self.other_processes))
            merging.add_done_callback(lambda _: setattr(self, "_merging", None))
        return await asyncio.shield(self._merging)

    async def _merge(self, other_processes: Callable[[], Awaitable[dict[str, bytes | None]]]
                     ) -> bytes:
        own = self.render()
        text = merge_processes({"main": own, **await other_processes()})
        self._merged = (self._clock(), text)
        return text

    async def probe_loop_lag(self, interval: float = 0.25,
                             clock: Callable[[], float] | None = None) -> None:
        """Run forever: sleep ``interval`` and record how much later than asked the loop woke."""
        loop = asyncio.get_running_loop()
        now = clock or loop.time
        while True:
            started = now()
            await asyncio.sleep(interval)
            lag = max(0.0, now() - started - interval)
            self.loop_lag.set(lag)
            self.loop_lag_histogram.observe(lag)


class _Families:
    """What ``generate_latest`` renders: families already collected."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_processes(expositions: dict[str, bytes | None]) -> bytes:
    """One exposition for the processes of a node: every sample gains a ``process`` label (so
    each process's counters reset on their own when it restarts, and ``sum()`` adds them up), and
    ``livedge_process_up`` says which processes answered (None: it did not)."""
    families: dict[tuple[str, str], Metric] = {}
    up = GaugeMetricFamily("livedge_process_up", "1 when this process of the node answered the "
                           "scrape (HTTP workers)", labels=["process"])
    for process, text in expositions.items():
        up.add_metric([process], 0 if text is None else 1)
        if text is None:
            continue
        for family in text_string_to_metric_families(text.decode()):
            # A gauge and a counter may share a name (livedge_blocked_requests): keep both.
            merged = families.get((family.name, family.type))
            if merged is None:
                merged = families[(family.name, family.type)] = Metric(
                    family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(sample._replace(labels={**sample.labels, "process": process})
                                  for sample in family.samples)
    return generate_latest(_Families([*families.values(), up]))  # type: ignore[arg-type]
