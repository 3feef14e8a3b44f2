"""How many LL-HLS viewers does one node hold with p99 part delivery under 200 ms and no errors?

One ``livedge serve`` process on 127.0.0.1 produces two live ladders: ``--demo`` (720p30 test
pattern) and a pulled file (``PULL_STREAMS``, a 640x360 lavfi file made here, reconnected with one
discontinuity when it ends). The load generator, ``bench.loadclient``, runs in a separate process:
viewers spread round-robin over every video rendition of both streams, each also following its
stream's audio playlist (as a player of separate audio does), with blocking reloads and a GET of
every new part. The viewer count steps up (50, 100, 200, 400, 800, ...) until a step fails (p99
delivery over the limit, any error or non-200 answer) or the step or time budget is spent.

Delivery latency: the part's bytes received by a viewer minus the part's production time, estimated
from the playlist (segment ``EXT-X-PROGRAM-DATE-TIME`` + part durations, see
``bench.loadclient.listed_parts``). It includes the blocking reload that listed the part, the part's
GET and the generator's own scheduling delay. The generator shares the 2 cores with the node (and
the node's transcoders): its CPU and event-loop lag are reported with each step.

Memory per viewer: the node's resident memory (``/proc/PID/status`` VmRSS) at the end of a step
minus before it, over the viewers.

This module also holds the process helpers ``bench.waiters`` and ``bench.soak`` use.

    .venv/bin/python -m bench.load [--steps 50,100,200,400,800,1600] [--seconds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from bench.ports import free_port

REPO = Path(__file__).resolve().parent.parent
BENCH_SECRET = "bench-secret-" + "x" * 32
# The ladders of the load run: two rungs, ultrafast, so two live ladders leave most of the two
# cores to serving (the default 3-rung veryfast ladder costs about 0.46 core per 720p source).
LOAD_LADDER = "360p:640x360:700k,180p:320x180:250k"


# -- processes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcSample:
    """One look at a process in /proc. ``cpu`` is user + system seconds since it started."""

    at: float  # monotonic seconds
    rss: int  # bytes
    cpu: float
    fds: int
    threads: int


_TICKS = os.sysconf("SC_CLK_TCK")


def sample_process(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15)
    threads = int(fields[17])
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return ProcSample(time.monotonic(), rss, cpu, len(os.listdir(f"/proc/{pid}/fd")), threads)


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == parent:
                    children.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return children


def worker_answers(url: str, tries: int = 16) -> bool:
    """Whether an HTTP worker (edge/workers.py) of the node at ``url`` has bound its port yet: it
    marks what it proxies to its main process with Via."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                if answer.headers.get("Via") == "1.1 livedge-worker":
                    return True
        except OSError:
            continue  # a worker binding (or restarting) can refuse a connection for a moment
    return False


def wait_for_workers(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not worker_answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError("no HTTP worker answers")
        time.sleep(0.2)


def cpu_share(before: ProcSample, after: ProcSample) -> float:
    """CPU seconds per wall second between two samples (1.0 = one core busy)."""
    return (after.cpu - before.cpu) / max(1e-9, after.at - before.at)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, which is counted in user already
    return (total - idle) / _TICKS, total / _TICKS


def others_cpu(exclude: set[int]) -> float:
    """CPU seconds used so far by every process of the machine except ``exclude`` (PIDs): other
    work sharing the cores. Processes that ended between two calls are missed."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def wait_for_quiet(limit: float = 0.3, settle: float = 3.0, max_wait: float = 120.0) -> float:
    """Wait (at most ``max_wait`` seconds) until the machine's busy CPU stays under ``limit``
    cores for ``settle`` seconds: other work on a shared machine skews every figure. Returns the
    busy cores last seen."""
    deadline = time.monotonic() + max_wait
    while True:
        busy, total = machine_cpu()
        time.sleep(settle)
        busy_after, total_after = machine_cpu()
        cores = (busy_after - busy) / max(1e-9, total_after - total) * os.cpu_count()
        if cores <= limit or time.monotonic() > deadline:
            return cores


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it) to at least ``wanted`` if allowed;
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard < wanted:
        try:  # root may raise the hard limit, up to fs.nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


@dataclass
class NodeProcess:
    url: str
    port: int
    ws_url: str
    process: subprocess.Popen
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The node's process and its children (HTTP workers)."""
        return [self.process.pid, *child_pids(self.process.pid)]

    def sample(self) -> ProcSample:
        """The node's process and its HTTP workers, summed."""
        samples = []
        for pid in self.pids():
            try:
                samples.append(sample_process(pid))
            except OSError:
                continue  # a worker that ended meanwhile
        return ProcSample(samples[0].at, sum(s.rss for s in samples), sum(s.cpu for s in samples),
                          sum(s.fds for s in samples), sum(s.threads for s in samples))

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash), then reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a drain), SIGKILL if it takes longer than ``timeout``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def node_environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PORT", "HOST")}
    # Every simulated client comes from 127.0.0.1: the per-address cap on concurrent requests
    # (edge/limits.py, 256 by default) would refuse most of them with 429.
    env.update({"JWT_SECRET": BENCH_SECRET, "LADDER": LOAD_LADDER, "X264_PRESET": "ultrafast",
                "LOG_LEVEL": "info", "MAX_REQUESTS_PER_ADDRESS": "0",
                "MAX_CONNECTIONS_PER_ADDRESS": "0"})
    env.update(extra)
    return env


