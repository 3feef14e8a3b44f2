"""Pull a stream from any URL FFmpeg can read (file, rtsp://, srt://, http://, a lavfi graph) and feed
its decoded frames to a frame consumer (normally a ``LadderTranscoder``).

The source is given the consumer itself, not a factory: one consumer spans every reconnect, so its
tracks, output clock and encoders persist and a reconnect is just ``consumer.discontinuity()``. The
source owns the consumer's end: when ``run()`` returns, it has called ``consumer.close()``.

Demuxing and decoding run in a thread per connection (PyAV blocks); the coroutine ``run()`` only
sequences connections and backoff. Errors never escape ``run()``: opening or reading failures, a URL
that is not media, an input that ended, all become ``state = BACKOFF`` with ``last_error`` set, then
a reconnect after 0.5 s doubling to 10 s (back to 0.5 s after a connection that stayed up a minute).
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import av

LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "rtp", "tcp"})
HTTP_SCHEMES = frozenset({"http", "https"})
# Demuxers FFmpeg picks for things that are not media: "tty" renders any *.txt file as ANSI-art video.
NON_MEDIA_FORMATS = frozenset({"tty"})
MAX_CONSECUTIVE_DECODE_ERRORS = 50  # then the input is declared broken
MAX_PACING_WAIT = 1.0  # seconds; a longer wait means the input jumped ahead: re-anchor, don't stall


class FrameConsumer(Protocol):
    """What a source drives; ``LadderTranscoder`` is one. Called from the source's decode thread."""

    def hint_frame_rate(self, frames_per_second: float | None) -> None: ...
    def push_video(self, frame: av.VideoFrame) -> None: ...
    def push_audio(self, frame: av.AudioFrame) -> None: ...
    def discontinuity(self) -> None: ...
    def close(self) -> None: ...


class SourceState(enum.Enum):
    CONNECTING = "connecting"  # opening the input, no frame yet
    LIVE = "live"  # frames are flowing
    BACKOFF = "backoff"  # the last connection failed or ended; waiting before the next
    STOPPED = "stopped"  # stop() was called and run() has finished (or has not started)


