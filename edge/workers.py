"""HTTP workers: more processes serving one node's viewers on the same port (``HTTP_WORKERS``).

A Python process answers from one core. The fast lane (edge/fastlane.py) makes each answer cheap;
workers multiply the cores. The main process ingests, transcodes and packages, and serves like any
node. Each worker is a ``livedge serve`` process in the worker role, bound to the same address with
``SO_REUSEPORT`` (the kernel spreads new connections over the processes): its streams are replicas
of the main process's, followed through the main process's peer API (edge/peer_api.py) on a
private loopback port: the event log is followed (one open answer, a line per batch of events), so
a new part reaches a worker within a few milliseconds, and the worker answers its viewers from its own memory. Everything else a worker is
asked (publishing, the API, pages, metrics, health) is proxied to the main process, which is told
the client's address so that its per-address limits still see clients, not workers.

The main process starts the workers, restarts one that dies (after a second), and stops them at
shutdown. It binds a loopback listener for each worker and hands it over (``WORKER_PRIVATE_FD``):
there it reads the worker's own metrics when it is scraped, one exposition for the node.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
from contextlib import suppress
from dataclasses import dataclass
from typing import Callable

import aiohttp
from aiohttp import web
from yarl import URL

from edge.errors import LivedgeError, Unauthorized
from edge.metrics import CONTENT_TYPE
from edge.peer_api import FLEET_HEADER, FleetCredential, PeerClient

log = logging.getLogger("livedge.workers")

FORWARDED_HEADER = "X-Livedge-Client"  # the client's address, from a worker...
# ...vouched for by the worker's credential. Not the fleet's header: that one is the client's own
# (a fleet peer's), forwarded as it came, so a worker never lends the peer API its credential.
WORKER_HEADER = "X-Livedge-Worker"
WORKER_AUDIENCE = "livedge-worker"  # of the token in WORKER_HEADER: it opens nothing else
VIA = "1.1 livedge-worker"  # on what a worker proxied (RFC 9110 7.6.3)
RESTART_SECONDS = 1.0
STOP_SECONDS = 10.0
PROXY_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=2)  # a worker slower than this counts as down
PRIVATE_FD_ENV = "WORKER_PRIVATE_FD"  # the loopback listener the main process bound for a worker
METRICS_PATH = "/fleet/metrics"  # a worker's own exposition, for its main process only
# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; Host names the worker's own address.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade", "host", "content-length", "server",
                            "date",
                            WORKER_HEADER.lower(), FORWARDED_HEADER.lower()})


def new_worker_secret() -> str:
    return secrets.token_hex(32)


# -- the worker's side ---------------------------------------------------------------------------
class MainProcessLink(PeerClient):
    """A worker's link to its main process: the one source of every stream (``PeerLinks``)."""

    def __init__(self, main_url: str, secret: str) -> None:
        self.main_url = main_url.rstrip("/")
        self.credential = FleetCredential(secret.encode(), f"worker-{os.getpid()}")
        self._vouching = FleetCredential(secret.encode(), f"worker-{os.getpid()}",
                                         WORKER_AUDIENCE)
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Followed logs and object reads at once: more connections than aiohttp's default 100.
        # Bytes are proxied as they come (no decompression), so their length holds.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30, sock_connect=2),
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def event_sources(self, stream: str) -> list[str]:
        return [self.main_url]

    async def fetch_object(self, key: str) -> bytes | None:
        assert self._http is not None
        try:
            async with self._http.get(f"{self.main_url}/fleet/objects/{key}",
                                      headers=self._headers()) as response:
                return await response.read() if response.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("object read from the main process failed: %s", error)
            return None

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Forward a request the worker does not serve to the main process."""
        assert self._http is not None
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() not in _NOT_FORWARDED}
        headers[WORKER_HEADER] = self._vouching.token()
        headers[FORWARDED_HEADER] = request.remote or ""
        # The body streams through (the main process applies its own size limits and deadlines;
        # buffered here, a slow one held a worker's memory with none), and the path goes as the
        # client encoded it: decoded, %2F or %3F would route differently there.
        body = request.content if request.body_exists else None
        try:
            async with self._http.request(request.method,
                                          URL(f"{self.main_url}{request.raw_path}", encoded=True),
                                          headers=headers, data=body, allow_redirects=False,
                                          timeout=PROXY_TIMEOUT) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _NOT_FORWARDED:
                        response.headers.add(name, value)
                response.headers.add("Via", VIA)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(65536):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("proxy to the main process failed: %s", error)
            return web.json_response({"message": "the node's main process is not answering"},
                                     status=502)

    def add_to(self, app: web.Application, render_metrics: Callable[[], bytes]) -> None:
        """The worker's metrics for its main process; then, last, every route the worker has not
        registered goes to the main process."""

        async def metrics(request: web.Request) -> web.Response:
            self.credential.verify(request)
            return web.Response(body=render_metrics(),
                                headers={"Content-Type": CONTENT_TYPE})

        app.router.add_get(METRICS_PATH, metrics)
        app.router.add_route("*", "/{tail:.*}", self.proxy)


def private_listener() -> socket.socket | None:
    """In a worker: the loopback listener its main process bound for it, if any."""
    fd = os.environ.get(PRIVATE_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


def _die_with_parent() -> None:
    """In a worker before exec: SIGTERM when the main process dies, even by kill -9 (Linux)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- the main process's side -----------------------------------------------------------------------