def launch_node(workdir: Path, *args: str, port: int | None = None,
                log_to: str | Path | None = None, startup_timeout: float = 30.0,
                program: tuple[str, ...] = ("edge.cli", "serve"), **env: str) -> NodeProcess:
    """Start ``livedge serve`` (or another ``program``: a module and its arguments, taking
    ``--host`` and ``--port``) on 127.0.0.1 and wait for ``/healthz``. Its output goes to
    ``log_to`` (default ``workdir/node-PORT.log``; ``/dev/full`` makes every log write fail).
    The caller must ``stop()`` or ``kill()`` it (``running_node`` does)."""
    port = port or free_port()
    env.setdefault("WS_PORT", str(free_port()))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_to) if log_to is not None else workdir / f"node-{port}.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", *program, "--host", "127.0.0.1", "--port", str(port), *args],
            env=node_environment(**env), stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    node = NodeProcess(f"http://127.0.0.1:{port}", port, f"ws://127.0.0.1:{env['WS_PORT']}",
                       process, log_path if log_path.is_file() else None)
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}:\n{node.log()[-3000:]}")
        try:
            with urllib.request.urlopen(node.url + "/healthz", timeout=1):
                return node
        except OSError:
            if time.monotonic() > deadline:
                node.kill()
                raise RuntimeError(f"node did not start:\n{node.log()[-3000:]}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def running_node(workdir: Path, *args: str, **kwargs) -> Iterator[NodeProcess]:
    node = launch_node(workdir, *args, **kwargs)
    try:
        yield node
    finally:
        node.stop()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_stream(url: str, stream: str, timeout: float = 60.0) -> list[str]:
    """Wait until ``stream``'s multivariant playlist is served and every media playlist lists a
    part; returns the rendition names (videos first, then audio)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_get(f"{url}/hls/{stream}/index.m3u8", timeout=10)
        if status == 200:
            text = body.decode()
            videos = [line.split("/")[0] for line in text.splitlines()
                      if line.endswith("/index.m3u8") and not line.startswith("#")]
            audio = [uri.split("/")[0] for uri in
                     re.findall(r'TYPE=AUDIO,[^\n]*URI="([^"]+)"', text)]
            renditions = videos + audio
            if all(b"#EXT-X-PART:" in http_get(f"{url}/hls/{stream}/{r}/index.m3u8")[1]
                   for r in renditions):
                return renditions
        if time.monotonic() > deadline:
            raise RuntimeError(f"stream {stream} did not come up: {status} {body[:300]!r}")
        time.sleep(0.5)


def make_source_file(path: Path, seconds: float, size: tuple[int, int] = (640, 360),
                     rate: int = 30) -> Path:
    """A ``seconds`` long H.264/AAC MP4 of lavfi testsrc2 + a 440 Hz tone (kept if it exists)."""
    if path.exists():
        return path
    from tests.media_files import encode_lavfi
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    encode_lavfi(partial, seconds, size, rate,
                 video_options={"preset": "ultrafast", "crf": "28", "g": str(2 * rate)})
    partial.rename(path)
    return path


# -- the load run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    viewers: int
    report: dict
    node_cpu: float  # cores
    rss_before: int
    rss_after: int
    limit: float
    others: float  # cores used by other processes of the machine during the step

    @property
    def p99(self) -> float | None:
        return self.report["delivery"]["p99"]

    @property
    def errors(self) -> int:
        return sum(self.report["errors"].values()) + sum(self.report["statuses"].values())

    @property
    def passed(self) -> bool:
        return self.p99 is not None and self.p99 <= self.limit and self.errors == 0 \
            and not self.report["sequence_problems"]


def run_step(node: NodeProcess, playlists: list[str], viewers: int, seconds: float,
             limit: float) -> StepResult:
    ramp = min(10.0, max(2.0, viewers / 100))
    before = node.sample()
    command = [sys.executable, "-m", "bench.loadclient", "--url", node.url, "--viewers",
               str(viewers), "--seconds", str(seconds), "--warmup", "3", "--ramp", str(ramp)]
    for playlist in playlists:
        command += ["--playlist", playlist]
    client = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(ramp + 3)
        loaded_start = node.sample()
        others_before = others_cpu({*node.pids(), os.getpid(), client.pid})
        time.sleep(seconds * 0.9)
        others_after = others_cpu({*node.pids(), os.getpid(), client.pid})
        loaded_end = node.sample()
        out, _ = client.communicate(timeout=ramp + seconds + 60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    report = json.loads(out)
    return StepResult(viewers, report, cpu_share(loaded_start, loaded_end), before.rss,
                      loaded_end.rss, limit,
                      (others_after - others_before) / (loaded_end.at - loaded_start.at))


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def table(results: list[StepResult]) -> str:
    lines = ["| viewers | parts/s | delivery p50 | p99 | max | part GET p99 "
             "| listing vs PDT p50 / p99 | errors | node CPU | generator CPU | other CPU "
             "| generator lag p99 | node RSS per viewer | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        report = result.report
        per_viewer = (result.rss_after - result.rss_before) / result.viewers
        errors = {**report["errors"], **report["statuses"]}
        listing = report["listing_vs_media_clock"]
        lines.append(
            f"| {result.viewers} | {report['parts'] / max(1, report['_seconds']):.0f} | "
            f"{format_ms(report['delivery']['p50'])} | {format_ms(result.p99)} | "
            f"{format_ms(report['delivery']['max'])} | {format_ms(report['fetch']['p99'])} | "
            f"{format_ms(listing['p50'])} / {format_ms(listing['p99'])} | "
            f"{sum(errors.values()) or 0}{' ' + json.dumps(errors) if errors else ''} | "
            f"{result.node_cpu * 100:.0f}% | {report['generator_cpu'] * 100:.0f}% | "
            f"{result.others * 100:.0f}% | "
            f"{format_ms(report['generator_loop_lag_p99'])} | {per_viewer / 1024:.0f} KiB | "
            f"{'ok' if result.passed else 'FAIL'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="50,100,200,400,800,1600")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per step")
    parser.add_argument("--limit-ms", type=float, default=200.0)
    parser.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--ladder", default=LOAD_LADDER)
    parser.add_argument("--preset", default="ultrafast")
    parser.add_argument("--keep-going", action="store_true", help="run every step even past a fail")
    parser.add_argument("--workers", type=int, default=1, help="HTTP_WORKERS of the node")
    args = parser.parse_args()
    steps = [int(n) for n in args.steps.split(",")]
    raise_fd_limit(max(steps) * 8 + 1000)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="livedge-load-") as scratch:
        work = Path(scratch)
        source = make_source_file(work / "second.mp4", 300)
        with running_node(work, "--demo", LADDER=args.ladder, X264_PRESET=args.preset,
                          PULL_STREAMS=f"second=file:{source}",
                          HTTP_WORKERS=str(args.workers)) as node:
            if args.workers > 1:
                wait_for_workers(node.url)
            playlists = []
            for stream in ("demo", "second"):
                renditions = wait_for_stream(node.url, stream)
                playlists += [f"{stream}/{r}" for r in renditions if r != "audio"]
            idle = node.sample()
            time.sleep(3)
            idle_cpu = cpu_share(idle, node.sample())
            print(f"node pid {node.pid}, idle (two ladders transcoding): "
                  f"CPU {idle_cpu * 100:.0f}%, RSS {idle.rss / 2**20:.0f} MiB; "
                  f"following {', '.join(playlists)} + audio",
                  file=sys.stderr)
            results: list[StepResult] = []
            for viewers in steps:
                if time.monotonic() - started + args.seconds + 30 > args.budget:
                    print("time budget spent", file=sys.stderr)
                    break
                busy = wait_for_quiet(limit=0.3 + idle_cpu)
                print(f"machine busy before {viewers} viewers: {busy:.2f} cores", file=sys.stderr)
                result = run_step(node, playlists, viewers, args.seconds, args.limit_ms / 1000)
                result.report["_seconds"] = args.seconds
                results.append(result)
                print(table(results).splitlines()[-1], file=sys.stderr)
                if not result.passed and not args.keep_going:
                    break
            held = max((r.viewers for r in results if r.passed), default=0)
    print(f"idle node: CPU {idle_cpu * 100:.0f}% (transcoding), RSS {idle.rss / 2**20:.0f} MiB")
    print(table(results))
    print(f"\nmost viewers held with p99 <= {args.limit_ms:.0f} ms and no errors: {held}")


if __name__ == "__main__":
    main()
