"""Fixtures shared across the suite: real media parameters made with PyAV."""

from __future__ import annotations

from fractions import Fraction

import av
import pytest

from ingest.media import AUDIO_SAMPLE_RATE, VIDEO_TIMESCALE, TrackInfo, TrackKind


class Clock:
    """A clock the test moves by hand (``now``), for cores that take their clock as a parameter."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now



@pytest.fixture(scope="session")
def h264_codec_config() -> bytes:
    """libx264's global header (Annex B SPS+PPS) for 320x180, as the transcoder produces it."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 180, "yuv420p"
    encoder.time_base = Fraction(1, VIDEO_TIMESCALE)
    encoder.flags |= av.codec.context.Flags.global_header
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
    encoder.open()
    return bytes(encoder.extradata)


@pytest.fixture
def video_track(h264_codec_config: bytes) -> TrackInfo:
    return TrackInfo(name="180p", kind=TrackKind.VIDEO, codec="h264", timescale=VIDEO_TIMESCALE,
                     codec_config=h264_codec_config, bitrate=300_000, width=320, height=180,
                     frame_rate=30.0)


@pytest.fixture
def audio_track() -> TrackInfo:
    # AudioSpecificConfig: AAC-LC, 48 kHz, stereo.
    return TrackInfo(name="audio", kind=TrackKind.AUDIO, codec="aac", timescale=AUDIO_SAMPLE_RATE,
                     codec_config=bytes([0x11, 0x90]), bitrate=128_000, sample_rate=48_000,
                     channels=2)
