"""Serving cached objects: a livedge reading node against nginx serving the same bytes (/dev/shm).

One run, one machine, one load generator (``wrk``, keep-alive, 2 threads, 64 connections):
- nginx: 2 workers, ``sendfile``, the objects as files in /dev/shm (the PERF-NOTES reference);
- the anchor (``bench.anchor``): one Python process, uvloop, a bare ``asyncio.Protocol`` writing
  the same bytes held in memory: the least Python can do per request, on this machine;
- livedge, memory tier: a node that did not produce the stream replicates it through Redis
  (``edge.replica``); after the first request every object is a memory-tier hit;
- livedge, Redis tier: the same node with a 1 MiB memory tier, and wrk cycling over every part
  (2.4 MB) or segment (2.4 MB), so most requests are a memory miss and a Redis GET.

The stream is synthetic: the bench writes it into its own redis-server through ``RedisTier`` (one
rendition, 4 segments of 20 parts: parts of 30 KB, segments of 600 KB), then starts the livedge node
(``livedge serve``, uvloop when installed) and nginx on free 127.0.0.1 ports, and stops them by PID.
Needs ``redis-server``, ``nginx`` (Debian ``nginx-light``) and ``wrk`` on the PATH.

    .venv/bin/python -m bench.serve --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from fractions import Fraction
from pathlib import Path

import av

from bench.load import wait_for_workers
from bench.ports import free_port
from edge.redis_tier import RedisConfig, RedisTier, connect
from ingest.media import VIDEO_TIMESCALE, TrackInfo, TrackKind
from origin.live import TrackDeclared
from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.window import LiveSettings, object_key

PART_BYTES = 30_000
PARTS_PER_SEGMENT = 20
SEGMENTS = 4
STREAM = "bench"
RENDITION = "v"
# 10 s segments of 0.5 s parts: 20 parts a segment, and objects live long in Redis during the run.
WINDOW = LiveSettings(segment_duration=10.0, part_duration=0.5, window_segments=6)



def h264_config() -> bytes:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 640, 360, "yuv420p"
    encoder.time_base = Fraction(1, VIDEO_TIMESCALE)
    encoder.flags |= av.codec.context.Flags.global_header
    encoder.open()
    return bytes(encoder.extradata)


def objects() -> tuple[dict[str, bytes], list]:
    """Object name -> bytes, and the window events that list them."""
    track = TrackInfo(RENDITION, TrackKind.VIDEO, "h264", VIDEO_TIMESCALE, h264_config(),
                      2_400_000, width=640, height=360, frame_rate=30.0)
    named: dict[str, bytes] = {"init.mp4": b"\0" * 800}
    events: list = [TrackDeclared(track, named["init.mp4"])]
    for msn in range(SEGMENTS):
        events.append(SegmentOpened(RENDITION, msn, time.time() - 40 + msn * 10, False))
        parts = []
        for index in range(PARTS_PER_SEGMENT):
            data = os.urandom(PART_BYTES)
            parts.append(data)
            named[f"part{msn}.{index}.m4s"] = data
            events.append(PartReady(RENDITION, msn, index, 0.5, index == 0, data))
        segment = b"".join(parts)
        named[f"seg{msn}.m4s"] = segment
        events.append(SegmentReady(RENDITION, msn, 10.0, PARTS_PER_SEGMENT, len(segment),
                                   segment))
    return named, events


async def publish(redis_url: str, named: dict[str, bytes], events: list) -> None:
    """Write the stream as a producing node would, with long TTLs for the run."""
    tier = RedisTier(connect(RedisConfig(redis_url)), WINDOW, "bench")
    await tier.start()
    for event in events:
        tier.on_window_event(STREAM, event)
    await tier.wait_drained()
    for name, data in named.items():
        await tier.set(object_key(STREAM, RENDITION, name), data, ttl=3600)
    await tier.close()


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                response.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wrk(urls: list[str], seconds: float, work: Path) -> tuple[float, float]:
    """(requests/s, p99 latency in ms) for keep-alive GETs cycling over ``urls``."""
    script = work / "cycle.lua"
    paths = ", ".join(f'"{re.sub(r"^http://[^/]+", "", url)}"' for url in urls)
    script.write_text(f"local paths = {{{paths}}}\nlocal i = 0\n"
                      "request = function()\n  i = i + 1\n"
                      "  return wrk.format('GET', paths[(i % #paths) + 1])\nend\n")
    base = re.match(r"^http://[^/]+", urls[0]).group(0)
    output = subprocess.run(["wrk", "-t2", "-c64", f"-d{max(1, round(seconds))}s", "--latency",
                             "-s", str(script), base], capture_output=True, text=True,
                            check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed requests:\n{output}")
    return rate, float(p99.group(1)) * scale


def nginx_conf(work: Path, root: Path, port: int) -> Path:
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 2;
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    types {{ video/mp4 m4s mp4; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ add_header Cache-Control "public, max-age=60"; }}
    }}
}}
""")
    return conf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per figure")
    parser.add_argument("--workers", default="1,2",
                        help="HTTP_WORKERS of the livedge node, one row each (comma-separated)")
    args = parser.parse_args()
    for tool in ("redis-server", "nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench.serve: {tool} is not installed", file=sys.stderr)
            return 2
    named, events = objects()
    part_names = [n for n in named if n.startswith("part")]
    segment_names = [n for n in named if n.startswith("seg")]
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="livedge-bench-") as work_dir, \
            tempfile.TemporaryDirectory(prefix="livedge-bench-", dir="/dev/shm") as shm_dir:
        work, shm = Path(work_dir), Path(shm_dir)
        rows: list[tuple[str, tuple[float, float], tuple[float, float]]] = []
        try:
            redis_port = free_port()
            processes.append(start([shutil.which("redis-server") or "/usr/bin/redis-server",
                                    "--port", str(redis_port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--dir", str(work)],
                                   work / "redis.log"))
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            deadline = time.monotonic() + 10
            while not ping(redis_port):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            asyncio.run(publish(redis_url, named, events))

            # nginx: the same bytes as files in /dev/shm.
            os.chmod(shm, 0o755)  # nginx workers run as an unprivileged user
            for name, data in named.items():
                (shm / name).write_bytes(data)
            nginx_port = free_port()
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            processes.append(start([nginx, "-c", str(nginx_conf(work, shm, nginx_port)),
                                    "-p", str(work)], work / "nginx.log"))
            base = f"http://127.0.0.1:{nginx_port}"
            wait_http(f"{base}/init.mp4")
            rows.append(("nginx 2 workers, files in /dev/shm",
                         wrk([f"{base}/part0.0.m4s"], args.seconds, work),
                         wrk([f"{base}/seg0.m4s"], args.seconds, work)))

            # The anchor: the least a Python process does to answer the same bytes.
            anchor_port = free_port()
            anchor = start([sys.executable, "-m", "bench.anchor", "--port", str(anchor_port),
                            "--objects", str(shm)], work / "anchor.log")
            processes.append(anchor)
            base = f"http://127.0.0.1:{anchor_port}/hls/demo/180p"  # where it serves --objects
            wait_http(f"{base}/part0.0.m4s")
            rows.append(("anchor: raw asyncio.Protocol + uvloop, 1 process (bench/anchor.py)",
                         wrk([f"{base}/part0.0.m4s"], args.seconds, work),
                         wrk([f"{base}/seg0.m4s"], args.seconds, work)))
            stop(anchor)
            processes.remove(anchor)

            cases = [(f"livedge reading node ({workers} process{'es' if workers > 1 else ''}),"
                      " memory tier hit", "512MiB", False, workers)
                     for workers in (int(n) for n in args.workers.split(","))]
            cases.append(("livedge reading node, 1 MiB memory: Redis tier", "1MiB", True, 1))
            for label, memory, cycle, workers in cases:
                port = free_port()
                env = {**os.environ, "REDIS_URL": redis_url, "CACHE_MEMORY": memory,
                       "PORT": str(port), "HOST": "127.0.0.1", "WS_PORT": str(free_port()),
                       "LOG_LEVEL": "warning", "HTTP_WORKERS": str(workers)}
                node = start([sys.executable, "-m", "edge.cli", "serve"], work / f"node-{port}.log",
                             env)
                processes.append(node)
                base = f"http://127.0.0.1:{port}/hls/{STREAM}/{RENDITION}"
                wait_http(f"http://127.0.0.1:{port}/healthz")
                if workers > 1:
                    wait_for_workers(f"http://127.0.0.1:{port}")
                wait_http(f"{base}/index.m3u8")
                for _ in range(8 * workers):  # fill the memory tier of every process
                    for name in ("part0.0.m4s", "seg0.m4s"):
                        wait_http(f"{base}/{name}")
                parts = [f"{base}/{n}" for n in (part_names if cycle else ["part0.0.m4s"])]
                segments = [f"{base}/{n}" for n in (segment_names if cycle else ["seg0.m4s"])]
                rows.append((label, wrk(parts, args.seconds, work),
                             wrk(segments, args.seconds, work)))
                stop(node)
                processes.remove(node)
        finally:
            for process in reversed(processes):
                stop(process)
    reference = rows[0]
    print(f"| server | {PART_BYTES // 1000} KB part req/s | p99 | "
          f"{PART_BYTES * PARTS_PER_SEGMENT // 1000} KB segment req/s | p99 |")
    print("|---|---|---|---|---|")
    for label, (part_rate, part_p99), (segment_rate, segment_p99) in rows:
        print(f"| {label} | {part_rate:,.0f} ({part_rate / reference[1][0]:.2f}x) | "
              f"{part_p99:.1f} ms | {segment_rate:,.0f} ({segment_rate / reference[2][0]:.2f}x) | "
              f"{segment_p99:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
