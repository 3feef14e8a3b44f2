"""The fast lane's Python per request, without the kernel: CPU microseconds to take in one request.

The serve and waiters benches measure the lane through real sockets, where the kernel's share and
the load generator's noise hide what a change to the lane's own Python does. This bench drives
the real lane of a real node (``--demo``: one 180p rung, built by ``edge.app.build_app`` as the
CLI builds it) through connections whose transport only collects what is written, and times, on
the event loop's thread (``time.thread_time``: the transcoders' threads do not count):

* ``object``: a connection's repeated request for a part memory holds (the serve bench's
  request): intake, match, limits, lookup and the answer's write;
* ``park``: N connections each asking for the part after the newest (a blocking reload, as a
  player's preload hint): intake up to the request being parked;
* ``wake``: the wake that answers those N when the part is made, per request.

The transcoders' threads share the cores, so a round's CPU time varies with what they do meanwhile:
compare the least of many rounds. Run it side by side against the previous version (a
``git worktree`` of it) and compare ratios: the absolute figures depend on the machine.

    .venv/bin/python -m bench.intake [--requests 20000] [--waiters 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from aiohttp import web

from bench.load import node_environment
from bench.loadclient import listed_parts, preload_hint
from bench.ports import free_port
from edge.app import build_app
from edge.config import load_settings
from edge.fastlane import FastLane
from edge.serve import fast_lane

HEADERS = b"Host: bench\r\nUser-Agent: bench\r\n"


class CollectingTransport:
    """What the lane needs of a transport; counts the answers written."""

    def __init__(self, number: int) -> None:
        self.peer = ("127.0.0.1", 10000 + number % 50000)
        self.answers = 0

    def get_extra_info(self, name: str, default=None):
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.answers += 1

    def writelines(self, chunks) -> None:
        self.answers += 1

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def connect(lane: FastLane, number: int):
    connection = lane()
    transport = CollectingTransport(number)
    connection.connection_made(transport)
    return connection, transport


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\n".encode() + HEADERS + b"\r\n"


def playlist(lane: FastLane) -> bytes:
    """The 180p playlist as the lane answers it."""
    connection, transport = connect(lane, 0)
    chunks: list[bytes] = []
    transport.write = chunks.append  # type: ignore[method-assign]
    transport.writelines = chunks.extend  # type: ignore[method-assign]
    connection.data_received(get("/hls/demo/180p/index.m3u8"))
    connection.connection_lost(None)
    return b"".join(chunks)


async def until_hint(lane: FastLane) -> tuple[bytes, tuple[int, int]]:
    for _ in range(300):
        body = playlist(lane)
        hint = preload_hint(body)
        if hint and listed_parts(body):
            return body, hint
        await asyncio.sleep(0.1)
    raise SystemExit("the demo stream did not start")


def object_round(lane: FastLane, body: bytes, requests: int) -> float:
    """CPU microseconds per repeated request for the newest listed part."""
    newest = listed_parts(body)[-1]
    msn, part = newest.msn, newest.index
    connection, transport = connect(lane, 1)
    heads = [get(f"/hls/demo/180p/part{msn}.{p}.m4s") for p in range(part + 1)]
    connection.data_received(heads[-1])  # the template
    started = time.thread_time()
    for number in range(requests):
        connection.data_received(heads[number % len(heads)])
    spent = time.thread_time() - started
    assert transport.answers == requests + 1, transport.answers
    connection.connection_lost(None)
    return spent / requests * 1e6


async def park_and_wake(lane: FastLane, waiters: int) -> tuple[float, float]:
    """CPU microseconds per request to park ``waiters`` reloads (each connection's second: the
    first makes its template), and per request for the wake that answers them."""
    _, (msn, part) = await until_hint(lane)
    connections = [connect(lane, number) for number in range(waiters)]
    # Each connection's first reload (for the hint) is parsed; answered at the next part.
    first = get(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
    for connection, _ in connections:
        connection.data_received(first)
    while lane.stats.parked:
        await asyncio.sleep(0.005)
    _, (msn, part) = await until_hint(lane)
    again = get(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
    wakes: list[float] = []
    real_wake = lane._wake

    def timed_wake(group) -> None:
        started = time.thread_time()
        real_wake(group)
        wakes.append(time.thread_time() - started)

    lane._wake = timed_wake  # type: ignore[method-assign]
    gc.collect()
    started = time.thread_time()
    for connection, _ in connections:
        connection.data_received(again)
    parking = time.thread_time() - started
    parked = lane.stats.parked
    while lane.stats.parked:
        await asyncio.sleep(0.005)
    lane._wake = real_wake  # type: ignore[method-assign]
    for connection, _ in connections:
        connection.connection_lost(None)
    if parked < waiters:
        raise SystemExit(f"only {parked} of {waiters} parked: a part came meanwhile; run again")
    unanswered = sum(transport.answers != 2 for _, transport in connections)
    assert not unanswered, f"{unanswered} of {waiters} connections not answered twice"
    return parking / waiters * 1e6, sum(wakes) / waiters * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--waiters", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    environment = node_environment(LADDER="180p:320x180:250k", SEGMENT_DURATION="2",
                                   PART_DURATION="0.333", WS_PORT=str(free_port()),
                                   LOG_LEVEL="warning")
    settings = load_settings(environment, None, {"demo": True})
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        lane = fast_lane(app, runner, settings)
        objects, parks, wakes = [], [], []
        for _ in range(args.rounds):
            body, _ = await until_hint(lane)
            for _ in range(10):  # short rounds: the least of them is the least disturbed
                objects.append(object_round(lane, body, args.requests // 10))
            park, wake = await park_and_wake(lane, args.waiters)
            parks.append(park)
            wakes.append(wake)
        for label, values in (("object", objects), ("park", parks), ("wake", wakes)):
            print(f"{label:7} least {min(values):6.2f} us/request, median "
                  f"{statistics.median(values):6.2f}, most {max(values):6.2f} ({len(values)} rounds)")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
