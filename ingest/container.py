"""Incremental demuxing of a container byte stream that arrives in pieces (a WebSocket publisher).

Three parts, each usable alone:

* ``probe_container(head)``: pure. Names the container from its first bytes (WebM/Matroska,
  MPEG-TS, fragmented MP4), asks for more bytes, or rejects the input. We probe ourselves instead of
  letting FFmpeg guess, because FFmpeg's guess over a few hundred arbitrary bytes may be any of its
  hundreds of demuxers (an HTML page reads as "tty" text-as-video); only these three stream from a
  pipe.
* ``ByteStreamReader``: a bounded pipe. The network side ``feed()``s bytes without ever blocking; a
  PyAV demuxer thread ``read()``s them, blocking until bytes, the end of input or ``abort()``. When
  the buffer is full, ``feed()`` says so and the network side must stop taking bytes from its socket
  until ``on_room`` is called: the socket's receive window then closes and TCP slows the publisher
  down (back-pressure) instead of memory growing.
* ``ContainerDemuxer``: opens the reader with PyAV in the calling thread (the caller starts one)
  with a small probe, so decoding starts after a few KiB rather than FFmpeg's default 5 MB / 5 s,
  and decodes into a frame consumer (a ``LadderTranscoder``), paced to the media clock by default.
  The clock starts when the first bytes arrived: the media that came in while the input was being
  opened is decoded at once, so the time opening took is not kept as latency for the whole
  publish.

The frame rate a consumer is told (``decide_frame_rate``) is measured from the first decoded
frames' timestamps, not taken from FFmpeg's guess at opening: a small probe holds less than one
large keyframe, and then FFmpeg's ``r_frame_rate`` is the H.264 field rate (20 for a 10 fps
source); a browser's WebM has a millisecond time base and no nominal rate at all. The first
``FRAME_RATE_FRAMES`` video frames are held back for it (a tenth of a second at 30 fps), never more
than ``FRAME_RATE_HOLD_SECONDS`` of media or ``FRAME_RATE_HOLD_BYTES`` of pictures.
"""

from __future__ import annotations

import collections
import enum
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction

import av

from ingest.pull import FrameConsumer, Pacer, SourceError, pump

TS_PACKET = 188
TS_PACKETS_TO_PROBE = 3  # sync bytes at 0, 188 and 376: random bytes match once in 16.7 million
PROBE_HEAD_BYTES = TS_PACKET * TS_PACKETS_TO_PROBE  # the most bytes probe_container ever needs
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
# Top-level ISO BMFF boxes a fragmented MP4 stream may start with.
MP4_FIRST_BOXES = frozenset({b"ftyp", b"styp", b"moov", b"moof", b"free", b"skip", b"sidx"})
PROBE_BYTES = 32 * 1024  # FFmpeg's probesize while opening: enough for headers and a first keyframe
ANALYZE_SECONDS = 0.5  # FFmpeg's analyzeduration while opening
READ_CHUNK = 32 * 1024  # bytes PyAV asks for per read (its I/O buffer)
MIN_FRAME_RATE, MAX_FRAME_RATE = 1.0, 120.0  # a rate outside this is not believed
FRAME_RATE_FRAMES = 4  # video frames whose timestamps decide the frame rate: 3 intervals, so
# one odd interval (a browser's first frame often comes late) is outvoted
FRAME_RATE_HOLD_SECONDS = 0.5  # video time held at most before deciding with fewer frames
FRAME_RATE_HOLD_BYTES = 64 * 1024 * 1024  # decoded pictures held at most (four 4K frames: 50 MB)
FRAME_RATE_HOLD_FRAMES = 64  # frames (audio included) held at most, should none carry a time
RATE_AGREEMENT = 0.05  # a nominal rate within 5 % of the measured one is taken as exact
# Without one, a measured rate within 5 % of a common rate is taken as that rate: 3 intervals of
# timestamps a few milliseconds late (a browser's) can be that far off. NTSC rates are absent on
# purpose: such timestamps cannot tell 29.97 from 30, and 30 is what browsers capture at.
COMMON_FRAME_RATES = (10.0, 12.0, 15.0, 20.0, 24.0, 25.0, 30.0, 48.0, 50.0, 60.0, 90.0, 120.0)
RATE_SNAP = 0.02  # else a measured rate within 2 % of a whole number is rounded to it
INTERVAL_OUTLIER = 0.2  # a frame interval this far (relative) from the median is not measured


class ContainerFormat(enum.Enum):
    """A container we demux, valued by the FFmpeg demuxer name that opens it."""

    MATROSKA = "matroska"  # also WebM (browser MediaRecorder)
    MPEGTS = "mpegts"
    MP4 = "mp4"  # fragmented MP4 (or any MP4 whose moov comes before its media)


