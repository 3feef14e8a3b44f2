"""H.264 helpers against hand-built byte strings and against real libx264 parameter sets."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from origin import h264


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"\0\0\0\1\x09\xf0\0\0\0\1\x67\x64", [b"\x09\xf0", b"\x67\x64"], id="4-byte"),
        pytest.param(b"\0\0\1\x65\x88\0\0\1\x41\x9a", [b"\x65\x88", b"\x41\x9a"], id="3-byte"),
        pytest.param(b"\0\0\0\1\x67\x42\0\0\1\x68\xce\0\0", [b"\x67\x42", b"\x68\xce"], id="mixed+trailing-zeros"),
        pytest.param(b"\xff\xee\0\0\1\x06\x05", [b"\x06\x05"], id="junk-before-first-start-code"),
        pytest.param(b"\0\0\1\x67\0\0\3\1\x80", [b"\x67\0\0\3\1\x80"], id="emulation-prevention-kept"),
        pytest.param(b"\0\0\1\0\0\1\x41", [b"\x41"], id="empty-nal-skipped"),
        pytest.param(b"", [], id="empty"),
    ],
)
def test_split_annexb(stream: bytes, expected: list[bytes]) -> None:
    assert h264.split_annexb(stream) == expected


# AUD, SPS, PPS, SEI, IDR slice (payloads truncated: only the framing matters here).
ACCESS_UNIT = (
    b"\0\0\0\1\x09\xf0" b"\0\0\0\1\x67\x64\x00\x1f" b"\0\0\0\1\x68\xee" b"\0\0\1\x06\x05\x01" b"\0\0\1\x65\x88\x84"
)


@pytest.mark.parametrize(
    ("drop_types", "expected"),
    [
        pytest.param(
            h264.AVC1_DROPPED_NAL_TYPES, b"\0\0\0\3\x06\x05\x01" b"\0\0\0\3\x65\x88\x84", id="default-drops-aud-sps-pps"
        ),
        pytest.param(
            frozenset({9}),
            b"\0\0\0\4\x67\x64\x00\x1f" b"\0\0\0\2\x68\xee" b"\0\0\0\3\x06\x05\x01" b"\0\0\0\3\x65\x88\x84",
            id="aud-only",
        ),
    ],
)
def test_annexb_to_length_prefixed(drop_types: frozenset[int], expected: bytes) -> None:
    assert h264.annexb_to_length_prefixed(ACCESS_UNIT, drop_types) == expected


def test_parameter_sets_requires_both() -> None:
    assert h264.parameter_sets(ACCESS_UNIT) == (b"\x67\x64\x00\x1f", b"\x68\xee")
    with pytest.raises(ValueError):
        h264.parameter_sets(b"\0\0\0\1\x68\xee")


class _BitWriter:
    def __init__(self) -> None:
        self.bits = ""

    def u(self, count: int, value: int) -> None:
        self.bits += format(value, f"0{count}b")

    def ue(self, value: int) -> None:
        code = format(value + 1, "b")
        self.bits += "0" * (len(code) - 1) + code

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def rbsp(self) -> bytes:
        bits = self.bits + "1"  # rbsp_stop_one_bit, then zero alignment
        bits += "0" * (-len(bits) % 8)
        return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _add_emulation_prevention(rbsp: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def test_parse_sps_removes_emulation_prevention_before_the_picture_size() -> None:
    # Baseline SPS with pic_order_cnt_type 1: its large signed offsets are the only long zero runs, and
    # they come ahead of the size fields, so the escaped NAL has 00 00 03 before width/height.
    writer = _BitWriter()
    writer.u(8, 66), writer.u(8, 0xC0), writer.u(8, 30)
    writer.ue(0), writer.ue(0)  # seq_parameter_set_id, log2_max_frame_num_minus4
    writer.ue(1), writer.u(1, 0), writer.se(1 << 15), writer.se(1 << 15), writer.ue(0)  # POC type 1
    writer.ue(1), writer.u(1, 0)  # max_num_ref_frames, gaps
    writer.ue(640 // 16 - 1), writer.ue(368 // 16 - 1)
    writer.u(1, 1), writer.u(1, 1)  # frame_mbs_only, direct_8x8_inference
    writer.u(1, 1), writer.ue(0), writer.ue(0), writer.ue(0), writer.ue(4)  # crop 8 rows (4 x 2) at the bottom
    writer.u(1, 0)  # no VUI
    nal = b"\x67" + _add_emulation_prevention(writer.rbsp())
    assert b"\0\0\3" in nal

    info = h264.parse_sps(nal)

    assert (info.profile_idc, info.constraint_flags, info.level_idc) == (66, 0xC0, 30)
    assert (info.width, info.height) == (640, 360)


def test_parse_sps_rejects_other_nal_types() -> None:
    with pytest.raises(ValueError):
        h264.parse_sps(b"\x68\xee\x3c\x80")
    with pytest.raises(ValueError):
        h264.parse_sps(b"\x67\x64")  # truncated


def _x264_headers_and_frame(
    width: int, height: int, pix_fmt: str, options: dict[str, str]
) -> tuple[bytes, list[av.Packet]]:
    """Open libx264 with a global header and encode one gradient frame: (Annex B SPS+PPS, packets)."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, pix_fmt
    encoder.time_base = Fraction(1, 90_000)
    encoder.framerate = Fraction(30)
    encoder.options = {"preset": "veryfast", "tune": "zerolatency", "bf": "0", **options}
    encoder.flags |= av.codec.context.Flags.global_header
    ramp = (np.arange(width)[None, :] + 2 * np.arange(height)[:, None]) % 256
    rgb = np.stack([ramp, 255 - ramp, np.full_like(ramp, 64)], axis=-1).astype(np.uint8)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
    frame.pts = 0
    packets = encoder.encode(frame) + encoder.encode(None)
    return bytes(encoder.extradata), packets


