"""Encoded media as it leaves ingest: track descriptions and samples.

These values are the one contract between ingest (which produces them) and origin (which packages
them). They hold no HLS or HTTP knowledge. All times are integers in the track's ``timescale``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class TrackKind(enum.Enum):
    VIDEO = "video"
    AUDIO = "audio"


VIDEO_TIMESCALE = 90_000
AUDIO_SAMPLE_RATE = 48_000


@dataclass(frozen=True)
class TrackInfo:
    """One elementary stream of a rendition.

    ``codec`` is ``"h264"`` or ``"aac"``. ``codec_config`` holds, for H.264, the SPS and PPS NAL units
    in Annex B form (start codes included, as libx264 writes its global header); for AAC, the
    AudioSpecificConfig. ``bitrate`` is the target in bits per second.
    """

    name: str
    kind: TrackKind
    codec: str
    timescale: int
    codec_config: bytes
    bitrate: int
    width: int = 0
    height: int = 0
    frame_rate: float = 0.0
    sample_rate: int = 0
    channels: int = 0


@dataclass(frozen=True)
class EncodedSample:
    """One access unit (a video frame or an audio frame).

    ``dts``/``pts``/``duration`` are in the track's timescale. ``duration`` may be 0 when the producer
    does not know it; the packager then derives it from the next sample's ``dts``. H.264 ``data`` is
    Annex B (start codes), AAC ``data`` is a raw access unit (no ADTS header).
    """

    dts: int
    pts: int
    duration: int
    keyframe: bool
    data: bytes


class MediaSink(Protocol):
    """Where a producer (transcoder, passthrough) delivers its output, on the event loop thread."""

    def add_track(self, track: TrackInfo) -> None:
        """Declare (or re-declare, after a format change) a track before its first sample."""

    def add_sample(self, track_name: str, sample: EncodedSample) -> None:
        """Deliver one sample; samples of one track arrive in decode order."""

    def discontinuity(self) -> None:
        """The source restarted (a republish, a reconnect): timestamps restart after this."""

    def end(self) -> None:
        """The source ended; no more samples follow."""
