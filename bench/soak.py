"""Soak: one node under publish and viewer churn, through a Redis restart and a peer restart.

Processes, all ours, all on 127.0.0.1, stopped by PID: a ``redis-server`` (no persistence), node A
(``livedge serve --demo`` with ``REDIS_URL`` and gossip: the node under test) and node B (same
fleet, same Redis, no stream of its own: it serves A's streams to its viewers).

In this process, on one event loop:
- steady viewers follow every rendition of A's demo stream for the whole run (``bench.loadclient``
  followers: blocking reloads, every new part fetched) and a few follow it through B;
- publisher churn: WebSocket publishers (MPEG-TS made by PyAV, paced in real time) publish to A
  under a few stream names for a few seconds each and leave; some come back within the grace
  period (the playlists continue after a discontinuity), some after it (new playlists);
- viewer churn: short-lived followers of the demo and of the churned streams;
- once, Redis is killed (SIGKILL) and started again, empty, on the same port;
- once, node B is killed (SIGKILL) and started again on the same ports.

The run is a sequence of cycles: churn, then a quiet phase (churn stopped, publishers' grace and
the window of their ended playlists run out) that ends with a sample of node A: resident memory,
file descriptors and threads from /proc, live streams and held requests from /metrics.

What must hold (``SoakReport.problems``):
- the steady viewers of A (a stream live all along) saw no error, no non-200 answer (so no 5xx)
  and no break in the media sequence (segments numbered consecutively; the newest never goes back;
  the window never slides past a segment they had not seen);
- the churn viewers saw no break in the media sequence either (5xx are allowed there: a reload
  blocked on a stream whose publisher left is answered 503 after three target durations);
- node A's resident memory grew less than 5 % between the last two quiet samples and less than
  10 % from the first quiet sample after warm-up to the last; its file descriptors and threads at
  the last quiet sample are no more than at the first one after warm-up (plus a small allowance
  for connections being closed);
- Redis and node B came back, and node B serves the demo again.

    .venv/bin/python -m bench.soak --minutes 30            # the long run
    .venv/bin/python -m bench.soak --minutes 2 --cycle 30  # what tests/test_soak.py runs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bench.load import BENCH_SECRET, NodeProcess, http_get, launch_node, wait_for_stream
from bench.loadclient import FollowSettings, ViewerStats, follow
from bench.ports import free_port
from edge.tokens import Scope, issue_token
from tests.redis_server import RedisServer, redis_server

SOAK_LADDER = "360p:640x360:700k,180p:320x180:250k"
CHUNK = 32 * 1024  # bytes per WebSocket message
PUBLISH_GRACE = 2.0  # seconds a publisher may be away and continue its playlists
SEGMENT = 1.0
WINDOW_SEGMENTS = 4


# -- our own redis-server (the test suite's: a free 127.0.0.1 port, no persistence, stop = SIGKILL)
RedisProcess = RedisServer
redis_process = redis_server


# -- a fleet on 127.0.0.1 --------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetMember:
    """Ports and names of one node of a loopback fleet, fixed so it can be restarted as itself."""

    name: str
    http_port: int
    ws_port: int
    gossip_port: int

    def environment(self, seed: FleetMember, key: str, **extra: str) -> dict[str, str]:
        return {"NODE_NAME": self.name, "GOSSIP_BIND": f"127.0.0.1:{self.gossip_port}",
                "SEEDS": f"127.0.0.1:{seed.gossip_port}", "GOSSIP_KEYS": key,
                "ADVERTISE_URL": f"http://127.0.0.1:{self.http_port}",
                "WS_PORT": str(self.ws_port), **extra}

    def launch(self, workdir: Path, seed: FleetMember, key: str, *args: str,
               **extra: str) -> NodeProcess:
        return launch_node(workdir / self.name, *args, port=self.http_port,
                           **self.environment(seed, key, **extra))


def new_member(name: str) -> FleetMember:
    return FleetMember(name, free_port(), free_port(), free_port())


def gossip_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# -- publishers ------------------------------------------------------------------------------------
def encode_ts(seconds: float, size: tuple[int, int] = (320, 180), rate: int = 30,
              sizes: tuple[tuple[float, tuple[int, int]], ...] = ()) -> bytes:
    """``seconds`` of lavfi testsrc2 and a 440 Hz tone as H.264/AAC in MPEG-TS. ``sizes``: from
    each (start second, size), the picture is that size instead (a publisher that changes
    resolution mid-stream: a new SPS in band, timestamps continuous)."""
    import av
    from fractions import Fraction
    changes = sorted(sizes)
    largest = max([size] + [s for _, s in changes], key=lambda s: s[0] * s[1])
    graph = (f"testsrc2=size={largest[0]}x{largest[1]}:rate={rate}[out0];"
             "sine=frequency=440:sample_rate=48000[out1]")
    frame_time = Fraction(1, rate)
    buffer = io.BytesIO()
    with av.open(graph, format="lavfi") as source, \
            av.open(buffer, "w", format="mpegts") as target:
        video = target.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = target.add_stream("aac", rate=48_000)
        encoders: dict[tuple[int, int], av.CodecContext] = {}  # the current size's only

        def encoder_for(wanted: tuple[int, int]) -> av.CodecContext:
            if wanted not in encoders:
                for previous in encoders.values():  # its last frames go before the new size's
                    mux(previous.encode(None))
                encoders.clear()
                encoder = av.CodecContext.create("libx264", "w")
                encoder.width, encoder.height, encoder.pix_fmt = wanted[0], wanted[1], "yuv420p"
                encoder.time_base, encoder.framerate = frame_time, Fraction(rate)
                encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(rate)}
                encoders[wanted] = encoder
            return encoders[wanted]

        def mux(packets) -> None:
            for packet in packets:
                packet.stream = video
                packet.time_base = frame_time
                target.mux(packet)

        finished: set[str] = set()
        index = 0
        for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
            if frame.time >= seconds:
                finished.add("video" if isinstance(frame, av.VideoFrame) else "audio")
                if len(finished) == 2:
                    break
                continue
            if not isinstance(frame, av.VideoFrame):
                target.mux(audio.encode(frame))
                continue
            wanted = next((s for start, s in reversed(changes) if frame.time >= start), size)
            picture = frame.reformat(width=wanted[0], height=wanted[1], format="yuv420p")
            picture.pts, picture.time_base = index, frame_time
            index += 1
            mux(encoder_for(wanted).encode(picture))
        for encoder in encoders.values():
            mux(encoder.encode(None))
        target.mux(audio.encode(None))
    return buffer.getvalue()


def publish_token(stream: str = "*", ttl: float = 86400) -> str:
    return issue_token(BENCH_SECRET, "HS256", Scope.PUBLISH, stream, ttl, "soak")


async def publish_ws(ws_url: str, stream: str, data: bytes, seconds: float,
                     send_seconds: float | None = None, token: str | None = None) -> str:
    """Publish the first ``send_seconds`` (all by default) of ``data`` (``seconds`` of media) to
    ``ws_url``'s ingest as stream ``stream``, paced in real time, then close. Returns "ok", or why
    the node refused or ended the session (a close reason or an HTTP status)."""
    token = token or publish_token()
    end = len(data) if send_seconds is None else int(len(data) * min(1.0, send_seconds / seconds))
    try:
        async with connect(f"{ws_url}/ingest/{stream}", open_timeout=5, close_timeout=2,
                           additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            started = time.monotonic()
            for offset in range(0, end, CHUNK):
                delay = started + seconds * offset / len(data) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(data[offset:min(end, offset + CHUNK)])
    except InvalidStatus as refused:
        return f"HTTP {refused.response.status_code}"
    except ConnectionClosed as closed:
        return f"closed {closed.rcvd.code if closed.rcvd else '-'}: " \
               f"{closed.rcvd.reason if closed.rcvd else closed}"
    except (OSError, InvalidHandshake, TimeoutError) as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


# -- the run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakSettings:
    duration: float = 120.0  # seconds
    cycle: float = 30.0  # seconds: churn, then a quiet phase, then a sample
    quiet: float = 8.0  # seconds at the end of each cycle with no churn
    steady_per_rendition: int = 2  # viewers of each demo rendition on node A
    peer_viewers: int = 2  # viewers of the demo through node B
    churn_streams: int = 2  # stream names publishers churn over
    max_rss_growth: float = 0.05  # between the last two quiet samples
    max_late_rss_growth: float = 0.10  # from the first quiet sample after warm-up to the last
    fd_allowance: int = 4  # connections the node may still be closing at a sample
    thread_allowance: int = 2


@dataclass(frozen=True)
class NodeSample:
    at: float  # seconds since the start of the run
    rss: int
    fds: int
    threads: int
    streams_live: float | None
    blocked_requests: float | None
    cache_bytes: float | None


@dataclass
class SoakReport:
    settings: SoakSettings
    samples: list[NodeSample] = field(default_factory=list)
    steady: ViewerStats = field(default_factory=ViewerStats)
    peer: ViewerStats = field(default_factory=ViewerStats)
    churn: ViewerStats = field(default_factory=ViewerStats)
    publishes: dict[str, int] = field(default_factory=dict)  # outcome -> count
    events: list[str] = field(default_factory=list)
    redis_back_after: float | None = None  # seconds from restart to node A writing again
    peer_back_after: float | None = None  # seconds from restart to node B serving the demo
    node_alive: bool = True
    steady_followers: int = 0

    def problems(self) -> list[str]:
        found = []
        steady = self.steady
        if steady.errors or steady.statuses:
            found.append(f"steady viewers of node A: errors {steady.errors}, "
                         f"non-200 answers {steady.statuses}")
        for name, stats in (("steady", steady), ("churn", self.churn)):
            if stats.sequence_problems:
                found.append(f"{name} viewers saw breaks in the media sequence: "
                             f"{stats.sequence_problems[:5]}")
        minimum_parts = 0.5 * self.settings.duration / 0.25 * self.steady_followers
        if steady.parts < minimum_parts:
            found.append(f"steady viewers fetched only {steady.parts} parts "
                         f"(expected at least {minimum_parts:.0f})")
        if self.churn.parts == 0:
            found.append("churn viewers fetched no part: the churned streams never played")
        if not self.publishes.get("ok"):
            found.append(f"no publish went through: {self.publishes}")
        if not self.node_alive:
            found.append("node A died")
        if self.redis_back_after is None:
            found.append("node A did not write to Redis again after its restart")
        if self.peer_back_after is None:
            found.append("node B did not serve the demo again after its restart")
        late = self.samples[1:]  # the first quiet sample is the warm-up
        if len(late) >= 2:
            before, last = late[-2], late[-1]
            if last.rss > before.rss * (1 + self.settings.max_rss_growth):
                found.append(f"resident memory grew {last.rss / before.rss - 1:.1%} between the "
                             f"last two quiet samples ({before.rss >> 20} -> {last.rss >> 20} MiB)")
            if last.rss > late[0].rss * (1 + self.settings.max_late_rss_growth):
                found.append(f"resident memory grew {last.rss / late[0].rss - 1:.1%} after "
                             f"warm-up ({late[0].rss >> 20} -> {last.rss >> 20} MiB)")
            if last.fds > late[0].fds + self.settings.fd_allowance:
                found.append(f"file descriptors grew from {late[0].fds} to {last.fds}")
            if last.threads > late[0].threads + self.settings.thread_allowance:
                found.append(f"threads grew from {late[0].threads} to {last.threads}")
        else:
            found.append(f"only {len(self.samples)} quiet samples: run longer than 3 cycles")
        return found

    def summary(self) -> str:
        lines = ["| t | RSS | fds | threads | streams live | held requests | memory tier |",
                 "|---|---|---|---|---|---|---|"]
        for s in self.samples:
            cache = f"{s.cache_bytes / 2**20:.1f} MiB" if s.cache_bytes is not None else "-"
            lines.append(f"| {s.at:.0f} s | {s.rss / 2**20:.1f} MiB | {s.fds} | {s.threads} | "
                         f"{s.streams_live:.0f} | {s.blocked_requests:.0f} | {cache} |")
        lines.append("")
        for name, stats in (("steady", self.steady), ("peer", self.peer), ("churn", self.churn)):
            lines.append(f"{name} viewers: {stats.playlists} playlists, {stats.parts} parts, "
                         f"errors {stats.errors}, non-200 {stats.statuses}, "
                         f"sequence problems {len(stats.sequence_problems)}")
        lines.append(f"publishes: {self.publishes}")
        lines.append(f"redis back after {self.redis_back_after} s, peer back after "
                     f"{self.peer_back_after} s")
        lines += [f"event: {event}" for event in self.events]
        return "\n".join(lines)


def _metric(text: str, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


async def sample_node(node: NodeProcess, started: float) -> NodeSample:
    process = node.sample()
    status, body = await asyncio.to_thread(http_get, node.url + "/metrics")
    text = body.decode(errors="replace") if status == 200 else ""
    return NodeSample(time.monotonic() - started, process.rss, process.fds, process.threads,
                      _metric(text, "livedge_streams_live"),
                      _metric(text, "livedge_blocked_requests"),
                      _metric(text, "livedge_cache_bytes"))


async def _redis_writing(node: NodeProcess, timeout: float) -> float | None:
    """Seconds until node A's /readyz says its Redis tier is available again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status, body = await asyncio.to_thread(http_get, node.url + "/readyz")
        if status == 200 and json.loads(body).get("redis", {}).get("available"):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    return None


