"""Ladder transcode throughput: livedge's LadderTranscoder against FFmpeg's own CLI doing the same job.

For each ladder (720p30 -> 720p/480p/360p, 1080p30 -> 1080p/720p/480p/360p) a test source file is
generated first with /usr/bin/ffmpeg (testsrc2 + sine, x264 crf 16: a high-quality input), then
transcoded, unpaced, by
- FFmpeg: one process, decode once, ``split`` + ``scale``, one libx264 encoder per rung and AAC once,
  into the null muxer (FFmpeg chooses its own thread counts);
- livedge: PyAV decode (``ingest.pull.pump``, the pull source's decode loop) into a LadderTranscoder
  (one thread and one x264 thread per rung, AAC once) with a sink that only counts bytes.
Same settings on both sides: preset veryfast, tune zerolatency, no B-frames, GOP 2 s, no scene cut,
bitrate = maxrate = bufsize (1 s VBV), AAC 128 kb/s. Wall time, CPU time (getrusage: children for
FFmpeg, this process for livedge) and the realtime factor (media seconds / wall seconds) are printed as
a Markdown table.

    .venv/bin/python -m bench.ladder --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av

from ingest.ladder import RungSpec, plan_ladder
from ingest.media import EncodedSample, TrackInfo
from ingest.pull import pump
from ingest.transcoder import LadderTranscoder

FFMPEG = "/usr/bin/ffmpeg"
SEGMENT_SECONDS = 2.0
AUDIO_BITRATE = 128_000
RUNGS = (
    RungSpec("1080p", 1920, 1080, 5_000_000),
    RungSpec("720p", 1280, 720, 2_800_000),
    RungSpec("480p", 854, 480, 1_400_000),
    RungSpec("360p", 640, 360, 800_000),
)
SOURCES = {"720p30": (1280, 720), "1080p30": (1920, 1080)}


@dataclass(frozen=True)
class Run:
    tool: str
    wall: float  # seconds
    cpu: float  # seconds, user + system
    output_bytes: int


def generate_source(path: Path, width: int, height: int, seconds: float) -> None:
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=1000:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-crf", "16", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-b:a", "192k", str(path)],
        check=True)


def ffmpeg_ladder(source: Path, rungs: list[RungSpec]) -> Run:
    split = f"[0:v]split={len(rungs)}" + "".join(f"[s{i}]" for i in range(len(rungs)))
    scales = [f"[s{i}]scale={r.width}:{r.height}[v{i}]" for i, r in enumerate(rungs)]
    command = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostats", "-y", "-i", str(source),
               "-filter_complex", ";".join([split, *scales])]
    for index in range(len(rungs)):
        command += ["-map", f"[v{index}]"]
    command += ["-map", "0:a",
                "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-bf", "0",
                "-g", str(round(SEGMENT_SECONDS * 30)), "-keyint_min", str(round(SEGMENT_SECONDS * 30)),
                "-sc_threshold", "0"]
    for index, rung in enumerate(rungs):
        rate = str(rung.video_bitrate)
        command += [f"-b:v:{index}", rate, f"-maxrate:v:{index}", rate, f"-bufsize:v:{index}", rate]
    command += ["-c:a", "aac", "-b:a", str(AUDIO_BITRATE), "-f", "null", "-"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Run("FFmpeg 5.1 CLI", wall, _cpu(after) - _cpu(before), 0)


class CountingSink:
    """A MediaSink that only counts what it is given."""

    def __init__(self) -> None:
        self.bytes = 0
        self.samples = 0
        self.ended = asyncio.Event()

    def add_track(self, track: TrackInfo) -> None:
        pass

    def add_sample(self, track_name: str, sample: EncodedSample) -> None:
        self.bytes += len(sample.data)
        self.samples += 1

    def discontinuity(self) -> None:
        pass

    def end(self) -> None:
        self.ended.set()


async def livedge_ladder(source: Path) -> tuple[Run, LadderTranscoder]:
    sink = CountingSink()
    # Unpaced: the decode loop may wait for room in a rung's queue instead of dropping frames.
    transcoder = LadderTranscoder(sink, asyncio.get_running_loop(), RUNGS,
                                  segment_duration=SEGMENT_SECONDS, audio_bitrate=AUDIO_BITRATE,
                                  block_on_full=60.0)

    def decode() -> None:
        with av.open(str(source)) as container:
            pump(container, transcoder, None, threading.Event())
        transcoder.close()

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.to_thread(decode)
    await sink.ended.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Run("livedge LadderTranscoder", wall, _cpu(after) - _cpu(before), sink.bytes), transcoder


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="source length (default 30)")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma-separated, from {', '.join(SOURCES)}")
    parser.add_argument("--workdir", type=Path, help="where the source files go (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"{args.seconds:g} s sources; {av.__version__=}, "
              f"FFmpeg in PyAV {av.ffmpeg_version_info}", file=sys.stderr)
        print("| ladder | tool | wall | CPU | realtime factor | wall ratio | CPU ratio |")
        print("|---|---|---|---|---|---|---|")
        for name in args.sources.split(","):
            width, height = SOURCES[name]
            source = workdir / f"source_{name}_{args.seconds:g}s.mp4"
            if not source.exists():
                generate_source(source, width, height, args.seconds)
            rungs = plan_ladder(RUNGS, width, height)
            label = f"{name} -> {'/'.join(r.name for r in rungs)}"
            reference = ffmpeg_ladder(source, rungs)
            ours, transcoder = asyncio.run(livedge_ladder(source))
            stats = transcoder.stats()
            if stats.frames_dropped or stats.last_error:
                print(f"warning: {stats.frames_dropped} frames dropped, error {stats.last_error}",
                      file=sys.stderr)
            for run in (reference, ours):
                print(f"| {label} | {run.tool} | {run.wall:.1f} s | {run.cpu:.1f} s "
                      f"| {args.seconds / run.wall:.2f} | {run.wall / reference.wall:.2f}x "
                      f"| {run.cpu / reference.cpu:.2f}x |", flush=True)
            print(f"livedge: {stats.frames_in} frames in, encoded {stats.frames_encoded}, "
                  f"{ours.output_bytes / 1e6:.1f} MB out, slowest rung {stats.realtime_factor:.1f}x "
                  "realtime while busy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