def forwarded_client_middleware(secret: str):
    """On the main process: a request proxied by a worker (its credential verifies) is seen with
    the client's address, so per-address limits and logs see clients, not workers. Outermost."""
    credential = FleetCredential(secret.encode(), "main", WORKER_AUDIENCE)

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        client = request.headers.get(FORWARDED_HEADER)
        if client is not None:
            try:
                credential.verify(request, WORKER_HEADER)
            except Unauthorized as error:
                return web.json_response(error.to_json(), status=error.status)
            request = request.clone(remote=client)
        return await handler(request)

    return middleware


@dataclass(frozen=True)
class WorkerPlan:
    """How the main process starts its workers."""

    count: int  # extra processes (HTTP_WORKERS - 1)
    command: tuple[str, ...]  # ``livedge serve`` with the main process's address and config
    secret: str


class WorkerSupervisor:
    """Starts the workers, restarts those that die, stops them at shutdown. Ends only processes
    it started, by their PID."""

    def __init__(self, plan: WorkerPlan, main_url: str,
                 on_restart: Callable[[], None] = lambda: None) -> None:
        self._plan = plan
        self._on_restart = on_restart  # a worker died and is about to be started again
        # HTTP_WORKERS stays as the node has it (a worker's share of per-node budgets divides
        # by it, edge/limits.py); WORKER_OF is what keeps a worker from starting workers.
        self._env = {**os.environ, "WORKER_OF": main_url, "WORKER_SECRET": plan.secret}
        self._processes: list[asyncio.subprocess.Process | None] = [None] * plan.count
        # One per worker, bound here so that the address stays the same across restarts.
        self._listeners: list[socket.socket] = []
        self._credential = FleetCredential(plan.secret.encode(), "main")
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    async def start(self) -> None:
        for _ in range(self._plan.count):
            listener = socket.create_server(("127.0.0.1", 0))
            listener.setblocking(False)
            self._listeners.append(listener)
        self._http = aiohttp.ClientSession(timeout=SCRAPE_TIMEOUT)
        self._tasks = [asyncio.create_task(self._keep(index), name=f"http-worker-{index}")
                       for index in range(self._plan.count)]

    async def _keep(self, index: int) -> None:
        listener = self._listeners[index].fileno()
        env = {**self._env, PRIVATE_FD_ENV: str(listener)}
        while not self._stopping:
            process = await asyncio.create_subprocess_exec(
                *self._plan.command, env=env, stdin=subprocess.DEVNULL, pass_fds=(listener,),
                preexec_fn=_die_with_parent)
            self._processes[index] = process
            log.info("http worker started", extra={"url": f"pid {process.pid}"})
            code = await process.wait()
            if self._stopping:
                return
            self._on_restart()
            log.error("http worker exited with %s: restarting", code,
                      extra={"url": f"pid {process.pid}"})
            await asyncio.sleep(RESTART_SECONDS)

    def reload(self) -> None:
        """Have every worker reload what can change live (its own SIGHUP handler)."""
        for process in self._processes:
            if process is not None and process.returncode is None:
                with suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p is not None and p.returncode is None]

    async def scrape(self) -> dict[str, bytes | None]:
        """Each worker's own exposition (``worker-1``...), None for one that did not answer."""
        names = [f"worker-{index + 1}" for index in range(len(self._listeners))]
        texts = await asyncio.gather(*(self._scrape_one(index) for index in range(len(names))))
        return dict(zip(names, texts))

    async def _scrape_one(self, index: int) -> bytes | None:
        process = self._processes[index]
        if self._http is None or process is None or process.returncode is not None:
            return None
        port = self._listeners[index].getsockname()[1]
        try:
            async with self._http.get(f"http://127.0.0.1:{port}{METRICS_PATH}",
                                      headers={FLEET_HEADER: self._credential.token()}) as answer:
                return await answer.read() if answer.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("metrics of http worker %d unreadable: %s", index + 1, error)
            return None

    async def stop(self) -> None:
        self._stopping = True
        running = [p for p in self._processes if p is not None and p.returncode is None]
        for process in running:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), STOP_SECONDS)
            except asyncio.TimeoutError:
                with suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError, LivedgeError):
                await task
        if self._http is not None:
            await self._http.close()
        for listener in self._listeners:
            listener.close()
