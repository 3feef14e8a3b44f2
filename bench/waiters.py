"""Blocking playlist reloads at scale: a part is produced; how soon is the last waiter answered?

One node (``livedge serve --demo``, one 180p rung, parts of 1/3 s as in PERF-NOTES) and N
keep-alive connections from this process, each holding a blocking reload for the next part
(``_HLS_msn``/``_HLS_part`` of the preload hint) and asking for the following one as soon as it is
answered. N steps through 1,000, 5,000, 10,000.

Server-side timing without touching the server: every client socket has ``SO_TIMESTAMPNS``, so each
answer carries the kernel's receive time, which on loopback is the moment the node wrote it
(microseconds later), however late this process gets round to reading it. A part's production time
is estimated from the playlist (segment ``EXT-X-PROGRAM-DATE-TIME`` + part durations), calibrated
before the run with a single waiter on the idle node (the estimate's constant offset for the
stream); where that puts a part's production after its first answer (the estimate can be a frame
late for some parts), the first answer's time is taken instead. Per part: *last answered* = the latest kernel timestamp among the requests that were
waiting for it (sent before its first answer); p50/p99 over the parts of the run. Requests sent
after their part already existed are answered at once and counted as *late*, not as waiters: when
many are late, the generator (one Python process sharing the 2 cores) is the bottleneck.

The generator stands for N viewers on other machines, but here it shares the node's cores: while
it measures it runs ``--generator-nice`` (default 10) steps below the node, so that in the burst
after a part the node's processes get the cores first (the generator reads its answers a little
later; their kernel timestamps are unchanged). ``--generator-nice 0`` measures without.

The bench raises RLIMIT_NOFILE for itself and the node (root may raise the hard limit).

    .venv/bin/python -m bench.waiters [--counts 1000,5000,10000] [--seconds 15] [--profile 10000]
        [--headers minimal|browser] [--anchor] [--opening-404]

``--opening-404``: each connection's first request asks for a part that does not exist (404), as a
player's does while its stream is away (a publisher reconnecting), before it reloads on the same
connection.

``--profile N`` runs ``py-spy record`` (``pip install py-spy``) on the node during step N and
writes a flame graph SVG next to the report.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import (cpu_share, http_get, others_cpu, raise_fd_limit, running_node,
                        wait_for_workers,
                        wait_for_quiet, wait_for_stream)
from bench.loadclient import listed_parts, preload_hint

SO_TIMESTAMPNS = 35  # Linux; the kernel's receive time as a struct timespec (CLOCK_REALTIME)
STREAM, RENDITION = "demo", "180p"
CONNECTS_IN_FLIGHT = 100  # under the node's listen backlog (aiohttp: 128): more overflow it
RECV_BYTES = 65536
# What Chrome sends with an hls.js playlist request (--headers browser), after the request line.
BROWSER_HEADERS = (
    b"Host: 127.0.0.1\r\nConnection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"\r\nsec-ch-ua-mobile: ?0\r\n'
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36\r\nsec-ch-ua-platform: \"Linux\"\r\nAccept: */*\r\n"
    b"Origin: http://127.0.0.1\r\nSec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\n"
    b"Sec-Fetch-Dest: empty\r\nReferer: http://127.0.0.1/watch/demo\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n")
MINIMAL_HEADERS = b"Host: bench\r\n"


@dataclass
class _Waiter:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    asked: tuple[int, int] | None = None
    sent_at: float = 0.0
    connected: bool = False
    answered: bool = False  # the node accepted it and answered its first (plain) request


@dataclass
class StepResult:
    waiters: int
    connected: int
    parts: int
    blocked_answers: int  # answers to requests that were waiting when their part came
    late_answers: int  # answers to requests sent after their part existed
    errors: dict[str, int]
    last_p50: float | None  # per part: last waiter answered - production, seconds
    last_p99: float | None
    last_max: float | None
    answer_p50: float | None  # per answer: answered - production
    answer_p99: float | None
    spread_p99: float | None  # per part: last answered - first answered
    node_cpu: float
    generator_cpu: float
    rss_idle: int
    rss_loaded: int
    answer_bytes: int
    background: float  # cores busy with other processes of the machine while measuring
    idle_cpu: float  # the node's CPU before the waiters came (transcoding the demo), cores
    answers_per_second: float

    @property
    def cpu_per_answer(self) -> float:
        """Node CPU seconds per answer, beyond what it spends idle."""
        return (self.node_cpu - self.idle_cpu) / max(1e-9, self.answers_per_second)

    @property
    def memory_per_waiter(self) -> float:
        return (self.rss_loaded - self.rss_idle) / max(1, self.connected)


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds + nanoseconds / 1e9
    return None


class WaiterPool:
    """N connections doing blocking reloads, driven by one epoll loop in this thread."""

    def __init__(self, port: int, path: str, headers: bytes = MINIMAL_HEADERS,
                 opening: str | None = None) -> None:
        self._port = port
        self._path = path.encode()
        self._headers = headers
        self._opening = opening.encode() if opening else None  # a connection's first request
        self._epoll = select.epoll()
        self._waiters: dict[int, _Waiter] = {}
        self.connected = 0
        self.newest_hint: tuple[int, int] | None = None
        self.recording = False
        # (asked, status, kernel receive time, sent at); filled while ``recording``.
        self.answers: list[tuple[tuple[int, int], int, float, float]] = []
        self.production: dict[tuple[int, int], float] = {}  # estimate from the playlist
        self.errors: dict[str, int] = {}
        self.answer_bytes = 0
        self.unanswered = 0  # connections opening: not yet answered once
        self.reloading = False  # False while connecting: answered connections stay idle

    def _error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def open(self, count: int, deadline: float) -> None:
        """Connect ``count`` waiters (idle keep-alive connections until ``start_reloading``, unless
        already reloading); stops at ``deadline`` (monotonic). A new connection first asks for the
        playlist without blocking; at most ``CONNECTS_IN_FLIGHT`` are waiting for that first
        answer, so the node's accept queue never overflows (a client's connect completes before
        the node accepts it)."""
        started = 0
        while self.connected < count and time.monotonic() < deadline:
            while started < count and self.unanswered < CONNECTS_IN_FLIGHT:
                started += 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                code = sock.connect_ex(("127.0.0.1", self._port))
                if code not in (0, errno.EINPROGRESS):
                    sock.close()
                    self._error(f"connect {errno.errorcode.get(code, code)}")
                    continue
                self._waiters[sock.fileno()] = _Waiter(sock)
                self._epoll.register(sock.fileno(), select.EPOLLOUT)
                self.unanswered += 1
            if started >= count and self.unanswered == 0:
                break
            self.poll(0.05)

    def poll(self, timeout: float) -> None:
        """Handle the sockets that are ready, once."""
        for fd, events in self._epoll.poll(timeout):
            waiter = self._waiters.get(fd)
            if waiter is None:
                continue
            if not waiter.connected:
                failure = waiter.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if failure:
                    self._error(f"connect {errno.errorcode.get(failure, failure)}")
                    self._drop(fd)
                    continue
                waiter.connected = True
                self.connected += 1
                self._epoll.modify(fd, select.EPOLLIN)
                self._ask(waiter, None)
                continue
            self._read(fd, waiter)

    def _ask(self, waiter: _Waiter, part: tuple[int, int] | None) -> None:
        waiter.asked = part
        query = b"?_HLS_msn=%d&_HLS_part=%d" % part if part else b""
        target = self._path + query if part or not self._opening or waiter.answered \
            else self._opening
        waiter.sent_at = time.time()
        try:
            waiter.sock.send(b"GET " + target + b" HTTP/1.1\r\n" + self._headers + b"\r\n")
        except OSError as error:
            self._error(f"send {type(error).__name__}")
            self._drop(waiter.sock.fileno())

    def _read(self, fd: int, waiter: _Waiter) -> None:
        try:
            data, ancillary, _, _ = waiter.sock.recvmsg(RECV_BYTES, 64)
        except BlockingIOError:
            return
        except OSError as error:
            self._error(f"recv {type(error).__name__}")
            self._drop(fd)
            return
        if not data:
            self._error("closed by the node")
            self._drop(fd)
            return
        waiter.buffer += data
        head_end = waiter.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(waiter.buffer[:head_end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(waiter.buffer) < head_end + 4 + length:
            return
        received = _kernel_time(ancillary) or time.time()
        status = int(waiter.buffer[9:12])
        body = bytes(waiter.buffer[head_end + 4:head_end + 4 + length])
        del waiter.buffer[:head_end + 4 + length]
        asked = waiter.asked
        opening = not waiter.answered and self._opening is not None
        if not waiter.answered:
            waiter.answered = True
            self.unanswered -= 1
        hint = preload_hint(body) if status == 200 else None
        if hint is not None and (self.newest_hint is None or hint > self.newest_hint):
            self.newest_hint = hint
        if self.recording and asked is not None:
            self.answers.append((asked, status, received, waiter.sent_at))
            self.answer_bytes = len(body)
            if status == 200 and asked not in self.production:
                for part in listed_parts(body):
                    if (part.msn, part.index) == asked:
                        self.production[asked] = part.produced_at
        if status != (404 if opening else 200):
            self._error(f"status {status}")
        if self.reloading:
            self._ask(waiter, hint or self.newest_hint)
        else:
            waiter.asked = None  # idle until ``start_reloading``

    def start_reloading(self) -> None:
        """Every idle connection asks for the next part; from now on each asks again when
        answered."""
        self.reloading = True
        for waiter in list(self._waiters.values()):
            if waiter.answered and waiter.asked is None and not waiter.buffer:
                self._ask(waiter, self.newest_hint)

    def _drop(self, fd: int) -> None:
        waiter = self._waiters.pop(fd, None)
        if waiter is None:
            return
        if waiter.connected:
            self.connected -= 1
        if not waiter.answered:
            self.unanswered -= 1
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        waiter.sock.close()

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll(0.05)

    def close(self) -> None:
        for fd in list(self._waiters):
            self._drop(fd)
        self._epoll.close()


def summarize(pool: WaiterPool, offset: float) -> dict:
    """Per-part and per-answer figures from the recorded answers; ``offset`` corrects the
    production estimate (calibration)."""
    by_part: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for asked, status, received, sent in pool.answers:
        if status == 200:
            by_part.setdefault(asked, []).append((received, sent))
    lasts, spreads, answers = [], [], []
    blocked = late = 0
    for part, rows in by_part.items():
        produced = pool.production.get(part)
        if produced is None:
            continue
        first = min(received for received, _ in rows)
        # The estimate can be a frame late for some parts; no part is answered before it exists.
        produced = min(produced + offset, first)
        waiting = [received for received, sent in rows if sent < first]
        late += len(rows) - len(waiting)
        blocked += len(waiting)
        if not waiting:
            continue
        lasts.append(max(waiting) - produced)
        spreads.append(max(waiting) - first)
        answers += [received - produced for received in waiting]
    return {"parts": len(lasts), "blocked": blocked, "late": late,
            "last_p50": _percentile(lasts, 0.5), "last_p99": _percentile(lasts, 0.99),
            "last_max": max(lasts, default=None), "answer_p50": _percentile(answers, 0.5),
            "answer_p99": _percentile(answers, 0.99), "spread_p99": _percentile(spreads, 0.99)}


def calibrate(port: int, path: str, seconds: float = 4.0) -> float:
    """The production estimate's constant offset: one waiter on the idle node, whose answers
    come within a fraction of a millisecond of the part's production."""
    pool = WaiterPool(port, path)
    try:
        pool.open(1, time.monotonic() + 5)
        pool.start_reloading()
        pool.run_for(1.0)
        pool.recording = True
        pool.run_for(seconds)
    finally:
        pool.close()
    offsets = [received - pool.production[asked] for asked, status, received, sent in pool.answers
               if status == 200 and asked in pool.production and sent < received - 0.05]
    if not offsets:
        raise RuntimeError(f"calibration got no blocked answers: {pool.errors}")
    return statistics.median(offsets)