async def _serves_demo(url: str, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status, body = await asyncio.to_thread(http_get, url + "/hls/demo/180p/index.m3u8")
        if status == 200 and b"#EXT-X-PART:" in body:
            return time.monotonic() - started
        await asyncio.sleep(0.3)
    return None


async def _publisher_churn(ws_url: str, names: list[str], data: bytes, seconds: float,
                           until: float, outcomes: dict[str, int], rng: random.Random) -> None:
    """One publisher going round ``names``: publishes a few seconds, pauses (shorter or longer than
    the grace period), repeats, until ``until`` (monotonic)."""
    while time.monotonic() < until - 3:
        stream = rng.choice(names)
        send = min(rng.uniform(2.5, 6.0), until - time.monotonic())
        outcome = await publish_ws(ws_url, stream, data, seconds, send_seconds=send)
        key = "ok" if outcome == "ok" else re.sub(r"\d+(\.\d+)?", "N", outcome)[:80]
        outcomes[key] = outcomes.get(key, 0) + 1
        await asyncio.sleep(rng.choice((0.3, 1.0, PUBLISH_GRACE + 1.5)))


async def _viewer_churn(host: str, port: int, playlists: list[str], until: float,
                        stats: ViewerStats, rng: random.Random) -> None:
    """Short-lived followers joining about twice a second, until ``until`` (monotonic)."""
    tasks: list[asyncio.Task] = []
    while time.monotonic() < until - 2:
        stay = rng.uniform(1.5, min(8.0, max(1.5, until - time.monotonic() - 1)))
        settings = FollowSettings(host, port, 0.0, time.time() + stay)
        tasks.append(asyncio.create_task(follow(rng.choice(playlists), settings, stats)))
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        tasks = [task for task in tasks if not task.done()]
    await asyncio.gather(*tasks)


async def run_soak(settings: SoakSettings, workdir: Path, seed: int = 1,
                   log=lambda line: print(line, file=sys.stderr)) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport(settings)
    key = gossip_key()
    a, b = new_member("edge-a"), new_member("edge-b")
    common = {"SEGMENT_DURATION": str(SEGMENT), "PART_DURATION": "0.25", "LADDER": SOAK_LADDER,
              "WINDOW_SEGMENTS": str(WINDOW_SEGMENTS), "PUBLISH_GRACE": str(PUBLISH_GRACE),
              "CACHE_MEMORY": "8MiB"}  # full within the first cycle
    data = await asyncio.to_thread(encode_ts, 10.0)
    names = [f"churn-{i}" for i in range(settings.churn_streams)]
    cycles = max(1, round(settings.duration / settings.cycle))
    redis_cycle, peer_cycle = min(1, cycles - 1), min(2, cycles - 1)
    with redis_process(workdir / "redis") as redis:
        node_a = a.launch(workdir, a, key, "--demo", REDIS_URL=redis.url, **common)
        node_b = None
        try:
            node_b = b.launch(workdir, a, key, REDIS_URL=redis.url, **common)
            renditions = await asyncio.to_thread(wait_for_stream, node_a.url, "demo")
            if await _serves_demo(node_b.url, 30) is None:
                raise RuntimeError("node B does not serve the demo")
            started = time.monotonic()
            end_wall = time.time() + settings.duration + 5
            steady = [asyncio.create_task(follow(f"demo/{r}", FollowSettings(
                "127.0.0.1", a.http_port, 0.0, end_wall), report.steady))
                for r in renditions for _ in range(settings.steady_per_rendition)]
            report.steady_followers = len(steady)
            peers = [asyncio.create_task(follow("demo/180p", FollowSettings(
                "127.0.0.1", b.http_port, 0.0, end_wall), report.peer))
                for _ in range(settings.peer_viewers)]
            churn_playlists = [f"demo/{r}" for r in renditions] + \
                [f"{name}/{r}" for name in names for r in ("180p", "audio")]
            for cycle in range(cycles):
                cycle_start = time.monotonic()
                churn_until = cycle_start + settings.cycle - settings.quiet
                churners = [asyncio.create_task(_publisher_churn(
                    node_a.ws_url, names, data, 10.0, churn_until,
                    report.publishes, random.Random(rng.random()))) for _ in names]
                churners.append(asyncio.create_task(_viewer_churn(
                    "127.0.0.1", a.http_port, churn_playlists, churn_until, report.churn,
                    random.Random(rng.random()))))
                if cycle == redis_cycle:
                    await asyncio.sleep(3)
                    redis.stop()
                    report.events.append(f"{time.monotonic() - started:.0f} s: redis killed")
                    await asyncio.sleep(3)
                    await asyncio.to_thread(redis.start)
                    report.events.append(f"{time.monotonic() - started:.0f} s: redis started")
                    report.redis_back_after = await _redis_writing(node_a, 20)
                if cycle == peer_cycle:
                    await asyncio.sleep(3)
                    node_b.kill()
                    report.events.append(f"{time.monotonic() - started:.0f} s: node B killed")
                    await asyncio.sleep(3)
                    node_b = await asyncio.to_thread(b.launch, workdir, a, key,
                                                     REDIS_URL=redis.url, **common)
                    report.events.append(f"{time.monotonic() - started:.0f} s: node B started")
                    report.peer_back_after = await _serves_demo(node_b.url, 30)
                await asyncio.gather(*churners)
                await asyncio.sleep(max(0.0, cycle_start + settings.cycle - time.monotonic()))
                report.samples.append(await sample_node(node_a, started))
                log(f"cycle {cycle + 1}/{cycles}: {report.samples[-1]}")
                if not node_a.alive():
                    break
            await asyncio.gather(*steady, *peers)
            report.node_alive = node_a.alive()
        finally:
            if node_b is not None:
                node_b.stop()
            node_a.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--cycle", type=float, default=60.0, help="seconds per churn cycle")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    settings = SoakSettings(duration=args.minutes * 60, cycle=args.cycle)
    with tempfile.TemporaryDirectory(prefix="livedge-soak-") as scratch:
        report = asyncio.run(run_soak(settings, Path(scratch), args.seed))
    print(report.summary())
    problems = report.problems()
    print("\n".join(["", "problems:"] + problems) if problems else "\nno problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
