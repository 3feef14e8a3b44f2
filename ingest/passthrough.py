"""The ``source`` rendition: a source that is already H.264 republished without re-encoding.

The source's access units are normalised to Annex B (MP4 and Matroska carry length-prefixed NAL units
and an avcC header; MPEG-TS and WebRTC already carry Annex B) and stamped on the ladder's timeline, so
the ``source`` rendition and the transcoded rungs share segment boundaries: with passthrough on, the
ladder puts its IDR frames on the source's keyframes.
"""

from __future__ import annotations

from fractions import Fraction

import av
from av.bitstream import BitStreamFilterContext

from ingest.media import VIDEO_TIMESCALE, EncodedSample, TrackInfo, TrackKind

SOURCE_RENDITION = "source"
DEFAULT_SOURCE_BITRATE = 4_000_000  # bits/s, announced until the playlists measure the real one
_START_CODE = b"\x00\x00\x00\x01"
_SPS, _PPS = 7, 8


def _nal_units(annexb: bytes) -> list[bytes]:
    units, index = [], annexb.find(b"\x00\x00\x01")
    while index != -1:
        start = index + 3
        index = annexb.find(b"\x00\x00\x01", start)
        end = len(annexb) if index == -1 else index
        units.append(annexb[start:end].rstrip(b"\x00"))
    return [unit for unit in units if unit]


def parameter_sets(annexb: bytes) -> bytes | None:
    """The first SPS and PPS of an Annex B access unit, as an Annex B global header."""
    units = _nal_units(annexb)
    sps = next((unit for unit in units if unit[0] & 0x1F == _SPS), None)
    pps = next((unit for unit in units if unit[0] & 0x1F == _PPS), None)
    if sps is None or pps is None:
        return None
    return _START_CODE + sps + _START_CODE + pps


def _copy(packet: av.Packet) -> av.Packet:
    """A copy for the bitstream filter, which takes its input's data: the original still has to be
    decoded for the ladder."""
    copy = av.Packet(bytes(packet))
    copy.pts, copy.dts, copy.time_base = packet.pts, packet.dts, packet.time_base
    copy.is_keyframe = packet.is_keyframe
    return copy


class H264Passthrough:
    """Turns one H.264 stream's packets into ``source`` samples. Call from the producer thread."""

    def __init__(self, stream: av.video.stream.VideoStream, frame_rate: float) -> None:
        self._stream = stream
        self._frame_rate = frame_rate or 30.0
        extradata = bytes(stream.codec_context.extradata or b"")
        # avcC (MP4, Matroska) starts with version 1; Annex B extradata starts with a start code.
        self._filter = BitStreamFilterContext("h264_mp4toannexb", stream) \
            if extradata[:1] == b"\x01" else None
        self.track: TrackInfo | None = None

    def samples(self, packet: av.Packet,
                to_output: callable) -> list[tuple[TrackInfo | None, EncodedSample]]:
        """Samples for ``packet`` (none before the first keyframe with parameter sets).
        ``to_output(dts_seconds)`` maps a source decode time to the ladder's output seconds.
        Each sample comes with the track to declare first, when it is new."""
        results = []
        units = self._filter.filter(_copy(packet)) if self._filter is not None else [packet]
        for unit in units:
            if unit.dts is None or unit.size == 0:
                continue
            data = bytes(unit)
            declare = None
            if self.track is None:
                if not unit.is_keyframe:
                    continue
                header = parameter_sets(data) or parameter_sets(
                    bytes(self._stream.codec_context.extradata or b""))
                if header is None:
                    continue
                context = self._stream.codec_context
                self.track = declare = TrackInfo(
                    name=SOURCE_RENDITION, kind=TrackKind.VIDEO, codec="h264",
                    timescale=VIDEO_TIMESCALE, codec_config=header,
                    bitrate=int(context.bit_rate or DEFAULT_SOURCE_BITRATE),
                    width=context.width, height=context.height, frame_rate=self._frame_rate)
            time_base = unit.time_base or Fraction(1, VIDEO_TIMESCALE)
            dts = float(unit.dts * time_base)
            pts = float(unit.pts * time_base) if unit.pts is not None else dts
            output_dts = to_output(dts)
            output_pts = output_dts + (pts - dts)
            results.append((declare, EncodedSample(
                dts=round(output_dts * VIDEO_TIMESCALE), pts=round(output_pts * VIDEO_TIMESCALE),
                duration=0, keyframe=unit.is_keyframe, data=data)))
        return results
