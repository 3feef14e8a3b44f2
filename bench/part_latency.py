"""How soon is a part listed after its last frame arrives?

A live 1280x720 30 fps source (lavfi testsrc2 + sine, paced in real time like a camera) goes through
the real ladder transcoder into a real ``LiveStream``. For every part of every rung we take the wall
time its last video frame was handed to the transcoder and the wall time the window listed the part.
Target (issue 2): no later than the last frame's arrival plus 100 ms.

    .venv/bin/python -m bench.part_latency --seconds 20 [--ladder 720p,480p,360p] [--preset veryfast]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import av

from edge.cache import MemoryCache
from edge.config import DEFAULT_LADDER
from ingest.ladder import RungSpec
from ingest.media import TrackKind
from ingest.transcoder import LadderTranscoder
from origin.live import LiveSettings, LiveStream
from origin.packager import PartReady

FPS = 30


def feed(transcoder: LadderTranscoder, seconds: float, pushed: dict[int, float],
         stop: threading.Event) -> None:
    graph = "testsrc2=size=1280x720:rate=30[out0];sine=frequency=1000:sample_rate=48000[out1]"
    started = time.monotonic()
    with av.open(graph, format="lavfi") as source:
        for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
            if frame.time >= seconds or stop.is_set():
                break
            delay = frame.time - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            if isinstance(frame, av.VideoFrame):
                pushed[round(frame.time * FPS)] = time.monotonic()
                transcoder.push_video(frame)
            else:
                transcoder.push_audio(frame)
    transcoder.close()


async def run(seconds: float, rung_names: list[str], preset: str, part: float) -> dict:
    loop = asyncio.get_running_loop()
    stream = LiveStream("bench", LiveSettings(2.0, part, 6), MemoryCache(256 * 1024 * 1024))
    ends: dict[str, float] = {}  # track -> output seconds covered so far
    latencies: dict[str, list[float]] = {}
    pushed: dict[int, float] = {}

    def listen(_: str, event) -> None:
        if not isinstance(event, PartReady):
            return
        track = stream.tracks[event.track]
        ends[event.track] = ends.get(event.track, 0.0) + event.duration
        if track.kind is not TrackKind.VIDEO:
            return
        last_frame = round(ends[event.track] * FPS) - 1
        if last_frame in pushed:
            latencies.setdefault(event.track, []).append(time.monotonic() - pushed[last_frame])

    stream.listeners.append(listen)
    rungs = [RungSpec(r.name, r.width, r.height, r.video_bitrate) for r in DEFAULT_LADDER
             if r.name in rung_names]
    transcoder = LadderTranscoder(stream, loop, rungs, segment_duration=2.0, preset=preset)
    stop = threading.Event()
    try:
        await asyncio.to_thread(feed, transcoder, seconds, pushed, stop)
    finally:
        stop.set()
    await asyncio.sleep(0.5)
    stats = transcoder.stats()
    return {"latencies": latencies, "dropped": stats.frames_dropped}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--ladder", default="720p,480p,360p")
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--part", type=float, default=0.5)
    args = parser.parse_args()
    result = asyncio.run(run(args.seconds, args.ladder.split(","), args.preset, args.part))
    print(f"part {args.part} s, preset {args.preset}, {args.seconds:.0f} s of 720p30, "
          f"frames dropped: {result['dropped']}")
    print("| rung | parts | p50 | p99 | max | within +100 ms |")
    print("|---|---|---|---|---|---|")
    for rung, values in sorted(result["latencies"].items()):
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        within = sum(1 for v in values if v <= 0.1) / len(values)
        print(f"| {rung} | {len(values)} | {statistics.median(values) * 1000:.0f} ms | "
              f"{p99 * 1000:.0f} ms | {values[-1] * 1000:.0f} ms | {within:.0%} |")


if __name__ == "__main__":
    main()