class SourceError(Exception):
    """The input opened but is unusable (no stream, nothing decodable)."""


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays, in seconds."""

    initial: float = 0.5
    maximum: float = 10.0
    healthy_after: float = 60.0  # a connection live this long resets the delay to ``initial``


class PullSource:
    """Pulls ``url`` into ``consumer`` until ``stop()``.

    ``realtime``: pace reading to the media clock (like ``ffmpeg -re``); None paces only inputs that
    are not live (see ``is_live_input``). ``loop_input``: at the end of a non-live input, start it
    again seamlessly (no discontinuity; the consumer's timeline absorbs the jump back); otherwise the
    end of input is handled like a dropped connection. ``open_timeout``/``read_timeout`` (seconds)
    bound every blocking open and read, so a dead URL never hangs a thread.
    """

    def __init__(self, url: str, consumer: FrameConsumer, *, format: str | None = None,
                 options: Mapping[str, str] | None = None, realtime: bool | None = None,
                 loop_input: bool = False, open_timeout: float = 10.0, read_timeout: float = 10.0,
                 backoff: Backoff = Backoff()) -> None:
        self.url = url
        self.consumer = consumer
        self.format = format
        self.options = {**network_options(url, read_timeout), **(options or {})}
        self.realtime = realtime
        self.loop_input = loop_input
        self.timeouts = (open_timeout, read_timeout)
        self.backoff = backoff
        self.state = SourceState.STOPPED
        self.last_error: str | None = None
        self.connections = 0  # connections finished (failed, ended or stopped)
        self._stop = threading.Event()  # read by the decode thread
        self._wake: asyncio.Event | None = None  # cuts a backoff wait short on stop()
        self._live_since: float | None = None  # monotonic seconds
        self._started = False

    def process_video(self, frame: av.VideoFrame) -> av.VideoFrame:
        """Hook for subclasses, on the decode thread: change or replace a decoded frame."""
        return frame

    def stop(self) -> None:
        """Ask ``run()`` to finish; returns at once. Safe to call from the event loop thread."""
        self._stop.set()
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Connect, pull, reconnect, until ``stop()`` (or cancellation). Then close the consumer and
        return. A source runs once: its consumer is closed afterwards."""
        if self._started:
            raise RuntimeError("a PullSource runs only once")
        self._started = True
        self._wake = asyncio.Event()
        if self._stop.is_set():
            self._wake.set()
        loop = asyncio.get_running_loop()
        delay = self.backoff.initial
        try:
            while not self._stop.is_set():
                self.state = SourceState.CONNECTING
                self._live_since = None
                error = await self._in_thread(loop, self._connection, self.connections > 0)
                self.connections += 1
                if self._stop.is_set():
                    break
                if self._live_since is not None and \
                        time.monotonic() - self._live_since >= self.backoff.healthy_after:
                    delay = self.backoff.initial
                self.last_error = redact(error, self.url) if error else "end of input"
                self.state = SourceState.BACKOFF
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.backoff.maximum)
        finally:
            self.stop()  # also on cancellation: the consumer must not be fed while it closes
            await self._in_thread(loop, self._close_consumer)
            self.state = SourceState.STOPPED

    async def _in_thread(self, loop: asyncio.AbstractEventLoop, target: Callable[..., str | None],
                         *args: object) -> str | None:
        """Run ``target`` in a new thread; its return value or exception, as an error string."""
        done = loop.create_future()

        def body() -> None:
            try:
                result = target(*args)
            except Exception as exc:  # noqa: BLE001 - every failure becomes last_error
                result = f"{type(exc).__name__}: {exc}"
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        threading.Thread(target=body, name="pull-source", daemon=True).start()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stop()
            await done  # the thread ends within a read timeout
            raise

    def _close_consumer(self) -> None:
        self.consumer.close()

    # -- the decode thread -------------------------------------------------------------------------

    def _connection(self, reconnect: bool) -> str | None:
        """One connection: open, pull until the end or stop(). Returns None at the end of input;
        raises on failure."""
        first = True
        while not self._stop.is_set():
            container = self._open()
            try:
                live = is_live_input(self.url, container)
                pacer = Pacer(self._stop) if (self.realtime if self.realtime is not None
                                              else not live) else None
                if first and reconnect:
                    self.consumer.discontinuity()
                frames = pump(container, self.consumer, pacer, self._stop, self.process_video,
                              on_first_frame=self._mark_live if first else None)
            finally:
                container.close()
            if frames == 0:
                raise SourceError("no frame could be decoded")
            first = False
            if not self.loop_input or live:
                return None
        return None

    def _open(self) -> av.container.InputContainer:
        started = time.monotonic()
        try:
            return av.open(self.url, format=self.format, options=dict(self.options),
                           timeout=self.timeouts)
        except av.FFmpegError as exc:
            waited = time.monotonic() - started
            if waited >= self.timeouts[0] * 0.9:  # FFmpeg reports an interrupted open vaguely
                raise SourceError(f"no answer within {self.timeouts[0]:g} s ({exc})") from exc
            raise

    def _mark_live(self) -> None:
        self._live_since = time.monotonic()
        self.state = SourceState.LIVE  # a single attribute store: safe from this thread