_UNSUPPORTED = "not WebM/Matroska, MPEG-TS or fragmented MP4"


class UnsupportedMedia(Exception):
    """The bytes are not a container we can probe, or opening/decoding them failed. The message is
    safe to show to the publisher."""


def probe_container(head: bytes) -> ContainerFormat | None:
    """The container ``head`` (the first bytes of the stream, any length) starts; ``None`` when more
    bytes are needed to tell (never more than ``PROBE_HEAD_BYTES``). Raises ``UnsupportedMedia``
    when it is none of the supported containers."""
    if head[:len(EBML_MAGIC)] == EBML_MAGIC[:len(head)]:
        return ContainerFormat.MATROSKA if len(head) >= len(EBML_MAGIC) else None
    if head[:1] == b"\x47":
        for offset in range(TS_PACKET, min(len(head), PROBE_HEAD_BYTES), TS_PACKET):
            if head[offset] != 0x47:
                raise UnsupportedMedia("not MPEG-TS: lost packet sync in the first packets")
        return ContainerFormat.MPEGTS if len(head) > TS_PACKET * (TS_PACKETS_TO_PROBE - 1) else None
    if len(head) < 8:
        # An MP4 box starts with its 32-bit size; a header box is under 16 MiB, so byte 0 is 0.
        if head[:1] not in (b"", b"\x00"):
            raise UnsupportedMedia(_UNSUPPORTED)
        return None
    size = int.from_bytes(head[:4], "big")
    if head[4:8] in MP4_FIRST_BOXES and (size == 1 or size >= 8):
        return ContainerFormat.MP4
    raise UnsupportedMedia(_UNSUPPORTED)


class ByteStreamReader:
    """A bounded, thread-safe byte pipe: ``feed``/``end_input``/``abort`` from one side (any thread,
    never blocking), ``read`` from the demuxer thread (blocking).

    ``capacity`` (bytes) is where ``feed`` starts answering False; the buffer holds at most
    ``capacity`` plus the last piece fed, because a writer that honours the answer stops there.
    ``on_room`` is called on the reading thread, once per time the writer was told "full", when the
    buffer has drained to ``low_water`` bytes (half the capacity by default)."""

    def __init__(self, capacity: int, on_room: Callable[[], None] | None = None,
                 low_water: int | None = None) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.low_water = capacity // 2 if low_water is None else low_water
        self._on_room = on_room
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of _chunks[0] already read
        self._buffered = 0
        self._ended = False  # no more input after the buffered bytes
        self._aborted = False  # reads return b"" at once, buffered bytes are dropped
        self._writer_told_full = False
        self._changed = threading.Condition()
        self.bytes_fed = 0
        self.bytes_read = 0
        self.first_byte_at: float | None = None  # time.monotonic() of the first byte fed

    @property
    def buffered(self) -> int:
        """Bytes fed and not read yet."""
        return self._buffered

    def has_room(self) -> bool:
        return self._buffered < self.capacity

    def feed(self, data: bytes) -> bool:
        """Append ``data``; returns whether the writer may feed more now. After False, wait for
        ``on_room`` (or poll ``has_room``). Bytes fed after ``end_input``/``abort`` are dropped."""
        with self._changed:
            if self._ended or self._aborted:
                return False
            if data:
                if self.first_byte_at is None:
                    self.first_byte_at = time.monotonic()
                self._chunks.append(bytes(data))
                self._buffered += len(data)
                self.bytes_fed += len(data)
                self._changed.notify_all()
            room = self._buffered < self.capacity
            if not room:
                self._writer_told_full = True
            return room

    def end_input(self) -> None:
        """No more bytes will come: ``read`` returns what is buffered, then b"" (end of file)."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def abort(self) -> None:
        """Stop now: drop what is buffered; every ``read``, pending or later, returns b""."""
        with self._changed:
            self._aborted = True
            self._chunks.clear()
            self._buffered = self._offset = 0
            self._changed.notify_all()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all buffered when negative), blocking until at least one byte is
        buffered; b"" at the end of input or after ``abort``. The file-like method PyAV calls."""
        notify = False
        with self._changed:
            while not self._buffered and not self._ended and not self._aborted:
                self._changed.wait()
            if self._aborted or not self._buffered:
                return b""
            wanted = self._buffered if size < 0 else min(size, self._buffered)
            pieces = []
            while wanted:
                chunk = self._chunks[0]
                take = min(wanted, len(chunk) - self._offset)
                pieces.append(chunk[self._offset:self._offset + take])
                self._offset += take
                wanted -= take
                if self._offset == len(chunk):
                    self._chunks.popleft()
                    self._offset = 0
            data = b"".join(pieces)
            self._buffered -= len(data)
            self.bytes_read += len(data)
            if self._writer_told_full and self._buffered <= self.low_water:
                self._writer_told_full = False
                notify = True
        if notify and self._on_room is not None:
            self._on_room()  # outside the lock: the callback may feed
        return data


