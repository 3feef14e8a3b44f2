"""Running a node: listen, then on SIGTERM drain and exit 0; on SIGHUP reload what can change live.

SIGTERM (and SIGINT): the node refuses new publishes and reports not-ready (so load balancers and the
fleet stop sending viewers), lets publishers and blocked requests finish for up to ``drain_seconds``,
then closes every stream (flushing what the cache tiers hold) and exits 0.
SIGHUP: re-reads the configuration and reloads the JWT keys and the log level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from aiohttp import web

from edge.app import NODE, PUBLISHING, reload_settings
from edge.config import Settings

log = logging.getLogger("livedge.serve")

DRAIN_POLL_SECONDS = 0.2


async def serve(app: web.Application, settings: Settings, drain_seconds: float) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    loop = asyncio.get_running_loop()
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
        await runner.cleanup()
    log.info("stopped")


def _log_problems(problems: list[str]) -> None:
    for problem in problems:
        log.error("reload refused: %s", problem)
