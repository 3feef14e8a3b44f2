"""Metrics (edge/metrics.py) read from snapshots at scrape time: the per-address limit families, and
one scrape for the processes of a node with HTTP workers.

The snapshots are real objects (a memory cache, HLS counters, ``AddressLimits`` with a clock the
test moves by hand); the exposition text is parsed back with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from edge.cache import MemoryCache
from edge.hls import HlsCounters
from edge.limits import AddressLimits, LimitSettings
from edge.metrics import Metrics, merge_processes
from tests.conftest import Clock


class Snapshots:
    """What edge/app.py hands the collector, minus the optional parts."""

    def __init__(self) -> None:
        self.cache = MemoryCache(1024 * 1024)
        self.counters = HlsCounters()

    def stream_stats(self):
        return []

    def transcode_stats(self):
        return {}

    def cache_stats(self):
        return self.cache.stats()

    def hls_counters(self):
        return self.counters


class SnapshotsWithLimits(Snapshots):
    def __init__(self, limits: AddressLimits | None) -> None:
        super().__init__()
        self.limits = limits

    def limit_stats(self):
        return self.limits.stats() if self.limits else None


def scrape(snapshots) -> dict[str, float]:
    """Every sample of one scrape, keyed ``name{label="value",...}``."""
    text = Metrics(snapshots).render().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_limit_refusals_lockouts_and_locked_addresses_are_exported():
    clock = Clock()
    limits = AddressLimits(LimitSettings(publish_rate=1, publish_burst=2, auth_failure_limit=2,
                                         auth_failure_window=10, auth_lockout=30,
                                         max_requests_per_address=1), clock)
    snapshots = SnapshotsWithLimits(limits)
    before = scrape(snapshots)
    assert before['livedge_limit_refusals_total{reason="publish"}'] == 0
    assert before["livedge_limit_lockouts_total"] == 0
    assert before["livedge_limit_locked_addresses"] == 0

    assert [limits.admit_publish("a") is None for _ in range(4)] == [True, True, False, False]
    for address in ("b", "c"):  # two addresses fail twice: two lockouts
        limits.auth_failed(address)
        limits.auth_failed(address)
    assert limits.check_auth("b") is not None
    assert limits.enter("d") is None and limits.enter("d") is not None
    during = scrape(snapshots)
    assert during['livedge_limit_refusals_total{reason="publish"}'] == 2
    assert during['livedge_limit_refusals_total{reason="auth"}'] == 1
    assert during['livedge_limit_refusals_total{reason="requests"}'] == 1
    assert during["livedge_limit_lockouts_total"] == 2
    assert during["livedge_limit_locked_addresses"] == 2

    clock.now += 31  # the lockouts are over; the counters stay
    after = scrape(snapshots)
    assert after["livedge_limit_locked_addresses"] == 0
    assert after["livedge_limit_lockouts_total"] == 2
    assert after['livedge_limit_refusals_total{reason="auth"}'] == 1


def test_snapshots_without_limits_export_no_limit_families():
    for snapshots in (Snapshots(), SnapshotsWithLimits(None)):  # not wired yet; wired, no limits
        samples = scrape(snapshots)
        assert "livedge_cache_bytes" in samples  # the rest of the scrape is unaffected
        assert not [name for name in samples if name.startswith("livedge_limit_")]


def test_a_scrape_of_several_processes_labels_each_sample_with_its_process():
    main, worker = Snapshots(), Snapshots()
    main.counters.blocked_requests, worker.counters.blocked_requests = 3, 5
    worker.counters.blocked_total = 7
    worker_metrics = Metrics(worker)
    worker_metrics.http_requests.labels("playlist", "200").inc(11)
    text = merge_processes({"main": Metrics(main).render(), "worker-1": worker_metrics.render(),
                            "worker-2": None}).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("livedge_blocked_requests", (("process", "main"),))] == 3
    assert samples[("livedge_blocked_requests", (("process", "worker-1"),))] == 5
    # The gauge and the counter of the same name both survive the merge.
    assert samples[("livedge_blocked_requests_total", (("process", "worker-1"),))] == 7
    assert samples[("livedge_http_requests_total", (("process", "worker-1"),
                                                    ("route", "playlist"),
                                                    ("status", "200")))] == 11
    assert samples[("livedge_process_up", (("process", "main"),))] == 1
    assert samples[("livedge_process_up", (("process", "worker-1"),))] == 1
    assert samples[("livedge_process_up", (("process", "worker-2"),))] == 0
    assert not [key for key in samples if key[0] != "livedge_process_up"
                and dict(key[1]).get("process") == "worker-2"]
    assert text.count("# TYPE livedge_cache_bytes gauge") == 1  # one family, two processes


async def test_concurrent_scrapes_of_a_node_with_workers_share_one_merge():
    clock = Clock()
    metrics = Metrics(Snapshots(), clock)
    worker = Metrics(Snapshots())
    reads = []

    async def other_processes():
        reads.append(clock.now)
        await asyncio.sleep(0.05)  # the workers' answers take a while
        return {"worker-1": worker.render()}

    metrics.other_processes = other_processes
    texts = await asyncio.gather(*(metrics.render_node() for _ in range(20)))
    assert len(reads) == 1 and len(set(texts)) == 1
    assert b'process="worker-1"' in texts[0]
    assert await metrics.render_node() == texts[0] and len(reads) == 1  # reused for a second
    clock.now += 1.5
    await metrics.render_node()
    assert len(reads) == 2
