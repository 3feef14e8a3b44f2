"""Running a node: listen, then on SIGTERM drain and exit 0; on SIGHUP reload what can change live.

SIGTERM (and SIGINT): the node refuses new publishes and reports not-ready (so load balancers and the
fleet stop sending viewers), lets publishers and blocked requests finish for up to ``drain_seconds``,
then closes every stream (flushing what the cache tiers hold) and exits 0.
SIGHUP: re-reads the configuration and reloads the JWT keys and the log level.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from aiohttp import web

from edge.app import (CORS_HEADERS, HLS, LANE_STATS, METRICS, NODE, PUBLISHING, RELOADED,
                      WORKER_SECRET, reload_settings)
from edge.config import Settings
from edge.fastlane import FastLane, LaneSettings
from edge.limits import LIMITS
from edge.workers import WorkerPlan, WorkerSupervisor, private_listener

log = logging.getLogger("livedge.serve")

DRAIN_POLL_SECONDS = 0.2
# A young collection every this many new container objects (net), not CPython's 700. With
# thousands of blocking reloads parked, each part's requests live one part long: at 700 they were
# promoted and walked again by full collections (70-120 ms pauses at 10,000 waiters); at this many
# most die young. GC time over a 5,000-waiter run: 530-550 ms -> 80-110 ms (bench/README.md).
YOUNG_COLLECTION_THRESHOLD = 50_000


async def serve(app: web.Application, settings: Settings, drain_seconds: float,
                worker_command: tuple[str, ...] = ()) -> None:
    """Serve ``app`` until SIGTERM. ``worker_command`` starts an HTTP worker (edge/workers.py)
    when ``HTTP_WORKERS`` asks for more than one process."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    lane = fast_lane(app, runner, settings)
    loop = asyncio.get_running_loop()
    workers = settings.http_workers - 1 if app[WORKER_SECRET] and worker_command else 0
    shared = workers > 0 or settings.worker_of is not None  # SO_REUSEPORT: one port, N processes
    server = await loop.create_server(lane, settings.host, settings.port, reuse_address=True,
                                      reuse_port=shared or None, backlog=settings.listen_backlog)
    # What start-up built lives as long as the process: out of the collector's sight, a full
    # collection walks only what serving creates (bench.waiters: 100-135 ms pauses at 10,000
    # waiters without this).
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    supervisor: WorkerSupervisor | None = None
    private: asyncio.Server | None = None
    listener = private_listener() if settings.worker_of is not None else None
    if listener is not None:  # a worker: where its main process reads its metrics
        private = await loop.create_server(runner.server, sock=listener)
    if workers:
        # The workers' way in: the peer API and the requests they proxy, on loopback only.
        private = await loop.create_server(runner.server, "127.0.0.1", 0)
        private_port = private.sockets[0].getsockname()[1]
        supervisor = WorkerSupervisor(
            WorkerPlan(workers, worker_command, str(app[WORKER_SECRET])),
            f"http://127.0.0.1:{private_port}", app[METRICS].worker_restarts.inc)
        await supervisor.start()
        app[METRICS].other_processes = supervisor.scrape
        app[RELOADED].append(supervisor.reload)  # SIGHUP or /api/reload: the workers reload too
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _log_problems(reload_settings(app)))
    try:
        await stop.wait()
        log.info("draining: refusing new publishes", extra={"url": f"pid {os.getpid()}"})
        node, publishing = app[NODE], app[PUBLISHING]
        node.draining = True
        deadline = loop.time() + drain_seconds
        while publishing.active_count() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
    finally:
        server.close()
        if supervisor is not None:
            await supervisor.stop()
        if private is not None:
            private.close()
        lane.close()
        await runner.cleanup()
    log.info("stopped")


def fast_lane(app: web.Application, runner: web.AppRunner, settings: Settings) -> FastLane:
    """Every connection's first protocol: hot HLS requests answered there, the rest by ``runner``."""
    requests = app[METRICS].http_requests
    counted: dict[tuple[str, int], object] = {}

    def count(route: str, status: int, answers: int) -> None:
        child = counted.get((route, status))
        if child is None:
            child = counted[(route, status)] = requests.labels(route, str(status))
        child.inc(answers)  # type: ignore[attr-defined]

    lane_settings = LaneSettings(settings.http_read_timeout, settings.max_connections_per_address,
                                 CORS_HEADERS, enabled=settings.fast_lane)
    lane = FastLane(app[HLS], app[LIMITS], lane_settings, runner.server, count, app[LANE_STATS])
    app[METRICS].before_render.append(lane.flush_counts)
    return lane


def _log_problems(problems: list[str]) -> None:
    for problem in problems:
        log.error("reload refused: %s", problem)