def _decode_avcc(sps: bytes, pps: bytes, packets: list[av.Packet]) -> tuple[av.CodecContext, list[av.VideoFrame]]:
    """Decode Annex B packets the MP4 way: converted to AVCC, parameter sets only in our avcC record."""
    decoder = av.CodecContext.create("h264", "r")
    decoder.extradata = h264.avc_decoder_configuration(sps, pps)
    avcc_packets = [av.Packet(h264.annexb_to_length_prefixed(bytes(packet))) for packet in packets]
    return decoder, [frame for packet in [*avcc_packets, None] for frame in decoder.decode(packet)]


@pytest.mark.parametrize(
    ("width", "height", "pix_fmt", "options", "profile_idc", "profile_name"),
    [
        pytest.param(640, 360, "yuv420p", {}, 100, "High", id="high-360"),
        pytest.param(480, 270, "yuv420p", {}, 100, "High", id="high-270"),
        pytest.param(480, 270, "yuv420p", {"profile": "baseline"}, 66, "Constrained Baseline", id="baseline"),
        pytest.param(480, 270, "yuv420p", {"x264-params": "cqm=jvt"}, 100, "High", id="scaling-lists"),
        pytest.param(480, 270, "yuv420p10le", {}, 110, "High 10", id="high10"),
        pytest.param(480, 270, "yuv422p", {}, 122, "High 4:2:2", id="high422"),
        pytest.param(474, 270, "yuv444p", {}, 244, "High 4:4:4 Predictive", id="high444-odd-crop"),
        pytest.param(480, 268, "yuv420p", {"x264-params": "tff=1"}, 100, "High", id="interlaced"),
    ],
)
def test_parse_sps_matches_libx264_and_ffmpeg(
    width: int, height: int, pix_fmt: str, options: dict[str, str], profile_idc: int, profile_name: str
) -> None:
    extradata, packets = _x264_headers_and_frame(width, height, pix_fmt, options)
    sps, pps = h264.parameter_sets(extradata)

    info = h264.parse_sps(sps)

    assert (info.width, info.height, info.profile_idc) == (width, height, profile_idc)
    assert h264.codecs_string(info) == f"avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}"
    decoder, frames = _decode_avcc(sps, pps, packets)
    assert [(frame.width, frame.height) for frame in frames] == [(width, height)]
    assert (decoder.profile, decoder.level) == (profile_name, info.level_idc)


def _bits_of(data: bytes) -> str:
    return "".join(format(byte, "08b") for byte in data)


