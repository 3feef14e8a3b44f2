"""The live ladder transcoder: decoded frames in, H.264 renditions and one AAC track out.

Threads (PERF-NOTES, "Ladder transcode"):
- One producer thread (a source's decode thread) calls ``push_video``/``push_audio``/``discontinuity``/
  ``close``. It maps timestamps onto the shared output clock, decides which frames start a segment,
  and encodes audio itself (AAC is cheap).
- One worker thread per rung, fed through a bounded queue: its own ``VideoReformatter`` (never
  ``frame.reformat()``, whose cached reformatter deadlocked swscale across threads), single-threaded
  swscale and x264. PyAV releases the GIL inside swscale and x264, so rungs use every core.
- The sink is only ever called on the event loop thread, through ``loop.call_soon_threadsafe``. Each
  track is produced by one thread and call_soon_threadsafe is FIFO, so a track's ``add_track`` precedes
  its samples and its samples stay in order; ``discontinuity``/``end`` are scheduled only after every
  worker has handed over its earlier output.

Segment alignment: the producer decides ONCE per source frame whether it starts a segment (the first
frame at or after the next multiple of ``segment_duration`` on the output clock, where a frame less
than half an interval before it is moved onto it) and every rung forces
that frame to an IDR (``pict_type = I`` with x264's ``forced-idr``), so all rungs cut at the same pts.
x264's own ``keyint`` is set to twice the segment length as a backstop only: were it equal to the
segment length, a rung that dropped a frame (or a variable frame rate) would make x264 place an IDR of
its own one frame early, on that rung only. If a rung has to drop a boundary frame (its queue is full),
its next queued frame is forced to IDR instead: that rung's segment starts late by the dropped frames.

After a discontinuity (a reconnect, or a source size change that re-plans the ladder) the output
clock resumes on the next segment grid point, so the first frame of the new period is a boundary.

A size change never stops a rung once it was declared (``replan_ladder``): a rung above the new
source size is encoded at the source size, re-declared (a new init segment), and returns to its own
size, re-declared again, when the source grows back. Every rung thus keeps the same segments.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
from av.codec.context import Flags
from av.video.frame import PictureType
from av.video.reformatter import Interpolation, VideoReformatter

from ingest.ladder import RungSpec, replan_ladder
from ingest.media import (AUDIO_SAMPLE_RATE, VIDEO_TIMESCALE, EncodedSample, MediaSink, TrackInfo,
                          TrackKind)
from ingest.passthrough import SOURCE_RENDITION, H264Passthrough
from ingest.timeline import Timeline

AUDIO_TRACK = "audio"
AUDIO_FRAME_SAMPLES = 1024  # AAC-LC frame
AUDIO_RESYNC_THRESHOLD = 0.05  # seconds of drift between sample count and timestamps before re-anchoring
DEFAULT_FRAME_RATE = 30.0  # frames per second, when neither the frames nor the source tell
MIN_FRAME_RATE, MAX_FRAME_RATE = 1.0, 240.0  # outside this, a frame's duration is not believed
PERIOD_MARGIN = 0.1  # seconds kept free after the last output before a new period starts
HANDOFF_TIMEOUT = 10.0  # seconds the producer waits for a worker to take a drain/stop request
_VIDEO_TIME_BASE = Fraction(1, VIDEO_TIMESCALE)
_AUDIO_TIME_BASE = Fraction(1, AUDIO_SAMPLE_RATE)


@dataclass(frozen=True)
class RungStats:
    name: str
    width: int
    height: int
    frames_encoded: int
    frames_dropped: int  # dropped because the rung's queue was full
    bytes_out: int
    realtime_factor: float  # media seconds encoded / wall seconds the worker spent scaling + encoding


@dataclass(frozen=True)
class TranscoderStats:
    """A snapshot; safe to read from any thread."""

    frames_in: int  # video frames pushed
    frames_encoded: dict[str, int]  # per rung name
    frames_dropped: int  # sum over rungs
    audio_frames_encoded: int
    realtime_factor: float  # of the slowest rung (0.0 before anything was encoded)
    last_error: str | None
    rungs: tuple[RungStats, ...]


@dataclass(frozen=True)
class _VideoJob:
    frame: av.VideoFrame
    pts: int  # output time, 90 kHz ticks
    force_idr: bool


@dataclass(frozen=True)
class _Drain:
    done: threading.Event


_STOP = object()


class LadderTranscoder:
    """Encodes one source into a ladder of H.264 renditions plus one AAC track, delivered to ``sink``
    on ``loop``. Producer-side methods (``push_*``, ``hint_frame_rate``, ``discontinuity``, ``close``)
    must all be called from one thread at a time, never the event loop's.

    ``queue_frames`` bounds each rung's backlog. A live source must never wait, so by default a frame
    that finds its rung's queue full is dropped for that rung; ``block_on_full`` (seconds) lets a
    producer that is faster than real time (a file transcoded as fast as possible) wait that long for
    room first."""

    def __init__(self, sink: MediaSink, loop: asyncio.AbstractEventLoop, rungs: Sequence[RungSpec], *,
                 segment_duration: float, audio_bitrate: int = 128_000, preset: str = "veryfast",
                 tune: str = "zerolatency", queue_frames: int = 60,
                 block_on_full: float = 0.0, passthrough: bool = False) -> None:
        if not rungs and not passthrough:
            raise ValueError("the ladder has no rungs (and no passthrough)")
        if segment_duration <= 0:
            raise ValueError("segment_duration must be positive")
        self._sink = sink
        self._loop = loop
        self._specs = tuple(rungs)
        self._segment_ticks = round(segment_duration * VIDEO_TIMESCALE)
        self._audio_bitrate = audio_bitrate
        self._x264 = (preset, tune)
        self._queue_frames = queue_frames
        self._block_on_full = block_on_full
        self._timeline = Timeline()
        self._declared: dict[str, TrackInfo] = {}
        self._declared_lock = threading.Lock()
        self._workers: list[_RungWorker] = []
        self._retired_dropped = 0  # frames dropped by the workers of earlier plans
        self._last_plan: list[_RungWorker] = []  # the latest plan's workers, reported after close
        self._source_size: tuple[int, int] | None = None
        self._listed: set[str] = set()  # rungs declared so far: each must go on producing
        self._frame_rate_hint: float | None = None
        self._frame_rate = DEFAULT_FRAME_RATE
        self._next_boundary = 0  # 90 kHz ticks; frames at or after it start a segment
        self._force_boundary = False
        self._last_video_pts = -1
        self._last_video_source: float | None = None
        self._audio: _AudioEncoder | None = None
        self._next_audio_source: float | None = None
        self._audio_frames = 0
        self._frames_in = 0
        self._last_error: str | None = None
        self._closed = False
        # Passthrough: the source's H.264 is also republished as rendition "source", and the
        # ladder's IDR frames follow the source's keyframes so every rendition cuts together.
        self._passthrough = passthrough
        self._source: H264Passthrough | None = None

    # -- producer thread ---------------------------------------------------------------------------

    def hint_frame_rate(self, frames_per_second: float | None) -> None:
        """The source's nominal frame rate, used when frames carry no duration. Call before frames."""
        if frames_per_second and frames_per_second > 0:
            self._frame_rate_hint = float(frames_per_second)

    def push_video(self, frame: av.VideoFrame) -> None:
        """Queue one decoded frame (any size and pixel format, pts + time_base set) to every rung.
        A rung whose queue is full drops the frame and counts it (after ``block_on_full`` seconds)."""
        self._check_open()
        self._frames_in += 1
        if self._source_size != (frame.width, frame.height):
            self._replan(frame)
        interval = 1.0 / self._frame_rate
        source_time = frame.time
        if source_time is None:  # no pts: assume the nominal rate
            source_time = (self._last_video_source or 0.0) + interval
        self._last_video_source = source_time
        output_time = self._timeline.map("video", source_time, interval)
        pts = max(round(output_time * VIDEO_TIMESCALE), self._last_video_pts + 1)
        passing_through = self._passthrough and self._source is not None \
            and self._source.track is not None
        if not passing_through and pts < self._next_boundary \
                <= pts + round(interval * VIDEO_TIMESCALE / 2):
            # The frame nearest the grid point starts the segment, on it. One a few ms early (a
            # browser's millisecond timestamps) ends past the grid point, so the packager closes
            # the last part before it: it would make a one-frame part before an IDR one frame late.
            pts = self._next_boundary
        self._last_video_pts = pts
        boundary = self._force_boundary or pts >= self._next_boundary
        if passing_through:
            boundary = boundary and frame.key_frame  # only where the source itself can cut
        if boundary:
            self._force_boundary = False
            self._next_boundary = (pts // self._segment_ticks + 1) * self._segment_ticks
        for worker in self._workers:
            worker.offer(frame, pts, boundary)

    def push_video_packet(self, packet: av.Packet, stream: av.video.stream.VideoStream) -> None:
        """With passthrough on, republish the source's own H.264 ``packet`` (before it is decoded
        and pushed with ``push_video``) as rendition ``source``; otherwise do nothing."""
        if not self._passthrough or stream.codec_context.name != "h264":
            return
        self._check_open()
        if self._source is None:
            self._source = H264Passthrough(stream, self._frame_rate_hint or DEFAULT_FRAME_RATE)
        interval = 1.0 / (self._frame_rate_hint or DEFAULT_FRAME_RATE)
        try:
            samples = self._source.samples(
                packet, lambda dts: self._timeline.map(SOURCE_RENDITION, dts, interval))
        except (av.FFmpegError, ValueError) as exc:
            self._record_error(f"passthrough: {exc}")
            return
        for track, sample in samples:
            if track is not None:
                self._declare(track)
            self._emit_sample(SOURCE_RENDITION, sample)

    def push_audio(self, frame: av.AudioFrame) -> None:
        """Resample and encode one decoded audio frame (any format/rate/layout) to AAC 48 kHz stereo."""
        self._check_open()
        if self._audio is None:
            self._audio = _AudioEncoder(self._audio_bitrate, self._declare, self._emit_sample,
                                        self._record_error)
        source_time = frame.time
        if source_time is None:  # no pts: the frame follows the previous one
            source_time = self._next_audio_source or 0.0
        self._next_audio_source = source_time + frame.samples / frame.sample_rate
        output_time = self._timeline.map(AUDIO_TRACK, source_time,
                                         AUDIO_FRAME_SAMPLES / AUDIO_SAMPLE_RATE)
        try:
            self._audio_frames += self._audio.encode(frame, output_time)
        except (av.FFmpegError, ValueError) as exc:  # a broken audio frame must not stop the video
            self._record_error(f"audio: {exc}")

    def discontinuity(self) -> None:
        """The source restarted (a reconnect): timestamps may jump anywhere after this call. Output
        stays monotonic, resumes on the next segment grid point, and the sink hears discontinuity()."""
        self._check_open()
        if self._source_size is None and self._audio is None:
            return  # nothing was output yet: there is nothing to be discontinuous with
        self._new_period()

    def close(self) -> None:
        """Flush every encoder, stop the workers and call ``sink.end()``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._audio is not None:
            self._audio_frames += self._audio.flush()
            # The encoder refers back to us (bound methods): dropping it now frees its resampler's
            # filter graph, whose worker threads would otherwise live until a full cyclic GC.
            self._audio = None
        self._stop_workers()
        self._call_on_loop(self._sink.end)

    # -- any thread --------------------------------------------------------------------------------

    def stats(self) -> TranscoderStats:
        workers = self._workers or self._last_plan
        rungs = tuple(w.stats() for w in workers)
        factors = [r.realtime_factor for r in rungs if r.frames_encoded]
        worker_error = next((w.last_error for w in workers if w.last_error), None)
        return TranscoderStats(
            frames_in=self._frames_in,
            frames_encoded={r.name: r.frames_encoded for r in rungs},
            frames_dropped=self._retired_dropped + sum(w.dropped for w in self._workers),
            audio_frames_encoded=self._audio_frames,
            realtime_factor=min(factors, default=0.0),
            last_error=worker_error or self._last_error,
            rungs=rungs)

    # -- internals ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the transcoder is closed")

    def _replan(self, frame: av.VideoFrame) -> None:
        if self._source_size is not None:
            self._stop_workers()  # their last samples reach the loop before the discontinuity
            self._new_period()
        self._source_size = (frame.width, frame.height)
        self._frame_rate = _nominal_frame_rate(frame, self._frame_rate_hint)
        self._workers = [
            _RungWorker(spec, self._frame_rate, self._segment_ticks / VIDEO_TIMESCALE, self._x264,
                        self._queue_frames, self._block_on_full, self._declare, self._emit_sample)
            for spec in replan_ladder(self._specs, self._listed, frame.width, frame.height)]
        self._listed.update(worker.spec.name for worker in self._workers)
        self._force_boundary = True

    def _new_period(self) -> None:
        if self._audio is not None:
            self._audio_frames += self._audio.flush()
            self._audio = None  # a fresh encoder re-anchors on the new period's first frame
        for worker in self._workers:
            if not worker.drain(HANDOFF_TIMEOUT):
                self._record_error(f"rung {worker.spec.name} did not drain within {HANDOFF_TIMEOUT} s")
        segment = self._segment_ticks / VIDEO_TIMESCALE
        # The margin covers what the last samples' durations add beyond their start times.
        resume = math.ceil((self._timeline.furthest() + PERIOD_MARGIN) / segment) * segment
        self._timeline.restart(resume)
        self._force_boundary = True
        self._call_on_loop(self._sink.discontinuity)

    def _stop_workers(self) -> None:
        for worker in self._workers:
            worker.stop(HANDOFF_TIMEOUT)
            self._retired_dropped += worker.dropped
            self._last_error = worker.last_error or self._last_error
        self._last_plan, self._workers = self._workers, []

    def _declare(self, track: TrackInfo) -> None:
        """Announce a track unless the sink already has this exact description (any thread)."""
        with self._declared_lock:
            if self._declared.get(track.name) == track:
                return
            self._declared[track.name] = track
        self._call_on_loop(self._sink.add_track, track)

    def _emit_sample(self, track_name: str, sample: EncodedSample) -> None:
        self._call_on_loop(self._sink.add_sample, track_name, sample)

    def _call_on_loop(self, callback: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError as exc:  # the loop is closed: nobody is listening any more
            self._record_error(f"event loop unavailable: {exc}")

    def _record_error(self, message: str) -> None:
        self._last_error = message


def _nominal_frame_rate(frame: av.VideoFrame, hint: float | None) -> float:
    """Frames per second: the source's hint, else the first frame's own duration if plausible.

    The hint wins because a first frame's duration can lie: FFmpeg's fragmented MP4 gives the
    first video frame the audio priming too (a 30 fps stream then looks like 18 fps)."""
    if hint and MIN_FRAME_RATE <= hint <= MAX_FRAME_RATE:
        return hint
    if frame.duration and frame.time_base:
        rate = 1.0 / float(frame.duration * frame.time_base)
        if MIN_FRAME_RATE <= rate <= MAX_FRAME_RATE:
            return rate
    return hint or DEFAULT_FRAME_RATE


class _RungWorker:
    """One rendition: a bounded queue of source frames, a thread that scales and encodes them."""

    def __init__(self, spec: RungSpec, source_frame_rate: float, segment_duration: float,
                 x264: tuple[str, str], queue_frames: int, block_on_full: float,
                 declare: Callable[[TrackInfo], None],
                 emit: Callable[[str, EncodedSample], None]) -> None:
        self.spec = spec
        self.frame_rate = min(source_frame_rate, spec.max_frame_rate or source_frame_rate)
        self._segment_duration = segment_duration
        self._x264 = x264
        self._declare = declare
        self._emit = emit
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_frames)
        self._block_on_full = block_on_full
        self._interval_ticks = round(VIDEO_TIMESCALE / self.frame_rate)
        # producer-side state
        self._force_next_idr = False
        self._next_due: int | None = None  # 90 kHz ticks; frame-rate cap: earlier frames are skipped
        self.dropped = 0
        # worker-side state
        self._encoder: av.CodecContext | None = None
        self._reformatter = VideoReformatter()
        self.encoded = 0
        self.bytes_out = 0
        self.busy_seconds = 0.0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"rung-{spec.name}", daemon=True)
        self._thread.start()

    # producer side
    def offer(self, frame: av.VideoFrame, pts: int, boundary: bool) -> None:
        interval = self._interval_ticks
        if self.spec.max_frame_rate and self._next_due is not None and not boundary \
                and not self._force_next_idr:
            # Keep a frame when it is due, with a quarter output interval of slack for jitter.
            if pts < self._next_due - interval // 4:
                return
        force = boundary or self._force_next_idr
        try:
            job = _VideoJob(frame, pts, force)
            if self._block_on_full > 0:
                self._queue.put(job, timeout=self._block_on_full)
            else:
                self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            self._force_next_idr = force  # the segment start moves to this rung's next frame
            return
        self._force_next_idr = False
        due = (self._next_due or 0) + interval
        self._next_due = due if due > pts - interval else pts + interval  # re-sync after a gap

    def drain(self, timeout: float) -> bool:
        """Wait until every frame queued so far has been encoded and handed to the loop."""
        done = threading.Event()
        try:
            self._queue.put(_Drain(done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def stop(self, timeout: float) -> None:
        """Encode what is queued, flush the encoder, end the thread."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            self.last_error = f"rung {self.spec.name} did not take the stop request"
            return
        self._thread.join(timeout)

    def stats(self) -> RungStats:
        media_seconds = self.encoded / self.frame_rate
        factor = media_seconds / self.busy_seconds if self.busy_seconds else 0.0
        return RungStats(self.spec.name, self.spec.width, self.spec.height, self.encoded,
                         self.dropped, self.bytes_out, factor)

    # worker thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._encode(None)
                # Free x264 and swscale now: this worker stays referenced (stats) in a cycle
                # with the transcoder, which only a full cyclic GC would collect.
                self._encoder = self._reformatter = None
                return
            if isinstance(item, _Drain):
                item.done.set()
                continue
            assert isinstance(item, _VideoJob)
            started = time.perf_counter()
            self._encode(item)
            self.busy_seconds += time.perf_counter() - started

    def _encode(self, job: _VideoJob | None) -> None:
        try:
            if job is None:
                packets = self._encoder.encode(None) if self._encoder else []
            else:
                scaled = self._reformatter.reformat(
                    job.frame, self.spec.width, self.spec.height, "yuv420p",
                    interpolation=Interpolation.BICUBIC, threads=1)
                scaled.pts = job.pts
                scaled.time_base = _VIDEO_TIME_BASE
                scaled.pict_type = PictureType.I if job.force_idr else PictureType.NONE
                packets = self._open_encoder().encode(scaled)
            for packet in packets:
                data = bytes(packet)
                self.encoded += 1
                self.bytes_out += len(data)
                self._emit(self.spec.name, EncodedSample(
                    dts=packet.pts, pts=packet.pts, duration=self._interval_ticks,
                    keyframe=packet.is_keyframe, data=data))
        except Exception as exc:  # noqa: BLE001 - the worker must outlive a bad frame
            self.last_error = f"rung {self.spec.name}: {type(exc).__name__}: {exc}"

    def _open_encoder(self) -> av.CodecContext:
        if self._encoder is not None:
            return self._encoder
        spec = self.spec
        frames_per_segment = max(1, round(self._segment_duration * self.frame_rate))
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height = spec.width, spec.height
        encoder.pix_fmt = "yuv420p"
        encoder.time_base = _VIDEO_TIME_BASE
        encoder.framerate = Fraction(self.frame_rate).limit_denominator(1001)
        encoder.bit_rate = spec.video_bitrate
        encoder.max_b_frames = 0  # dts == pts, and no reordering delay
        encoder.thread_count = 1  # one x264 thread per rung: the rungs are the parallelism
        encoder.flags |= Flags.global_header  # SPS/PPS in extradata, for the init segment
        preset, tune = self._x264
        encoder.options = {
            "preset": preset,
            "tune": tune,
            "forced-idr": "1",
            # VBV of one second at the target rate keeps every segment near the advertised bitrate.
            "maxrate": str(spec.video_bitrate),
            "bufsize": str(spec.video_bitrate),
            "x264-params": f"scenecut=0:keyint={2 * frames_per_segment}"
                           f":min-keyint={frames_per_segment}",
        }
        encoder.open()
        self._encoder = encoder
        self._declare(TrackInfo(
            name=spec.name, kind=TrackKind.VIDEO, codec="h264", timescale=VIDEO_TIMESCALE,
            codec_config=bytes(encoder.extradata or b""), bitrate=spec.video_bitrate,
            width=spec.width, height=spec.height, frame_rate=self.frame_rate))
        return encoder


class _AudioEncoder:
    """Resamples to 48 kHz stereo fltp in 1024-sample frames and encodes AAC-LC, on the producer
    thread. Output time comes from the sample count, anchored on the shared output clock at the first
    frame and re-anchored when the source's timestamps drift from it by more than
    ``AUDIO_RESYNC_THRESHOLD``: later -> a hole in the output, earlier -> the input frame is dropped
    (output never overlaps)."""

    def __init__(self, bitrate: int, declare: Callable[[TrackInfo], None],
                 emit: Callable[[str, EncodedSample], None], on_error: Callable[[str], None]) -> None:
        self._bitrate = bitrate
        self._declare = declare
        self._emit = emit
        self._on_error = on_error
        self._resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_SAMPLE_RATE,
                                            frame_size=AUDIO_FRAME_SAMPLES)
        self._encoder: av.CodecContext | None = None
        self._next_pts: int | None = None  # 48 kHz ticks of the next resampled frame
        self._buffered = 0.0  # samples (at 48 kHz) inside the resampler, not yet out
        self._priming: int | None = None  # encoder delay: first input pts - first packet pts
        self._first_input_pts = 0

    def next_input_time(self) -> float:
        """Output time, in seconds, where the next input sample belongs by the sample count."""
        return ((self._next_pts or 0) + self._buffered) / AUDIO_SAMPLE_RATE

    def encode(self, frame: av.AudioFrame, output_time: float) -> int:
        """Feed one source frame mapped to ``output_time`` seconds; return AAC frames emitted."""
        if self._next_pts is None:
            self._next_pts = round(output_time * AUDIO_SAMPLE_RATE)
            self._first_input_pts = self._next_pts
        else:
            drift = output_time - self.next_input_time()
            if drift < -AUDIO_RESYNC_THRESHOLD:
                return 0  # timestamps are behind the samples already sent: skip to catch up
            if drift > AUDIO_RESYNC_THRESHOLD:
                self._next_pts += round(drift * AUDIO_SAMPLE_RATE)
        self._buffered += frame.samples * AUDIO_SAMPLE_RATE / frame.sample_rate
        frame.pts = None  # our clock, not the source's, times the resampled frames
        return self._encode_resampled(self._resampler.resample(frame))

    def flush(self) -> int:
        """Drain the resampler and the encoder; the object must not be used afterwards."""
        emitted = self._encode_resampled(self._resampler.resample(None))
        if self._encoder is not None:
            emitted += self._emit_packets(self._encoder.encode(None))
        return emitted

    def _encode_resampled(self, frames: list[av.AudioFrame]) -> int:
        emitted = 0
        for resampled in frames:
            resampled.pts = self._next_pts
            resampled.time_base = _AUDIO_TIME_BASE
            self._next_pts += resampled.samples
            self._buffered = max(0.0, self._buffered - resampled.samples)
            try:
                emitted += self._emit_packets(self._open_encoder().encode(resampled))
            except (av.FFmpegError, ValueError) as exc:
                self._on_error(f"audio: {exc}")
        return emitted

    def _emit_packets(self, packets: list[av.Packet]) -> int:
        for packet in packets:
            if self._priming is None:
                self._priming = self._first_input_pts - packet.pts
            # The encoder stamps packets earlier by its priming delay; shifting it back puts the first
            # AAC frame at the first input sample's time (players then hear it one frame late: 21 ms).
            time = packet.pts + self._priming
            self._emit(AUDIO_TRACK, EncodedSample(dts=time, pts=time, duration=packet.duration
                                                  or AUDIO_FRAME_SAMPLES,
                                                  keyframe=True, data=bytes(packet)))
        return len(packets)

    def _open_encoder(self) -> av.CodecContext:
        if self._encoder is not None:
            return self._encoder
        encoder = av.CodecContext.create("aac", "w")
        encoder.sample_rate = AUDIO_SAMPLE_RATE
        encoder.layout = "stereo"
        encoder.format = "fltp"
        encoder.bit_rate = self._bitrate
        encoder.time_base = _AUDIO_TIME_BASE
        encoder.open()
        self._encoder = encoder
        self._declare(TrackInfo(
            name=AUDIO_TRACK, kind=TrackKind.AUDIO, codec="aac", timescale=AUDIO_SAMPLE_RATE,
            codec_config=bytes(encoder.extradata or b""), bitrate=self._bitrate,
            sample_rate=AUDIO_SAMPLE_RATE, channels=2))
        return encoder