def nominal_frame_rates(stream: av.video.stream.VideoStream) -> tuple[Fraction | None, ...]:
    """What a video stream announces as its frame rate, best first: the codec's own (the H.264
    SPS timing), FFmpeg's ``r_frame_rate`` guess, the average rate. Any may be missing or wrong:
    read from a pipe, a fragmented MP4's average rate comes from its first frame alone, whose
    duration also holds the audio priming (18.3 fps for a 30 fps stream); with a short probe the
    guess is the field rate; Matroska's millisecond time base can make either guess 1000."""
    return (stream.codec_context.framerate, stream.guessed_rate, stream.average_rate)


def decide_frame_rate(frame_times: Sequence[float],
                      nominal: Sequence[Fraction | float | None]) -> float | None:
    """Frames per second from the first video frames' presentation times (seconds), or None when
    neither they nor ``nominal`` tell anything believable.

    The measured rate is the mean of the intervals between the frames that are within
    ``INTERVAL_OUTLIER`` of their median (a late first frame does not count). The closest
    ``nominal`` rate within ``RATE_AGREEMENT`` of it wins, because it is exact (29.97, not 30.3
    from millisecond timestamps); else the nearest of ``COMMON_FRAME_RATES`` within
    ``RATE_AGREEMENT`` (so 29.97 becomes 30), else the measured rate, rounded to a whole number
    when within ``RATE_SNAP``. With fewer than two distinct times, the first believable nominal
    rate."""
    believable = [float(rate) for rate in nominal
                  if rate and MIN_FRAME_RATE <= float(rate) <= MAX_FRAME_RATE]
    times = sorted(frame_times)
    intervals = [later - earlier for earlier, later in zip(times, times[1:]) if later > earlier]
    if not intervals:
        return believable[0] if believable else None
    median = statistics.median(intervals)
    usual = [i for i in intervals if abs(i - median) <= INTERVAL_OUTLIER * median]
    measured = len(usual) / sum(usual)
    agreeing = [rate for rate in believable if abs(rate - measured) <= RATE_AGREEMENT * measured]
    if agreeing:
        return min(agreeing, key=lambda rate: abs(rate - measured))  # the first of equals
    if not MIN_FRAME_RATE <= measured <= MAX_FRAME_RATE:
        return believable[0] if believable else None
    common = min(COMMON_FRAME_RATES, key=lambda rate: abs(rate - measured))
    if abs(common - measured) <= RATE_AGREEMENT * measured:
        return common
    whole = round(measured)
    return float(whole) if abs(whole - measured) <= RATE_SNAP * measured else measured


class _WatchedConsumer:
    """Forwards to a ``FrameConsumer``, counting frames; after ``stop`` is set, frames are dropped
    (the consumer's owner may be closing it already).

    After ``hold_for_frame_rate``, frames are kept back (audio too, so the consumer sees them in
    the stream's order) until ``decide_frame_rate`` has its frames; then the consumer is told the
    rate and given them. ``pump``'s own hint (FFmpeg's guess) is dropped."""

    def __init__(self, consumer: FrameConsumer, stop: threading.Event) -> None:
        self._consumer = consumer
        self._stop = stop
        self.frames = 0
        self.last_frame_at: float | None = None  # time.monotonic()
        self._held: list[av.VideoFrame | av.AudioFrame] | None = None
        self._held_video = 0
        self._held_video_times: list[float] = []
        self._held_bytes = 0
        self._nominal: tuple[Fraction | None, ...] = ()

    def hold_for_frame_rate(self, nominal: tuple[Fraction | None, ...]) -> None:
        """Keep frames back until the frame rate is decided; ``nominal`` as ``decide_frame_rate``
        takes it."""
        self._nominal = nominal
        self._held = []

    def release(self) -> None:
        """Decide the frame rate with the frames held so far and hand them over (no-op unless
        holding)."""
        held, self._held = self._held, None
        if held is None:
            return
        self._consumer.hint_frame_rate(decide_frame_rate(self._held_video_times, self._nominal))
        for frame in held:
            if self._stop.is_set():
                return
            if isinstance(frame, av.VideoFrame):
                self._consumer.push_video(frame)
            else:
                self._consumer.push_audio(frame)

    def hint_frame_rate(self, frames_per_second: float | None) -> None:
        pass  # pump's hint is FFmpeg's guess; ours comes from release()

    def push_video(self, frame: av.VideoFrame) -> None:
        if self._stop.is_set():
            return
        self._seen()
        if self._held is None:
            self._consumer.push_video(frame)
            return
        self._held.append(frame)
        self._held_video += 1
        if frame.time is not None:
            self._held_video_times.append(frame.time)
        self._held_bytes += sum(plane.buffer_size for plane in frame.planes)
        self._release_when_decided()

    def push_audio(self, frame: av.AudioFrame) -> None:
        if self._stop.is_set():
            return
        self._seen()
        if self._held is None:
            self._consumer.push_audio(frame)
            return
        self._held.append(frame)
        self._release_when_decided()

    def _release_when_decided(self) -> None:
        # Video times only: a muxer may interleave audio far ahead of the video.
        times = self._held_video_times
        span = max(times) - min(times) if times else 0.0
        if self._held_video >= FRAME_RATE_FRAMES or span >= FRAME_RATE_HOLD_SECONDS \
                or self._held_bytes >= FRAME_RATE_HOLD_BYTES \
                or len(self._held or ()) >= FRAME_RATE_HOLD_FRAMES:
            self.release()

    def _seen(self) -> None:
        self.frames += 1
        self.last_frame_at = time.monotonic()


