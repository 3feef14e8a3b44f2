"""WHIP ingest targets: time from the WHIP publish to the first playable part, and whether a 1080p30
WHIP publish is ingested without dropped frames while the ladder runs.

A real node (``livedge serve``, default 2 s segments and 0.5 s parts, ICE on 127.0.0.1) and the
project's own WHIP client (``ingest.whip_client.publish``: aiortc encoding a lavfi test picture and
tone) on the same 2-core machine, so the publisher's own encoder competes with the ladder for CPU.

    .venv/bin/python -m bench.whip [--seconds 20] [--size 1920x1080] [--ladder default]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time

import aiohttp

from bench.ports import free_port
from edge.tokens import Scope, issue_token
from ingest.whip_client import publish

SECRET = "bench-secret-" + "b" * 32



async def first_part_seconds(session: aiohttp.ClientSession, base: str, started: float,
                             timeout: float = 30.0) -> float | None:
    deadline = started + timeout
    while time.monotonic() < deadline:
        async with session.get(f"{base}/index.m3u8") as response:
            if response.status == 200:
                text = await response.text()
                first = re.search(r"^(\w+)/index\.m3u8$", text, re.M)
                if first:
                    async with session.get(f"{base}/{first[1]}/index.m3u8") as media:
                        if "#EXT-X-PART:" in await media.text():
                            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    match = re.search(rf'^{name}\{{stream="bench"\}} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


async def run(seconds: float, size: str, ladder: str | None, preset: str) -> None:
    port = free_port()
    env = {**os.environ, "JWT_SECRET": SECRET, "WEBRTC_HOSTS": "127.0.0.1",
           "WS_PORT": str(free_port()), "LOG_LEVEL": "warning", "X264_PRESET": preset}
    if ladder:
        env["LADDER"] = ladder
    node = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{url}/healthz"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            width, height = size.split("x")
            source = (f"testsrc2=size={width}x{height}:rate=30[out0];"
                      "sine=frequency=440:sample_rate=48000[out1]")
            token = issue_token(SECRET, "HS256", Scope.PUBLISH, "bench", 3600, "bench")
            stop = asyncio.Event()
            started = time.monotonic()
            publisher = asyncio.create_task(publish(
                source, f"{url}/whip/bench", token, source_format="lavfi",
                ice_hosts=["127.0.0.1"], stop=stop))
            first = await first_part_seconds(session, f"{url}/hls/bench", started)
            await asyncio.sleep(seconds)
            frames = await metric(session, url, "livedge_ingest_frames_total")
            dropped = await metric(session, url, "livedge_transcode_dropped_frames_total")
            realtime = await metric(session, url, "livedge_transcode_realtime_factor")
            stop.set()
            await asyncio.wait_for(publisher, 20)
    finally:
        node.terminate()
        node.wait(timeout=20)
    print(f"| {size} | {ladder or 'default'} | {preset} | "
          f"{'%.2f s' % first if first is not None else 'none in 30 s'} | {frames:.0f} | "
          f"{dropped:.0f} | {realtime:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--ladder", default=None, help="LADDER value (default: the node's)")
    parser.add_argument("--preset", default="veryfast")
    args = parser.parse_args()
    print("| source | ladder | preset | publish -> first part listed | frames into the ladder | "
          "frames dropped by the ladder | realtime factor (slowest rung) |")
    print("|---|---|---|---|---|---|---|")
    asyncio.run(run(args.seconds, args.size, args.ladder, args.preset))


if __name__ == "__main__":
    main()
