"""Simulated LL-HLS viewers: the load generator of ``bench.load`` and ``bench.soak``, run in its own
process so it never shares an event loop with the node it measures.

A viewer follows a media playlist the way an LL-HLS player does: one plain request to join at the
live edge, then blocking reloads (``_HLS_msn``/``_HLS_part`` of the preload hint) and, after each
answer, a GET of every part listed since the previous answer. With ``audio`` it follows the audio
playlist too, as a player of a stream with separate audio does.

The HTTP client is a minimal HTTP/1.1 keep-alive GET over an ``asyncio.Protocol`` (uvloop when
installed): on two shared cores every microsecond the generator spends is taken from the node, and
aiohttp's client costs several times more per request than this.

Times: ``time.time()`` (seconds since the epoch) so they compare with ``EXT-X-PROGRAM-DATE-TIME``.
A part's production time is estimated from the playlist (see ``listed_parts``); the calibration
figure ``reload_after_production`` (blocking reload answered - estimate) says how good it is.

    .venv/bin/python -m bench.loadclient --url http://127.0.0.1:3000 --viewers 100 --seconds 20 \
        --playlist demo/360p --playlist demo/180p
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

RESPONSE_TIMEOUT = 10.0  # seconds; a blocked reload is answered within 3 target durations (<= 6 s)
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

_PDT = b"#EXT-X-PROGRAM-DATE-TIME:"
_PART_LINE = re.compile(rb'#EXT-X-PART:DURATION=([0-9.]+),URI="part(\d+)\.(\d+)\.m4s[^"]*"')
_HINT = re.compile(rb'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s')
_MEDIA_SEQUENCE = re.compile(rb"#EXT-X-MEDIA-SEQUENCE:(\d+)")
_SEGMENT_URI = re.compile(rb"^seg(\d+)\.m4s", re.M)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


# -- playlists (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListedPart:
    msn: int
    index: int
    produced_at: float  # estimate, epoch seconds: segment PDT + durations up to this part's end


def listed_parts(text: bytes) -> list[ListedPart]:
    """The parts of the last two segments a playlist lists, with their production estimates.

    The packager dates a segment (``EXT-X-PROGRAM-DATE-TIME``) on the wall clock of its period's
    first sample; a part is closed when the sample at its end arrives, so its production is about
    the segment's date plus the durations of its parts up to and including it."""
    start = text.rfind(_PDT)
    if start < 0:
        return []
    earlier = text.rfind(_PDT, 0, start)
    if earlier >= 0:
        start = earlier
    parts: list[ListedPart] = []
    for block in text[start:].split(_PDT)[1:]:
        date = _parse_date(block[:block.index(b"\n")])
        elapsed = 0.0
        for duration, msn, index in _PART_LINE.findall(block):
            elapsed += float(duration)
            parts.append(ListedPart(int(msn), int(index), date + elapsed))
    return parts


def preload_hint(text: bytes) -> tuple[int, int] | None:
    """(msn, part) of the hinted next part, or None (an ended playlist has none)."""
    found = _HINT.search(text, max(0, len(text) - 600))
    return (int(found.group(1)), int(found.group(2))) if found else None


def sequence_problem(text: bytes) -> str | None:
    """Why the segments listed are not numbered MEDIA-SEQUENCE, +1, +2...; None if they are."""
    found = _MEDIA_SEQUENCE.search(text)
    if found is None:
        return "no EXT-X-MEDIA-SEQUENCE"
    first = int(found.group(1))
    skipped = re.search(rb"#EXT-X-SKIP:SKIPPED-SEGMENTS=(\d+)", text)
    expected = first + (int(skipped.group(1)) if skipped else 0)
    for listed in _SEGMENT_URI.findall(text):
        if int(listed) != expected:
            return f"seg{int(listed)} listed where seg{expected} belongs"
        expected += 1
    return None


def continuity_problem(text: bytes, newest_before: int | None) -> str | None:
    """Why this playlist breaks the media sequence a follower has seen so far (``newest_before``:
    the newest complete segment of its previous answer), or None. Within a playlist segments
    must be numbered consecutively; from one answer to the next the newest segment must not go
    back, and the window must not have slid past a segment the follower never saw."""
    problem = sequence_problem(text)
    if problem is not None or newest_before is None:
        return problem
    newest = last_segment(text)
    if newest is not None and newest < newest_before:
        return f"newest segment went back from {newest_before} to {newest}"
    found = _MEDIA_SEQUENCE.search(text)
    if found is not None and int(found.group(1)) > newest_before + 1:
        return f"the window slid from seg{newest_before} to seg{int(found.group(1))}: skipped"
    return None


def last_segment(text: bytes) -> int | None:
    found = _SEGMENT_URI.findall(text)
    return int(found[-1]) if found else None