def _with_flat_scaling_lists(sps: bytes, first_list_default: bool) -> bytes:
    """Rewrite a high-profile SPS to carry explicit scaling lists (x264 only ever writes flat matrices
    in the PPS). Flat-16 lists dequantise exactly like no lists; ``first_list_default`` makes list 0
    signal "use the default" through a zero next_scale instead."""
    bits = _bits_of(h264.remove_emulation_prevention(sps[1:]))

    def after_ue(position: int) -> int:
        leading_zeros = bits.index("1", position) - position
        return position + 2 * leading_zeros + 1

    position = after_ue(24)  # past profile, constraints, level, seq_parameter_set_id
    chroma_format_idc = int(bits[position : after_ue(position)], 2) - 1
    position = after_ue(position) + (chroma_format_idc == 3)  # separate_colour_plane_flag
    position = after_ue(after_ue(position)) + 1  # bit depths, qpprime_y_zero_transform_bypass_flag
    assert bits[position] == "0"  # seq_scaling_matrix_present_flag as x264 writes it
    writer = _BitWriter()
    writer.bits = bits[:position] + "1"
    for index in range(8 if chroma_format_idc != 3 else 12):
        writer.u(1, 1)  # scaling_list_present
        if index == 0 and first_list_default:
            writer.se(-8)  # next_scale 0: stop reading, use Default_4x4_Intra
            continue
        writer.se(8)  # 8 -> 16
        for _ in range(15 if index < 6 else 63):
            writer.se(0)
    writer.bits += bits[position + 1 :].rstrip("0")[:-1]  # the rest, without stop bit and alignment
    return sps[:1] + _add_emulation_prevention(writer.rbsp())


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_parse_sps_skips_scaling_lists(pix_fmt: str) -> None:
    extradata, packets = _x264_headers_and_frame(320, 180, pix_fmt, {})
    sps, pps = h264.parameter_sets(extradata)
    flat_sps = _with_flat_scaling_lists(sps, first_list_default=False)
    default_sps = _with_flat_scaling_lists(sps, first_list_default=True)

    for rewritten in (flat_sps, default_sps):
        info = h264.parse_sps(rewritten)
        assert (info.width, info.height) == (320, 180)

    # FFmpeg agrees the rewritten SPS is well formed: flat lists decode to the very same picture.
    _, [original] = _decode_avcc(sps, pps, packets)
    _, [flat] = _decode_avcc(flat_sps, pps, packets)
    assert np.array_equal(original.to_ndarray(), flat.to_ndarray())


def test_avc_decoder_configuration_layout() -> None:
    extradata, _ = _x264_headers_and_frame(640, 360, "yuv420p", {})
    sps, pps = h264.parameter_sets(extradata)

    record = h264.avc_decoder_configuration(sps, pps)

    assert record[:6] == bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1])
    assert record[6:8] == len(sps).to_bytes(2, "big") and record[8 : 8 + len(sps)] == sps
    rest = record[8 + len(sps) :]
    assert rest[0] == 1 and rest[1:3] == len(pps).to_bytes(2, "big") and rest[3 : 3 + len(pps)] == pps
    # High profile extension: 4:2:0, 8-bit luma and chroma, no SPS extensions.
    assert rest[3 + len(pps) :] == bytes([0xFC | 1, 0xF8, 0xF8, 0])


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (h264.SpsInfo(100, 0x00, 31, 1280, 720), "avc1.64001f"),
        (h264.SpsInfo(66, 0xC0, 30, 640, 360), "avc1.42c01e"),
        (h264.SpsInfo(77, 0x40, 40, 1920, 1080), "avc1.4d4028"),
    ],
)
def test_codecs_string(info: h264.SpsInfo, expected: str) -> None:
    assert h264.codecs_string(info) == expected
    assert h264.AAC_LC_CODECS == "mp4a.40.2"


def test_split_annexb_on_libx264_access_unit() -> None:
    # A gradient, not a blank frame, so the encoder produces a non-trivial IDR slice.
    width, height = 320, 180
    luma = ((np.arange(width)[None, :] + np.arange(height)[:, None]) % 256).astype(np.uint8)
    image = np.concatenate([luma, np.full((height // 2, width), 128, np.uint8)])
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, 90_000)
    encoder.options = {"preset": "veryfast", "tune": "zerolatency", "bf": "0"}
    encoder.flags |= av.codec.context.Flags.global_header
    frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
    frame.pts = 0
    packets = encoder.encode(frame) + encoder.encode(None)

    nal_types = [h264.nal_type(nal) for nal in h264.split_annexb(bytes(packets[0]))]

    assert 5 in nal_types  # an IDR slice
    assert h264.NAL_SPS not in nal_types  # global header: parameter sets live in extradata only
    assert h264.parse_sps(h264.parameter_sets(bytes(encoder.extradata))[0]).height == height
