"""Container probing, the bounded byte pipe and incremental demuxing, with media made by PyAV."""

from __future__ import annotations

import io
import random
import threading
import time
from fractions import Fraction

import av
import pytest

from ingest.container import (FRAME_RATE_FRAMES, PROBE_BYTES, PROBE_HEAD_BYTES, ByteStreamReader,
                              ContainerDemuxer, ContainerFormat, UnsupportedMedia,
                              decide_frame_rate, nominal_frame_rates, probe_container)
from tests.media_files import encode_lavfi

pytestmark = pytest.mark.timeout(60)

FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Hi</title></head><body>" + b"x" * 2000 + b"</html>"


def encode_test_media(container: str, video_codec: str, audio_codec: str, *, seconds: float = 2.0,
                      size: tuple[int, int] = (320, 180), rate: int = 30,
                      options: dict[str, str] | None = None) -> bytes:
    """``seconds`` of lavfi testsrc2 and a 440 Hz sine, encoded into an in-memory ``container``."""
    video_options = {"libx264": {"preset": "ultrafast", "g": str(rate)},
                     "libvpx": {"deadline": "realtime", "cpu-used": "8"},
                     "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"}}.get(video_codec, {})
    buffer = io.BytesIO()
    encode_lavfi(buffer, seconds, size, rate, video_codec, audio_codec, container, options,
                 video_options)
    return buffer.getvalue()


MEDIA = {
    "webm-vp8-opus": ("webm", "libvpx", "libopus", None),
    "webm-vp9-opus": ("webm", "libvpx-vp9", "libopus", None),
    "mkv-h264-opus": ("matroska", "libx264", "libopus", None),
    "ts-h264-aac": ("mpegts", "libx264", "aac", None),
    "ts-h264-mp2": ("mpegts", "libx264", "mp2", None),
    "fmp4-h264-aac": ("mp4", "libx264", "aac", FRAGMENTED_MP4),
}
EXPECTED_FORMAT = {"webm": ContainerFormat.MATROSKA, "matroska": ContainerFormat.MATROSKA,
                   "mpegts": ContainerFormat.MPEGTS, "mp4": ContainerFormat.MP4}


@pytest.fixture(scope="module")
def media() -> dict[str, bytes]:
    return {name: encode_test_media(container, video, audio, options=options)
            for name, (container, video, audio, options) in MEDIA.items()}


class RecordingConsumer:
    """A frame consumer that keeps what it is given (the transcoder's producer-side interface)."""

    def __init__(self) -> None:
        self.hints: list[float | None] = []
        self.video: list[av.VideoFrame] = []
        self.audio: list[av.AudioFrame] = []
        self.first_frame_at: float | None = None

    def hint_frame_rate(self, frames_per_second: float | None) -> None:
        self.hints.append(frames_per_second)

    def push_video(self, frame: av.VideoFrame) -> None:
        self.first_frame_at = self.first_frame_at or time.monotonic()
        self.video.append(frame)

    def push_audio(self, frame: av.AudioFrame) -> None:
        self.first_frame_at = self.first_frame_at or time.monotonic()
        self.audio.append(frame)

    def discontinuity(self) -> None:
        raise AssertionError("the demuxer must not call discontinuity()")

    def close(self) -> None:
        raise AssertionError("the demuxer must not close its consumer")


class DemuxRun:
    """A ContainerDemuxer running on a thread, as the WebSocket ingest runs it."""

    def __init__(self, demuxer: ContainerDemuxer) -> None:
        self.demuxer = demuxer
        self.frames: int | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._body, daemon=True)
        self.thread.start()

    def _body(self) -> None:
        try:
            self.frames = self.demuxer.run()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def join(self, timeout: float = 20) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the demuxer did not return"


def feed_all(reader: ByteStreamReader, data: bytes, chunk: int = 32 * 1024) -> None:
    for offset in range(0, len(data), chunk):
        reader.feed(data[offset:offset + chunk])


# -- probing -------------------------------------------------------------------------------------

TS_PACKET = b"\x47" + bytes(187)