class ContainerDemuxer:
    """Decodes the first video and first audio stream of a container read from ``reader`` into
    ``consumer`` (``hint_frame_rate``/``push_video``/``push_audio`` only: the consumer's
    ``discontinuity`` and ``close`` belong to whoever owns it).

    ``realtime``: hold decoding back to the media clock, so a publisher sending faster than real
    time (ffmpeg without ``-re``) fills the reader and is slowed by back-pressure rather than racing
    the live window ahead of the wall clock. ``probe_bytes``/``analyze_seconds`` bound what FFmpeg
    reads before it returns from opening (codec parameters it has not seen by then come from the
    stream)."""

    def __init__(self, reader: ByteStreamReader, container_format: ContainerFormat,
                 consumer: FrameConsumer, *, realtime: bool = True, probe_bytes: int = PROBE_BYTES,
                 analyze_seconds: float = ANALYZE_SECONDS) -> None:
        self.reader = reader
        self.container_format = container_format
        self._stop = threading.Event()
        self._consumer = _WatchedConsumer(consumer, self._stop)
        self._realtime = realtime
        self._options = {"probesize": str(max(32, probe_bytes)),
                         "analyzeduration": str(int(analyze_seconds * 1_000_000))}
        self._unpaced = threading.Event()  # set: pacing waits return at once

    @property
    def frames(self) -> int:
        """Frames decoded and pushed so far (any thread)."""
        return self._consumer.frames

    @property
    def last_frame_at(self) -> float | None:
        """``time.monotonic()`` of the latest frame pushed, None before the first (any thread)."""
        return self._consumer.last_frame_at

    def stop(self) -> None:
        """Make ``run`` return soon (from any thread): aborts the reader and any pacing wait, and no
        frame reaches the consumer after this returns, except one being pushed at this moment."""
        self._stop.set()
        self._unpaced.set()
        self.reader.abort()

    def end_input(self) -> None:
        """No more bytes will come (from any thread): decode what is buffered as fast as possible,
        without pacing, then ``run`` returns."""
        self._unpaced.set()
        self.reader.end_input()

    def run(self) -> int:
        """Blocking; call on a thread of its own. Opens, demuxes and decodes until the input ends or
        ``stop()``; returns the frames pushed. Raises ``UnsupportedMedia`` when the bytes cannot be
        opened or decoded (including an input that ended before any frame)."""
        try:
            container = av.open(self.reader, format=self.container_format.value,
                                options=dict(self._options), buffer_size=READ_CHUNK)
        except (av.FFmpegError, ValueError) as exc:
            if self._stop.is_set():
                return 0
            raise UnsupportedMedia(f"cannot open as {self.container_format.value}: "
                                   f"{_describe(exc)}") from exc
        try:
            if container.streams.video:
                self._consumer.hold_for_frame_rate(
                    nominal_frame_rates(container.streams.video[0]))
            # Paced from when the first bytes arrived, not from the first packet: what arrived
            # while FFmpeg probed (32 KiB: most of a second of a browser's WebM) goes at once.
            pacer = Pacer(self._unpaced, self.reader.first_byte_at) if self._realtime else None
            frames = pump(container, self._consumer, pacer, self._stop)
            self._consumer.release()  # an input shorter than the frames held back
        except (av.FFmpegError, SourceError) as exc:
            raise UnsupportedMedia(_describe(exc)) from exc
        finally:
            container.close()
        if frames == 0 and not self._stop.is_set():
            raise UnsupportedMedia("the input ended before any frame could be decoded")
        return frames


def _describe(error: Exception) -> str:
    """FFmpeg's words for ``error`` without PyAV's errno and file name decoration."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return str(error.strerror)
    return str(error)