def _parse_date(raw: bytes) -> float:
    return datetime.fromisoformat(raw.decode().replace("Z", "+00:00")).timestamp()


# -- HTTP ------------------------------------------------------------------------------------------
class HttpError(Exception):
    pass


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (``get``)."""

    def __init__(self, host: str) -> None:
        self._host = host.encode()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None
        self._header_end = -1
        self._length = -1
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HttpError(f"connection lost: {exc or 'closed by server'}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._header_end < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._header_end = end + 4
            found = _CONTENT_LENGTH.search(bytes(self._buffer[:end]).lower())
            if found is None:
                self._fail("response without Content-Length")
                return
            self._length = int(found.group(1))
            if self._length > MAX_RESPONSE_BYTES:
                self._fail("response too large")
                return
        if len(self._buffer) - self._header_end >= self._length:
            status = int(self._buffer[9:12])
            body = bytes(self._buffer[self._header_end:self._header_end + self._length])
            del self._buffer[:self._header_end + self._length]
            self._header_end = self._length = -1
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((status, body, time.time()))

    def _fail(self, message: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HttpError(message))
        self.close()

    async def get(self, path: str, timeout: float = RESPONSE_TIMEOUT) -> tuple[int, bytes, float]:
        """(status, body, epoch time the last byte arrived). Raises HttpError or TimeoutError."""
        if self.closed or self._transport is None:
            raise HttpError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + self._host +
                              b"\r\nUser-Agent: livedge-bench\r\n\r\n")
        try:
            return await asyncio.wait_for(self._waiter, timeout)
        except TimeoutError:
            self.close()
            raise

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


# -- viewers ---------------------------------------------------------------------------------------
@dataclass
class ViewerStats:
    """What every follower of this process saw; merged into one JSON report."""

    playlists: int = 0
    parts: int = 0
    part_bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    statuses: dict[str, int] = field(default_factory=dict)  # non-200 status -> count
    server_errors: int = 0  # 5xx answers
    sequence_problems: list[str] = field(default_factory=list)  # first few
    # One per part fetched while measuring: (playlist, msn, part, reload answered, bytes received,
    # production estimate); epoch seconds.
    records: list[tuple[str, int, int, float, float, float]] = field(default_factory=list)
    joined: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def status(self, code: int) -> None:
        self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1
        if code >= 500:
            self.server_errors += 1


@dataclass(frozen=True)
class FollowSettings:
    host: str
    port: int
    measure_from: float  # epoch seconds: record latencies only after this (warm-up)
    stop_at: float  # epoch seconds
    fetch_parts: bool = True
    rejoin_on_error: bool = True  # soak: a stream that went away may come back


async def follow(playlist: str, settings: FollowSettings, stats: ViewerStats) -> None:
    """Follow ``/hls/<playlist>/index.m3u8`` until ``settings.stop_at``. Errors are counted and the
    follower rejoins (after a short pause) rather than giving up."""
    base = f"/hls/{playlist}"
    playlists = parts = None
    newest_seen: tuple[int, int] | None = None
    hint: tuple[int, int] | None = None
    last_msn_seen: int | None = None
    try:
        while time.time() < settings.stop_at:
            try:
                if playlists is None or playlists.closed:
                    playlists = await HttpConnection.open(settings.host, settings.port)
                if settings.fetch_parts and (parts is None or parts.closed):
                    parts = await HttpConnection.open(settings.host, settings.port)
                query = f"?_HLS_msn={hint[0]}&_HLS_part={hint[1]}" if hint else ""
                status, body, answered = await playlists.get(f"{base}/index.m3u8{query}")
            except (OSError, HttpError, TimeoutError) as error:
                stats.error(type(error).__name__)
                hint = last_msn_seen = None  # rejoin: the stream may have been restarted
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            stats.playlists += 1
            if status != 200:
                stats.status(status)
                hint = last_msn_seen = None
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            problem = continuity_problem(body, last_msn_seen)
            if problem is not None and len(stats.sequence_problems) < 20:
                stats.sequence_problems.append(f"{playlist}: {problem}")
            newest_segment = last_segment(body)
            if newest_segment is not None:
                last_msn_seen = newest_segment
            listed = listed_parts(body)
            if hint is None:  # joining: start at the live edge, fetch nothing old
                stats.joined += 1
                newest_seen = (listed[-1].msn, listed[-1].index) if listed else None
                hint = preload_hint(body)
                if hint is None:  # joined an ended playlist: look again in a moment
                    last_msn_seen = None
                    await asyncio.sleep(0.5)
                continue
            hint = preload_hint(body)
            if hint is None:  # ended playlist: rejoin later (a returning publisher)
                if not settings.rejoin_on_error:
                    return
                last_msn_seen = None
                await asyncio.sleep(0.5)
                continue
            fresh = [p for p in listed if newest_seen is None or (p.msn, p.index) > newest_seen]
            if fresh:
                newest_seen = (fresh[-1].msn, fresh[-1].index)
            measuring = answered >= settings.measure_from
            if not settings.fetch_parts:
                continue
            for part in fresh:
                try:
                    status, data, received = await parts.get(
                        f"{base}/part{part.msn}.{part.index}.m4s")
                except (OSError, HttpError, TimeoutError) as error:
                    stats.error(type(error).__name__)
                    break
                if status != 200:
                    stats.status(status)
                    continue
                stats.parts += 1
                stats.part_bytes += len(data)
                if measuring:
                    stats.records.append((playlist, part.msn, part.index, answered, received,
                                          part.produced_at))
    finally:
        for connection in (playlists, parts):
            if connection is not None:
                connection.close()


async def loop_lag_probe(stop_at: float, lags: list[float], interval: float = 0.1) -> None:
    """How late this process's own event loop runs a timer: the generator's saturation."""
    loop = asyncio.get_running_loop()
    while time.time() < stop_at:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        lags.append(loop.time() - due)


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def latencies(records: list[tuple[str, int, int, float, float, float]]) -> dict:
    """Delivery figures from the fetch records, by playlist and over all.

    A part's listing time is the first moment any follower of its playlist in this process had a
    blocking reload answered with it listed: the earliest evidence of the part, on this clock.
    ``delivery``: bytes received by a viewer - that listing time (every follower's reload wait,
    its part GET and this generator's own delays). ``fetch``: received - that viewer's own reload
    answer (the part GET alone). ``listing_vs_media_clock``: listing - the production estimate
    from the playlist's dates; near-constant per playlist (-10 to +50 ms idle) unless the node lists
    parts late."""
    first_listed: dict[tuple[str, int, int], float] = {}
    for playlist, msn, index, answered, _, _ in records:
        key = (playlist, msn, index)
        if answered < first_listed.get(key, float("inf")):
            first_listed[key] = answered
    delivery: dict[str, list[float]] = {}
    fetch: list[float] = []
    for playlist, msn, index, answered, received, produced in records:
        listed = first_listed[(playlist, msn, index)]
        delivery.setdefault(playlist, []).append(received - listed)
        fetch.append(received - answered)
    listing = [first_listed[(playlist, msn, index)] - produced
               for playlist, msn, index, _, _, produced in records]
    return {
        "delivery": {**summary([v for values in delivery.values() for v in values]),
                     "by_playlist": {name: summary(values)
                                     for name, values in sorted(delivery.items())}},
        "fetch": summary(fetch),
        "listing_vs_media_clock": summary(listing),
    }


def summary(values: list[float]) -> dict:
    return {"count": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "max": max(values, default=None)}


async def run_viewers(url: str, playlists: list[str], viewers: int, seconds: float, warmup: float,
                      ramp: float, audio: str | None, fetch_parts: bool = True) -> dict:
    """``viewers`` viewers spread round-robin over ``playlists`` (each also following ``audio`` of
    its stream when given), joining over ``ramp`` seconds; measured for ``seconds`` after
    ``warmup``. Returns the report (JSON-able)."""
    parsed = urlsplit(url)
    started = time.time()
    measure_from = started + ramp + warmup
    settings = FollowSettings(parsed.hostname or "127.0.0.1", parsed.port or 80, measure_from,
                              measure_from + seconds, fetch_parts)
    stats = ViewerStats()
    lags: list[float] = []
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    tasks = [asyncio.create_task(loop_lag_probe(settings.stop_at, lags))]
    for number in range(viewers):
        playlist = playlists[number % len(playlists)]
        tasks.append(asyncio.create_task(follow(playlist, settings, stats)))
        if audio:
            stream = playlist.split("/")[0]
            tasks.append(asyncio.create_task(follow(f"{stream}/{audio}", settings, stats)))
        if ramp:
            await asyncio.sleep(ramp / viewers)
    await asyncio.gather(*tasks)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.time() - started
    cpu = (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    report = asdict(stats)
    report.update(latencies(report.pop("records")))
    report["generator_cpu"] = cpu / wall
    report["generator_loop_lag_p99"] = percentile(lags, 0.99)
    report["viewers"] = viewers
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--playlist", action="append", required=True,
                        help="stream/rendition to follow (repeat; viewers are spread over them)")
    parser.add_argument("--audio", default="audio", help="audio rendition also followed ('' none)")
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--ramp", type=float, default=3.0)
    args = parser.parse_args()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    report = runner(run_viewers(args.url, args.playlist, args.viewers, args.seconds, args.warmup,
                                args.ramp, args.audio or None))
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