@pytest.mark.parametrize("head, expected", [
    (b"", None),
    (b"\x1a\x45", None),  # a Matroska magic, cut short
    (b"\x1a\x45\xdf\xa3", ContainerFormat.MATROSKA),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", ContainerFormat.MATROSKA),
    (b"\x47", None),
    (TS_PACKET * 2, None),  # two packets in sync are not yet enough
    (TS_PACKET * 2 + b"\x47", ContainerFormat.MPEGTS),
    (TS_PACKET * 3, ContainerFormat.MPEGTS),
    (b"\x00\x00\x00", None),
    (b"\x00\x00\x00\x1cftypiso5", ContainerFormat.MP4),
    (b"\x00\x00\x00\x18styp", ContainerFormat.MP4),
    (b"\x00\x00\x00\x01moof" + bytes(8), ContainerFormat.MP4),  # a 64-bit box size follows
])
def test_probe_names_the_container_or_asks_for_more(head, expected):
    assert probe_container(head) is expected


@pytest.mark.parametrize("head", [
    HTML_PAGE,
    b"<",  # one byte is enough to rule everything out
    b"\x1a\x46\xdf\xa3",  # almost EBML
    TS_PACKET + b"\x48" + bytes(187),  # sync lost in the second packet
    TS_PACKET * 2 + b"\x00",  # ... or in the third
    b"\x00\x00\x00\x1cmdat" + bytes(20),  # media before any header: not streamable
    b"\x00\x00\x00\x00ftyp",  # a box size of 0 is never a header box
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
    b"FLV\x01\x05\x00\x00\x00\x09",
    b"\xff\xfb\x90\x64" + bytes(100),  # an MP3 frame header
    b'{"type": "offer"}',
])
def test_probe_rejects_everything_else(head):
    with pytest.raises(UnsupportedMedia):
        probe_container(head)


def test_random_bytes_are_rejected_within_the_probe_head():
    generator = random.Random(7)
    rejected = 0
    for _ in range(500):
        head = generator.randbytes(PROBE_HEAD_BYTES)
        try:
            probe_container(head)
        except UnsupportedMedia:
            rejected += 1
    assert rejected == 500


@pytest.mark.parametrize("name", list(MEDIA))
def test_probe_recognizes_real_containers(media, name):
    data = media[name]
    assert probe_container(data[:PROBE_HEAD_BYTES]) is EXPECTED_FORMAT[MEDIA[name][0]]


# -- the byte pipe -------------------------------------------------------------------------------

def test_reads_cross_chunk_boundaries_and_return_at_most_size():
    reader = ByteStreamReader(capacity=100)
    reader.feed(b"abc")
    reader.feed(b"defgh")
    assert reader.read(2) == b"ab"
    assert reader.read(4) == b"cdef"
    assert reader.buffered == 2
    assert reader.read(100) == b"gh"
    assert reader.bytes_fed == reader.bytes_read == 8


def test_a_read_blocks_until_bytes_arrive():
    reader = ByteStreamReader(capacity=100)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(reader.read(10)))
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive() and not got and reader.first_byte_at is None
    fed_at = time.monotonic()
    reader.feed(b"hello")
    thread.join(2)
    assert got == [b"hello"]
    reader.feed(b"later")
    # The demuxer's pacing starts there (ingest.pull.Pacer's arrived_at).
    assert fed_at <= reader.first_byte_at <= fed_at + 0.05


def test_end_of_input_returns_the_rest_then_eof():
    reader = ByteStreamReader(capacity=100)
    reader.feed(b"tail")
    reader.end_input()
    assert reader.feed(b"more") is False  # dropped
    assert reader.read(10) == b"tail"
    assert reader.read(10) == b""


def test_abort_wakes_a_blocked_read_and_drops_the_buffer():
    reader = ByteStreamReader(capacity=100)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(reader.read(10)))
    thread.start()
    time.sleep(0.05)
    reader.abort()
    thread.join(2)
    assert got == [b""]
    reader2 = ByteStreamReader(capacity=100)
    reader2.feed(b"buffered")
    reader2.abort()
    assert reader2.read(10) == b"" and reader2.buffered == 0


