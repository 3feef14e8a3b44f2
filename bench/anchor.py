"""The anchor of ``bench.waiters``: the least a Python process can do per blocking reload.

PERF-NOTES measured "raw asyncio.Protocol + uvloop" holding blocking playlist reloads on its
machine (10,000 waiters: p99 135 ms). Machines differ by two or three times in what one Python
process answers a second (bench/README.md), so ``bench.waiters --anchor`` runs this server beside
the node, in the same run and with the same generator, and reports both: the node's figure as a
ratio to what this machine allows a Python process.

``bench.serve`` uses it the same way for cached objects (``--objects DIR``: each file of DIR,
head and body joined once, written whole for each request).

What it does, and nothing more: one process, uvloop, an ``asyncio.Protocol`` per connection; a part
every ``--part`` seconds on the loop's clock (no media: the playlist is text made once per part,
padded to the node's answer size); a request is split on spaces and ``&``, with no header read; a
reload for a part not produced yet waits in a list for its part, and one write answers each
waiter. No limits, ids, metrics, CORS, tokens or read deadlines, which the node has.

    .venv/bin/python -m bench.anchor --port 8080 [--part 0.333] [--answer-bytes 1862] [--objects DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from email.utils import formatdate
from pathlib import Path

SEGMENT_SECONDS = 2.0
WINDOW_SEGMENTS = 6
PLAYLIST_PATH = b"/hls/demo/180p/index.m3u8"
MULTIVARIANT = (b"#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-STREAM-INF:BANDWIDTH=300000,"
                b"RESOLUTION=320x180\n180p/index.m3u8\n")


def _head(status: str, content_type: str, length: int) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
            "Cache-Control: no-cache\r\n\r\n").encode()


def _date(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class Playlist:
    """The live window: parts produced on a grid, rendered once per part."""

    def __init__(self, part_seconds: float, answer_bytes: int) -> None:
        self.part_seconds = part_seconds
        self.parts_per_segment = max(1, round(SEGMENT_SECONDS / part_seconds))
        self.answer_bytes = answer_bytes
        self.produced = -1  # parts produced, counted from 0
        # Part k is produced at the end of its time: the playlist dates segment 0 one part
        # before the first part's production.
        self.started_at = time.time() - part_seconds
        self.answer = b""

    def newest(self) -> tuple[int, int]:
        return divmod(self.produced, self.parts_per_segment)

    def produce(self) -> None:
        self.produced += 1
        self.answer = self._render()

    def _render(self) -> bytes:
        msn, index = self.newest()
        first = max(0, msn - WINDOW_SEGMENTS)
        duration = f"{self.part_seconds:.5f}"
        segment = self.part_seconds * self.parts_per_segment
        lines = ["#EXTM3U", "#EXT-X-VERSION:9", f"#EXT-X-TARGETDURATION:{round(segment)}",
                 f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK="
                 f"{3 * self.part_seconds:.3f}",
                 f"#EXT-X-PART-INF:PART-TARGET={self.part_seconds:.3f}",
                 f"#EXT-X-MEDIA-SEQUENCE:{first}", '#EXT-X-MAP:URI="init.mp4"']
        for number in range(first, msn + 1):
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(self.started_at + number * segment)}")
            last = index if number == msn else self.parts_per_segment - 1
            if number >= msn - 1:
                lines += [f'#EXT-X-PART:DURATION={duration},URI="part{number}.{i}.m4s"'
                          + (",INDEPENDENT=YES" if i == 0 else "") for i in range(last + 1)]
            if number < msn or last == self.parts_per_segment - 1:
                lines += [f"#EXTINF:{segment:.5f},", f"seg{number}.m4s"]
        following = divmod(self.produced + 1, self.parts_per_segment)
        lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part{following[0]}.{following[1]}.m4s"')
        body = "\n".join(lines) + "\n"
        padding = self.answer_bytes - len(body) - 3
        if padding > 0:  # the node's answer is this long: as many bytes to send
            body = body.replace("\n", "\n##" + "-" * padding + "\n", 1)
        body_bytes = body.encode()
        return _head("200 OK", "application/vnd.apple.mpegurl", len(body_bytes)) + body_bytes


class Anchor:
    """The waiters, by the part they wait for, the part clock, and objects held in memory."""

    def __init__(self, playlist: Playlist, objects: dict[bytes, bytes] | None = None) -> None:
        self.playlist = playlist
        self.objects = objects or {}  # path -> the whole answer, head and body
        self.waiting: dict[tuple[int, int], list[asyncio.Transport]] = {}
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()

    def start(self) -> None:
        self._tick()

    def _tick(self) -> None:
        self.playlist.produce()
        newest, answer = self.playlist.newest(), self.playlist.answer
        for part in [part for part in self.waiting if part <= newest]:
            for transport in self.waiting.pop(part):
                if not transport.is_closing():  # its client left while it waited
                    transport.write(answer)
        due = self._started + (self.playlist.produced + 1) * self.playlist.part_seconds
        self._loop.call_at(due, self._tick)

    def request(self, transport: asyncio.Transport, target: bytes) -> None:
        path, _, query = target.partition(b"?")
        if path == PLAYLIST_PATH:
            asked = None
            if query:
                values = dict(pair.partition(b"=")[::2] for pair in query.split(b"&"))
                asked = (int(values[b"_HLS_msn"]), int(values.get(b"_HLS_part", b"0")))
            if asked is not None and asked > self.playlist.newest():
                self.waiting.setdefault(asked, []).append(transport)
            else:
                transport.write(self.playlist.answer)
        elif path == b"/hls/demo/index.m3u8":
            transport.write(_head("200 OK", "application/vnd.apple.mpegurl", len(MULTIVARIANT))
                            + MULTIVARIANT)
        elif path in self.objects:
            transport.write(self.objects[path])
        elif path == b"/healthz":
            transport.write(_head("200 OK", "text/plain", 2) + b"ok")
        else:
            transport.write(_head("404 Not Found", "text/plain", 0))


class Connection(asyncio.Protocol):
    def __init__(self, anchor: Anchor) -> None:
        self.anchor = anchor
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            target = head.split(b" ", 2)[1]
            self.anchor.request(self.transport, target)  # type: ignore[arg-type]


def load_objects(directory: Path) -> dict[bytes, bytes]:
    """Every file of ``directory`` as an answer to ``GET /hls/demo/180p/{its name}``."""
    objects = {}
    for file in sorted(directory.iterdir()):
        body = file.read_bytes()
        objects[f"/hls/demo/180p/{file.name}".encode()] = \
            _head("200 OK", "video/mp4", len(body)) + body
    return objects


async def serve(host: str, port: int, part_seconds: float, answer_bytes: int,
                objects: dict[bytes, bytes]) -> None:
    anchor = Anchor(Playlist(part_seconds, answer_bytes), objects)
    anchor.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(anchor), host, port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"anchor on {host}:{port} at {formatdate(usegmt=True)}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--part", type=float, default=1 / 3, help="part duration, seconds")
    parser.add_argument("--answer-bytes", type=int, default=1862,
                        help="bytes of a playlist answer's body (the node's, by default)")
    parser.add_argument("--objects", type=Path,
                        help="a directory whose files are served as objects of the rendition")
    args = parser.parse_args()
    import uvloop
    objects = load_objects(args.objects) if args.objects else {}
    uvloop.run(serve(args.host, args.port, args.part, args.answer_bytes, objects))


if __name__ == "__main__":
    main()