def run_step(node, path: str, count: int, seconds: float, offset: float,
             profile_to: Path | None, generator_nice: int = 0,
             headers: bytes = MINIMAL_HEADERS, opening: str | None = None) -> StepResult:
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, niceness + generator_nice)  # this thread: the generator
    try:
        return _run_step(node, path, count, seconds, offset, profile_to, headers, opening)
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
        except PermissionError:
            print("could not restore the generator's priority: later nodes start niced too",
                  file=sys.stderr)


def _run_step(node, path: str, count: int, seconds: float, offset: float,
              profile_to: Path | None, headers: bytes, opening: str | None) -> StepResult:
    idle = node.sample()
    time.sleep(2)
    idle_cpu = cpu_share(idle, node.sample())
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    pool = WaiterPool(node.port, path, headers, opening)
    status, body = http_get(node.url + path)
    pool.newest_hint = preload_hint(body) if status == 200 else None
    spy = None
    try:
        pool.open(count, time.monotonic() + 90)
        opened = pool.connected
        pool.start_reloading()
        pool.run_for(2.0)  # everyone settles into the blocking rhythm
        if profile_to is not None:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            output = "raw" if profile_to.suffix == ".txt" else "flamegraph"
            spy = subprocess.Popen([py_spy, "record", "--pid", str(node.pid), "--duration",
                                    str(int(seconds)), "--rate", "200", "--output", str(profile_to),
                                    "--nonblocking", "--format", output],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loaded = node.sample()
        others_before = others_cpu({*node.pids(), os.getpid()})
        pool.recording = True
        pool.run_for(seconds / 2)
        middle = node.sample()
        pool.run_for(seconds / 2)
        pool.recording = False
        after = node.sample()
        others_after = others_cpu({*node.pids(), os.getpid()})
        connected = pool.connected
    finally:
        pool.close()
        if spy is not None:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = summarize(pool, offset)
    generator = (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    background = max(0.0, others_after - others_before) / (after.at - loaded.at)
    return StepResult(
        waiters=count, connected=connected, parts=figures["parts"],
        blocked_answers=figures["blocked"], late_answers=figures["late"], errors=pool.errors,
        last_p50=figures["last_p50"], last_p99=figures["last_p99"], last_max=figures["last_max"],
        answer_p50=figures["answer_p50"], answer_p99=figures["answer_p99"],
        spread_p99=figures["spread_p99"], node_cpu=cpu_share(loaded, after),
        generator_cpu=generator / (after.at - idle.at), rss_idle=idle.rss, rss_loaded=middle.rss,
        answer_bytes=pool.answer_bytes, background=background, idle_cpu=idle_cpu,
        answers_per_second=len(pool.answers) / seconds)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def table(results: list[tuple[str, StepResult]]) -> str:
    """``results``: (server, its step), the server being "livedge" or "anchor"."""
    lines = ["| server | waiters | connected | parts | last answered p50 | p99 | max "
             "| every answer p99 | first -> last p99 | late | errors | server CPU (idle) "
             "| server CPU per answer | generator CPU | other CPU | server memory per waiter |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for server, r in results:
        errors = sum(r.errors.values())
        lines.append(
            f"| {server} | {r.waiters:,} | {r.connected:,} | {r.parts} | {_ms(r.last_p50)} "
            f"| {_ms(r.last_p99)} "
            f"| {_ms(r.last_max)} | {_ms(r.answer_p99)} | {_ms(r.spread_p99)} | "
            f"{r.late_answers / max(1, r.late_answers + r.blocked_answers):.0%} | "
            f"{errors}{' ' + str(r.errors) if errors else ''} | {r.node_cpu * 100:.0f}% "
            f"({r.idle_cpu * 100:.0f}%) | {r.cpu_per_answer * 1e6:.0f} µs | "
            f"{r.generator_cpu * 100:.0f}% | {r.background * 100:.0f}% | "
            f"{r.memory_per_waiter / 1024:.1f} KiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per step")
    parser.add_argument("--part", type=float, default=1 / 3, help="part duration, seconds")
    parser.add_argument("--workers", type=int, default=1, help="HTTP_WORKERS of the node")
    parser.add_argument("--profile", type=int, default=0, help="py-spy the node at this count")
    parser.add_argument("--generator-nice", type=int, default=10,
                        help="how far below the node the generator runs while measuring")
    parser.add_argument("--keep-logs", action="store_true", help="copy each node's log here")
    parser.add_argument("--profile-format", choices=["svg", "txt"], default="svg",
                        help="flame graph, or collapsed stacks (text)")
    parser.add_argument("--opening-404", action="store_true",
                        help="each connection first asks for a part that does not exist")
    parser.add_argument("--headers", choices=["minimal", "browser"], default="minimal",
                        help="each request's headers: Host alone, or Chrome's 14 (hls.js)")
    parser.add_argument("--anchor", action="store_true",
                        help="after each step, the same step against bench.anchor (the least a "
                             "Python process does per reload), answering as many bytes")
    args = parser.parse_args()
    counts = [int(n) for n in args.counts.split(",")]
    limit = raise_fd_limit(max(counts) + 2000)
    print(f"RLIMIT_NOFILE {limit} (this process and the node)", file=sys.stderr)
    path = f"/hls/{STREAM}/{RENDITION}/index.m3u8"
    results: list[tuple[str, StepResult]] = []
    with tempfile.TemporaryDirectory(prefix="livedge-waiters-") as scratch:
        for count in counts:  # a fresh server per step: its memory growth is this step's alone
            # HTTP_READ_TIMEOUT is also the keep-alive idle timeout: connections opened early in a
            # long ramp stay idle until every waiter is connected.
            livedge = running_node(Path(scratch), "--demo", LADDER="180p:320x180:250k",
                                   SEGMENT_DURATION="2", PART_DURATION=f"{args.part:.3f}",
                                   HTTP_READ_TIMEOUT="300", HTTP_WORKERS=str(args.workers))
            results.append(("livedge", _measure(livedge, count, path, args, is_node=True)))
            if args.anchor:
                anchor = running_node(Path(scratch), "--part", str(args.part), "--answer-bytes",
                                      str(results[-1][1].answer_bytes), program=("bench.anchor",))
                results.append(("anchor", _measure(anchor, count, path, args, is_node=False)))
    print(f"answer size {results[-1][1].answer_bytes} bytes, part {args.part * 1000:.0f} ms")
    print(table(results))


def _measure(server, count: int, path: str, args: argparse.Namespace, is_node: bool
             ) -> StepResult:
    """One step against ``server`` (a context manager that starts it, and stops it after): the
    node (its HTTP workers, the profile) or the anchor."""
    busy = wait_for_quiet()
    print(f"machine busy before the step: {busy:.2f} cores", file=sys.stderr)
    with server as node:
        wait_for_stream(node.url, STREAM)
        if is_node and args.workers > 1:
            wait_for_workers(node.url)
        offset = calibrate(node.port, path)
        print(f"server pid {node.pid}; production estimate offset {offset * 1000:.1f} ms "
              f"(one waiter, idle server)", file=sys.stderr)
        profile = Path(f"waiters-{count}.{args.profile_format}").resolve() \
            if is_node and args.profile == count else None
        headers = BROWSER_HEADERS if args.headers == "browser" else MINIMAL_HEADERS
        opening = path.rsplit("/", 1)[0] + "/part0.999.m4s" if is_node and args.opening_404 \
            else None
        result = run_step(node, path, count, args.seconds, offset, profile, args.generator_nice,
                          headers, opening)
        print(table([("", result)]).splitlines()[-1], file=sys.stderr)
        if args.keep_logs and node.log_path is not None:
            shutil.copy(node.log_path, Path(f"waiters-{count}-{node.pid}.log").resolve())
    return result


if __name__ == "__main__":
    main()