def test_a_full_buffer_tells_the_writer_and_calls_back_once_drained_to_low_water():
    room_calls: list[int] = []
    reader = ByteStreamReader(capacity=10, on_room=lambda: room_calls.append(reader.buffered))
    assert reader.feed(b"12345") is True
    assert reader.feed(b"67890") is False  # at capacity: stop feeding
    assert not reader.has_room()
    assert reader.read(3) == b"123"  # 7 left: above low water (5)
    assert room_calls == []
    assert reader.read(2) == b"45"
    assert room_calls == [5]
    assert reader.read(5) == b"67890"
    assert room_calls == [5]  # once per "full", not per read


def test_the_buffer_never_holds_more_than_capacity_plus_one_piece():
    reader = ByteStreamReader(capacity=64 * 1024)
    largest = 0
    for _ in range(100):  # a writer that honours feed()'s answer
        if not reader.feed(bytes(10_000)):
            largest = max(largest, reader.buffered)
            reader.read(40_000)
    assert 64 * 1024 <= largest < 64 * 1024 + 10_000


# -- demuxing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MEDIA))
def test_every_container_decodes_incrementally(media, name):
    data = media[name]
    reader = ByteStreamReader(capacity=len(data) + 1)
    consumer = RecordingConsumer()
    run = DemuxRun(ContainerDemuxer(reader, probe_container(data[:PROBE_HEAD_BYTES]), consumer,
                                    realtime=False))
    # The first 40 % of the bytes alone already yield frames: nothing waits for the end.
    feed_all(reader, data[:len(data) * 4 // 10])
    deadline = time.monotonic() + 10
    while not consumer.video and time.monotonic() < deadline:
        time.sleep(0.02)
    assert consumer.video, "no frame before the rest of the stream arrived"
    assert run.thread.is_alive()  # still waiting for more bytes
    feed_all(reader, data[len(data) * 4 // 10:])
    reader.end_input()
    run.join()
    assert run.error is None
    assert len(consumer.video) == pytest.approx(60, abs=2)  # 2 s at 30 fps
    assert sum(f.samples for f in consumer.audio) / 48_000 == pytest.approx(2.0, abs=0.1)
    assert (consumer.video[0].width, consumer.video[0].height) == (320, 180)
    assert run.frames == len(consumer.video) + len(consumer.audio) == run.demuxer.frames
    assert consumer.hints == [30.0]  # the nominal rate, not the average of the first frames
    times = [f.time for f in consumer.video]
    assert times == sorted(times) and times[0] < 0.1


def test_realtime_decoding_follows_the_media_clock(media):
    data = media["ts-h264-aac"]
    reader = ByteStreamReader(capacity=len(data) + 1)
    consumer = RecordingConsumer()
    feed_all(reader, data)
    reader.end_input()
    started = time.monotonic()
    run = DemuxRun(ContainerDemuxer(reader, ContainerFormat.MPEGTS, consumer))
    run.join()
    took = time.monotonic() - started
    assert run.error is None and len(consumer.video) >= 58
    assert 1.7 <= took <= 3.5  # 2 s of media, not as fast as the CPU decodes
    assert consumer.first_frame_at - started < 0.5  # but the first frame comes at once


def test_stop_ends_a_demuxer_waiting_for_bytes(media):
    reader = ByteStreamReader(capacity=1 << 20)
    reader.feed(media["webm-vp8-opus"][:200])  # a header cut short: opening blocks for more
    consumer = RecordingConsumer()
    demuxer = ContainerDemuxer(reader, ContainerFormat.MATROSKA, consumer)
    run = DemuxRun(demuxer)
    time.sleep(0.2)
    assert run.thread.is_alive()
    demuxer.stop()
    run.join(5)
    assert run.error is None and run.frames == 0 and consumer.video == []


def test_stop_mid_stream_stops_pushing_frames(media):
    data = media["ts-h264-aac"]
    reader = ByteStreamReader(capacity=len(data) + 1)
    feed_all(reader, data)
    consumer = RecordingConsumer()
    demuxer = ContainerDemuxer(reader, ContainerFormat.MPEGTS, consumer)  # paced: ~2 s
    run = DemuxRun(demuxer)
    time.sleep(0.5)
    demuxer.stop()
    pushed = len(consumer.video)
    run.join(5)
    assert 0 < pushed < 50
    assert len(consumer.video) <= pushed + 1  # at most the frame being pushed at stop()


def test_a_stream_cut_inside_its_header_is_unsupported_media(media):
    reader = ByteStreamReader(capacity=1 << 20)
    reader.feed(media["webm-vp8-opus"][:300])
    reader.end_input()
    run = DemuxRun(ContainerDemuxer(reader, ContainerFormat.MATROSKA, RecordingConsumer()))
    run.join()
    assert isinstance(run.error, UnsupportedMedia)


@pytest.mark.parametrize("name", list(MEDIA))
def test_a_stream_cut_mid_way_yields_the_frames_before_the_cut(media, name):
    data = media[name]
    reader = ByteStreamReader(capacity=len(data) + 1)
    feed_all(reader, data[:len(data) // 2])
    reader.end_input()
    consumer = RecordingConsumer()
    run = DemuxRun(ContainerDemuxer(reader, probe_container(data[:PROBE_HEAD_BYTES]), consumer,
                                    realtime=False))
    run.join()
    assert run.error is None
    assert 15 <= len(consumer.video) <= 45


@pytest.mark.parametrize("name", ["webm-vp8-opus", "ts-h264-aac", "fmp4-h264-aac"])
def test_garbage_behind_a_valid_head_is_unsupported_media(media, name):
    data = media[name]
    garbage = random.Random(3).randbytes(200_000)
    reader = ByteStreamReader(capacity=1 << 20)
    reader.feed(data[:PROBE_HEAD_BYTES] + garbage)
    reader.end_input()
    consumer = RecordingConsumer()
    run = DemuxRun(ContainerDemuxer(reader, probe_container(data[:PROBE_HEAD_BYTES]), consumer,
                                    realtime=False))
    run.join()
    assert isinstance(run.error, UnsupportedMedia)
    assert consumer.video == []


def test_an_mp4_with_its_index_at_the_end_cannot_be_streamed():
    data = encode_test_media("mp4", "libx264", "aac", seconds=1)
    assert data.find(b"mdat") < data.find(b"moov")  # the ordinary, non-fragmented layout
    reader = ByteStreamReader(capacity=len(data) + 1)
    feed_all(reader, data)
    reader.end_input()
    run = DemuxRun(ContainerDemuxer(reader, probe_container(data[:64]), RecordingConsumer(),
                                    realtime=False))
    run.join()
    assert isinstance(run.error, UnsupportedMedia)


# -- the frame rate ------------------------------------------------------------------------------

def browser_webm(seconds: float = 2.0, rate: int = 30, jitter_ms: int = 4) -> bytes:
    """VP8 in WebM as a browser's MediaRecorder writes it: a millisecond time base, no nominal
    frame rate, each frame's timestamp a few milliseconds late (fixed seed)."""
    generator = random.Random(5)
    buffer = io.BytesIO()
    with av.open(f"testsrc2=size=320x180:rate={rate}", format="lavfi") as source, \
            av.open(buffer, "w", format="webm") as output:
        video = output.add_stream("libvpx", options={"deadline": "realtime", "cpu-used": "8"})
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        video.codec_context.time_base = video.time_base = Fraction(1, 1000)
        for index, frame in enumerate(source.decode(video=0)):
            if frame.time >= seconds:
                break
            late = generator.randint(0, jitter_ms) if index else 0
            frame.pts = round(index * 1000 / rate) + late
            frame.time_base = Fraction(1, 1000)
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
    return buffer.getvalue()


def decoded_hints(data: bytes, container_format: ContainerFormat) -> RecordingConsumer:
    reader = ByteStreamReader(capacity=len(data) + 1)
    feed_all(reader, data)
    reader.end_input()
    consumer = RecordingConsumer()
    run = DemuxRun(ContainerDemuxer(reader, container_format, consumer, realtime=False))
    run.join()
    assert run.error is None
    return consumer


def opened_guess(data: bytes, container_format: ContainerFormat) -> tuple[Fraction | None, ...]:
    """What FFmpeg announces after opening ``data`` with our probe size."""
    reader = ByteStreamReader(capacity=len(data) + 1)
    feed_all(reader, data)
    reader.end_input()
    with av.open(reader, format=container_format.value,
                 options={"probesize": str(PROBE_BYTES), "analyzeduration": "500000"}) as container:
        return nominal_frame_rates(container.streams.video[0])


@pytest.mark.parametrize("rate", [10, 25])
def test_a_large_h264_source_in_mpeg_ts_keeps_its_frame_rate(rate):
    # A 1080p keyframe is larger than the probe: FFmpeg's guess is then the field rate.
    data = encode_test_media("mpegts", "libx264", "aac", seconds=1.0, size=(1920, 1080),
                             rate=rate)
    assert float(opened_guess(data, ContainerFormat.MPEGTS)[1]) == 2 * rate  # the trap
    consumer = decoded_hints(data, ContainerFormat.MPEGTS)
    assert consumer.hints == [float(rate)]
    assert len(consumer.video) == rate  # the frames held back for the decision all came through


@pytest.mark.parametrize("container, video_codec, audio_codec, options", [
    ("mpegts", "libx264", "aac", None),
    ("webm", "libvpx", "libopus", None),
    ("mp4", "libx264", "aac", FRAGMENTED_MP4),
])
def test_a_25_fps_source_is_announced_at_25(container, video_codec, audio_codec, options):
    data = encode_test_media(container, video_codec, audio_codec, rate=25, options=options)
    consumer = decoded_hints(data, probe_container(data[:PROBE_HEAD_BYTES]))
    assert consumer.hints == [25.0]
    assert len(consumer.video) == pytest.approx(50, abs=2)


def test_a_browser_webm_with_millisecond_timestamps_is_measured_not_guessed():
    data = browser_webm()
    assert 30 not in [float(r) for r in opened_guess(data, ContainerFormat.MATROSKA) if r]
    consumer = decoded_hints(data, ContainerFormat.MATROSKA)
    assert consumer.hints == [30.0]
    assert len(consumer.video) == 60


def test_an_input_shorter_than_the_frames_held_back_is_still_decoded():
    data = encode_test_media("mpegts", "libx264", "aac", seconds=(FRAME_RATE_FRAMES - 2) / 30)
    consumer = decoded_hints(data, ContainerFormat.MPEGTS)
    assert 1 <= len(consumer.video) < FRAME_RATE_FRAMES  # handed over at the end of the input
    assert consumer.hints == [30.0]


@pytest.mark.parametrize("times, nominal, expected", [
    ([0.0, 0.1, 0.2, 0.3], [None, Fraction(20), None], 10.0),  # a field-rate guess is ignored
    ([0.0, 1001 / 30000, 2002 / 30000, 3003 / 30000], [Fraction(30000, 1001)], 30000 / 1001),
    ([0.0, 0.033, 0.067, 0.1], [None, Fraction(1000), None], 30.0),  # ms timestamps, rounded
    ([0.0, 0.2, 0.233, 0.267], [], 30.0),  # the median ignores one late frame
    ([0.0, 0.04, 0.08, 0.12], [Fraction(24), Fraction(25)], 25.0),  # the nominal rate that agrees
    ([0.0, 1 / 29.97, 2 / 29.97, 3 / 29.97], [], 30.0),  # alone, as close to 30 as ms can tell
    ([0.0, 0.037, 0.069, 0.102], [], 30.0),  # 29.4 measured: browsers capture at 30
    ([0.0, 1 / 17.5, 2 / 17.5, 3 / 17.5], [None], pytest.approx(17.5)),  # as measured
    ([0.0, 1 / 37, 2 / 37, 3 / 37], [], 37.0),
    ([0.0], [None, Fraction(25), Fraction(128, 7)], 25.0),  # one frame: the stream's word
    ([0.0, 0.0], [Fraction(500)], None),  # nothing believable
    ([], [], None),
])
def test_decide_frame_rate(times, nominal, expected):
    assert decide_frame_rate(times, nominal) == expected