def pump(container: av.container.InputContainer, consumer: FrameConsumer, pacer: Pacer | None,
         stop: threading.Event, process_video: Callable[[av.VideoFrame], av.VideoFrame] = lambda f: f,
         on_first_frame: Callable[[], None] | None = None) -> int:
    """Demux and decode ``container``'s first video and first audio stream into ``consumer`` until
    the input ends or ``stop`` is set; returns the number of frames pushed. Isolated decode errors
    are skipped (live inputs lose packets); ``MAX_CONSECUTIVE_DECODE_ERRORS`` in a row raise."""
    if container.format.name in NON_MEDIA_FORMATS:
        raise SourceError(f"not a media stream (FFmpeg reads it as {container.format.long_name})")
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None
    streams = [s for s in (video, audio) if s is not None]
    if not streams:
        raise SourceError("the input has no audio or video stream")
    if video is not None:
        # Frame threads decode on the cores the encoders leave idle, for (threads - 1) frames of delay.
        video.thread_type = "AUTO"
        # From a pipe, average_rate is computed from the first frame alone: prefer guessed_rate.
        rate = video.guessed_rate or video.average_rate
        consumer.hint_frame_rate(float(rate) if rate else None)
    frames = 0
    errors_in_a_row = 0
    for packet in container.demux(streams):
        if stop.is_set():
            break
        if pacer is not None and packet.dts is not None and packet.time_base is not None:
            pacer.wait(float(packet.dts * packet.time_base))
        if packet.stream is video and packet.size:
            push_packet = getattr(consumer, "push_video_packet", None)
            if push_packet is not None:
                push_packet(packet, video)
        try:
            decoded = packet.decode()
        except av.FFmpegError as exc:
            errors_in_a_row += 1
            if errors_in_a_row >= MAX_CONSECUTIVE_DECODE_ERRORS:
                raise SourceError(f"{errors_in_a_row} decode errors in a row, last: {exc}") from exc
            continue
        errors_in_a_row = 0
        for frame in decoded:
            if frames == 0 and on_first_frame is not None:
                on_first_frame()
            frames += 1
            if isinstance(frame, av.VideoFrame):
                consumer.push_video(process_video(frame))
            else:
                consumer.push_audio(frame)
    return frames


class Pacer:
    """Holds the decode thread back so media time advances no faster than wall time (``-re``).

    ``arrived_at`` (``time.monotonic()``): when the input's first bytes arrived, for an input that
    is opened after it started arriving (a publisher's byte stream). The clock then starts there,
    and the media that arrived while the input was opened is let through at once, as late as it
    is, instead of being spread out and keeping that delay for good."""

    def __init__(self, stop: threading.Event, arrived_at: float | None = None) -> None:
        self._stop = stop
        self._arrived_at = arrived_at
        self._origin: float | None = None  # monotonic time of media time 0
        self._forgiven = 0.0  # lateness let through without re-anchoring (the opening's)

    def wait(self, media_time: float) -> None:
        """Return when ``media_time`` (seconds) is due, or at once if the clock jumped, or on stop."""
        now = time.monotonic()
        if self._origin is None:
            started = now if self._arrived_at is None else min(self._arrived_at, now)
            self._origin = started - media_time
            self._forgiven = now - started
            return
        delay = self._origin + media_time - now
        if delay > MAX_PACING_WAIT or delay < -(MAX_PACING_WAIT + self._forgiven):
            self._origin = now - media_time  # a jump (loop, gap) or a stall
            self._forgiven = 0.0
        elif delay > 0:
            self._forgiven = 0.0  # caught up with the opening's backlog
            self._stop.wait(delay)


def is_live_input(url: str, container: av.container.InputContainer) -> bool:
    """True for inputs that produce media in real time themselves (rtsp, srt, rtmp, udp, ... and
    http(s) without a known duration); False for files and lavfi graphs, which read as fast as asked."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in LIVE_SCHEMES:
        return True
    if scheme in HTTP_SCHEMES:
        return container.duration is None
    return False


def redact(message: str, url: str) -> str:
    """``message`` with ``url``'s password (FFmpeg quotes the URL in its errors) masked, since
    ``last_error`` ends up on status pages and in logs."""
    parts = urlsplit(url)
    if not parts.password:
        return message
    return message.replace(url, parts._replace(
        netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl())


def network_options(url: str, read_timeout: float) -> dict[str, str]:
    """FFmpeg options bounding network I/O for ``url`` (microseconds), plus RTSP over TCP."""
    scheme = urlsplit(url).scheme.lower()
    microseconds = str(int(read_timeout * 1_000_000))
    if scheme in ("rtsp", "rtsps"):
        # UDP through NAT and firewalls loses packets or never arrives; TCP interleaving just works.
        return {"rtsp_transport": "tcp", "timeout": microseconds}
    if scheme in LIVE_SCHEMES | HTTP_SCHEMES:
        return {"rw_timeout": microseconds}
    return {}
