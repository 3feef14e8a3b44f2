"""fMP4 writer round trips: real libx264/AAC output, packaged, then demuxed and decoded by FFmpeg."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import numpy as np
import pytest

from ingest.media import AUDIO_SAMPLE_RATE, VIDEO_TIMESCALE, EncodedSample, TrackInfo, TrackKind
from origin import fmp4

FRAME_RATE = 30
FRAME_TICKS = VIDEO_TIMESCALE // FRAME_RATE
VIDEO_FRAMES = 2 * FRAME_RATE
AAC_FRAME_SAMPLES = 1024
GOP_FRAMES = 30


def _encode_video(width: int, height: int, b_frames: int) -> tuple[TrackInfo, list[EncodedSample]]:
    """2 s of a moving gradient through libx264, timestamps shifted so the first dts is 0."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, VIDEO_TIMESCALE)
    encoder.framerate = Fraction(FRAME_RATE)
    encoder.gop_size = GOP_FRAMES
    encoder.options = {
        "preset": "veryfast",
        "tune": "zerolatency",
        "bf": str(b_frames),
        "x264-params": "scenecut=0",  # IDRs exactly every GOP_FRAMES
    }
    encoder.flags |= av.codec.context.Flags.global_header
    packets = []
    for index in range(VIDEO_FRAMES):
        luma = (np.arange(width)[None, :] + np.arange(height)[:, None] + 4 * index) % 256
        image = np.concatenate([luma, np.full((height // 2, width), 128)]).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
        frame.pts = index * FRAME_TICKS
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    first_dts = packets[0].dts
    samples = [
        EncodedSample(p.dts - first_dts, p.pts - first_dts, FRAME_TICKS, p.is_keyframe, bytes(p)) for p in packets
    ]
    track = TrackInfo(
        name="video", kind=TrackKind.VIDEO, codec="h264", timescale=VIDEO_TIMESCALE,
        codec_config=bytes(encoder.extradata), bitrate=1_000_000, width=width, height=height, frame_rate=FRAME_RATE,
    )  # fmt: skip
    return track, samples


def _encode_audio() -> tuple[TrackInfo, list[EncodedSample]]:
    """2 s of two sine tones through FFmpeg's AAC-LC encoder, 48 kHz stereo, first dts shifted to 0."""
    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = AUDIO_SAMPLE_RATE, "stereo", "fltp"
    encoder.bit_rate = 128_000
    encoder.flags |= av.codec.context.Flags.global_header
    packets = []
    for index in range(2 * AUDIO_SAMPLE_RATE // AAC_FRAME_SAMPLES):
        seconds = (np.arange(AAC_FRAME_SAMPLES) + index * AAC_FRAME_SAMPLES) / AUDIO_SAMPLE_RATE
        tones = np.stack([np.sin(2 * np.pi * 440 * seconds), np.sin(2 * np.pi * 660 * seconds)])
        frame = av.AudioFrame.from_ndarray(tones.astype(np.float32), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_SAMPLE_RATE, index * AAC_FRAME_SAMPLES
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    first_dts = packets[0].dts
    samples = [EncodedSample(p.dts - first_dts, p.pts - first_dts, p.duration, True, bytes(p)) for p in packets]
    track = TrackInfo(
        name="audio", kind=TrackKind.AUDIO, codec="aac", timescale=AUDIO_SAMPLE_RATE,
        codec_config=bytes(encoder.extradata), bitrate=128_000, sample_rate=AUDIO_SAMPLE_RATE, channels=2,
    )  # fmt: skip
    return track, samples


def _fragments(
    track: TrackInfo, samples: Sequence[EncodedSample], per_fragment: int, first_sequence: int = 1
) -> list[bytes]:
    """Package ``samples`` as consecutive fragments (LL-HLS parts) of ``per_fragment`` samples each."""
    chunks = [samples[start : start + per_fragment] for start in range(0, len(samples), per_fragment)]
    return [
        fmp4.media_fragment(track, first_sequence + index, chunk[0].dts, chunk) for index, chunk in enumerate(chunks)
    ]


def _demux(data: bytes) -> tuple[av.container.InputContainer, list[av.Packet]]:
    container = av.open(io.BytesIO(data), format="mp4")
    return container, [packet for packet in container.demux(container.streams[0]) if packet.size]


def _boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Top-level (type, payload) pairs of an ISO BMFF byte string."""
    offset = 0
    while offset < len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        yield kind, data[offset + 8 : offset + size]
        offset += size


@pytest.fixture(scope="module")
def audio() -> tuple[TrackInfo, list[EncodedSample]]:
    return _encode_audio()


@pytest.mark.parametrize(("height", "b_frames"), [(360, 0), (270, 0), (360, 2)])
def test_video_round_trip(height: int, b_frames: int) -> None:
    track, samples = _encode_video(640, height, b_frames)
    assert len(samples) == VIDEO_FRAMES and samples[0].keyframe and samples[GOP_FRAMES].keyframe
    assert (b_frames > 0) == any(sample.pts != sample.dts for sample in samples)

    container, packets = _demux(fmp4.init_segment(track) + b"".join(_fragments(track, samples, 10)))

    stream = container.streams.video[0]
    assert stream.time_base == Fraction(1, VIDEO_TIMESCALE)
    assert (stream.codec_context.width, stream.codec_context.height) == (640, height)
    assert [(p.dts, p.pts, p.duration, p.is_keyframe) for p in packets] == [
        (s.dts, s.pts, s.duration, s.keyframe) for s in samples
    ]
    frames = [frame for packet in [*packets, None] for frame in stream.codec_context.decode(packet)]
    assert len(frames) == VIDEO_FRAMES
    assert {(frame.width, frame.height) for frame in frames} == {(640, height)}
    assert [frame.pts for frame in frames] == sorted(sample.pts for sample in samples)
    assert [frame.key_frame for frame in frames].count(True) == VIDEO_FRAMES // GOP_FRAMES


def test_fragments_starting_at_a_keyframe_stand_alone() -> None:
    """A player joining mid-stream gets the init segment and later parts only; tfdt places them in time."""
    track, samples = _encode_video(640, 360, b_frames=0)
    later = samples[GOP_FRAMES:]

    container, packets = _demux(fmp4.init_segment(track) + b"".join(_fragments(track, later, 7, first_sequence=42)))

    assert [p.dts for p in packets] == [s.dts for s in later]
    assert packets[0].dts == GOP_FRAMES * FRAME_TICKS
    decoder = container.streams.video[0].codec_context
    decoded = [frame for packet in [*packets, None] for frame in decoder.decode(packet)]
    assert len(decoded) == len(later)


def test_audio_round_trip(audio: tuple[TrackInfo, list[EncodedSample]]) -> None:
    track, samples = audio

    container, packets = _demux(fmp4.init_segment(track) + b"".join(_fragments(track, samples, 16)))

    stream = container.streams.audio[0]
    assert stream.time_base == Fraction(1, AUDIO_SAMPLE_RATE)
    assert stream.codec_context.codec.name == "aac" and stream.codec_context.profile == "LC"
    assert (stream.codec_context.sample_rate, stream.codec_context.channels) == (AUDIO_SAMPLE_RATE, 2)
    assert [(p.dts, p.pts, p.duration) for p in packets] == [(s.dts, s.pts, s.duration) for s in samples]
    frames = [frame for packet in [*packets, None] for frame in stream.codec_context.decode(packet)]
    decoded_samples = sum(frame.samples for frame in frames)
    assert decoded_samples == len(samples) * AAC_FRAME_SAMPLES
    assert decoded_samples >= 2 * AUDIO_SAMPLE_RATE


def test_fragment_layout(audio: tuple[TrackInfo, list[EncodedSample]]) -> None:
    track, samples = _encode_video(640, 360, b_frames=0)
    fragment = fmp4.media_fragment(track, 7, 123_456, samples[:3])

    [(moof_type, moof), (mdat_type, mdat)] = list(_boxes(fragment))
    assert (moof_type, mdat_type) == (b"moof", b"mdat")
    [(mfhd_type, mfhd), (traf_type, traf)] = list(_boxes(moof))
    assert (mfhd_type, traf_type, mfhd) == (b"mfhd", b"traf", struct.pack(">II", 0, 7))
    boxes = dict(_boxes(traf))
    assert boxes[b"tfhd"] == struct.pack(">II", 0x020000, fmp4.TRACK_ID)
    assert boxes[b"tfdt"] == struct.pack(">IQ", 0x01000000, 123_456)
    trun = boxes[b"trun"]
    version_flags, count, data_offset = struct.unpack_from(">IIi", trun)
    assert (version_flags >> 24, count, data_offset) == (1, 3, len(moof) + 16)
    entries = [struct.unpack_from(">IIIi", trun, 12 + 16 * index) for index in range(count)]
    assert [flags for _, _, flags, _ in entries] == [0x02000000, 0x01010000, 0x01010000]
    assert sum(size for _, size, _, _ in entries) == len(mdat)

    audio_track, audio_samples = audio
    audio_fragment = fmp4.media_fragment(audio_track, 1, 0, audio_samples[:2])
    assert audio_fragment.endswith(audio_samples[0].data + audio_samples[1].data)  # AAC goes in untouched


def test_init_segment_alone_describes_the_track(audio: tuple[TrackInfo, list[EncodedSample]]) -> None:
    track, _ = audio
    init = fmp4.init_segment(track)

    [(ftyp_type, ftyp), (moov_type, _)] = list(_boxes(init))
    assert (ftyp_type, moov_type) == (b"ftyp", b"moov")
    assert ftyp[:4] == b"iso6" and b"cmfc" in ftyp[8:]
    container, packets = _demux(init)
    stream = container.streams.audio[0]
    assert (stream.codec_context.sample_rate, stream.codec_context.channels, packets) == (AUDIO_SAMPLE_RATE, 2, [])


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        pytest.param([], "at least one sample", id="empty"),
        pytest.param([EncodedSample(0, 0, 0, True, b"\0\0\1\x65\x88")], "no duration", id="zero-duration"),
        pytest.param([EncodedSample(0, 0, -3000, True, b"\0\0\1\x65\x88")], "no duration", id="negative-duration"),
    ],
)
def test_media_fragment_rejects(samples: list[EncodedSample], message: str) -> None:
    track = TrackInfo("video", TrackKind.VIDEO, "h264", VIDEO_TIMESCALE, b"", 1_000_000)
    with pytest.raises(ValueError, match=message):
        fmp4.media_fragment(track, 1, 0, samples)


def test_media_fragment_rejects_negative_base_decode_time() -> None:
    track = TrackInfo("video", TrackKind.VIDEO, "h264", VIDEO_TIMESCALE, b"", 1_000_000)
    with pytest.raises(ValueError, match="negative"):
        fmp4.media_fragment(track, 1, -1, [EncodedSample(0, 0, 3000, True, b"\0\0\1\x65\x88")])


def test_init_segment_rejects_unknown_codec() -> None:
    track = TrackInfo("audio", TrackKind.AUDIO, "opus", AUDIO_SAMPLE_RATE, b"", 64_000)
    with pytest.raises(ValueError, match="opus"):
        fmp4.init_segment(track)
