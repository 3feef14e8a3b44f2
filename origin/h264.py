"""H.264 bitstream helpers for MP4 packaging: NAL splitting, AVCC sample conversion, SPS parsing, avcC.

Pure functions over bytes, no I/O. Only what an fMP4 writer needs: the size and profile of the picture
(from the SPS) and the framing change from Annex B (start codes, what encoders emit) to AVCC
(4-byte lengths, what MP4 samples hold).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

# An 'avc1' sample entry carries every parameter set in avcC, and access unit delimiters have no use in
# MP4, so by default both are stripped from samples.
AVC1_DROPPED_NAL_TYPES = frozenset({NAL_SPS, NAL_PPS, NAL_AUD})

AAC_LC_CODECS = "mp4a.40.2"

# Profiles whose SPS carries chroma_format_idc, bit depths and scaling lists (H.264 7.3.2.1.1).
_HIGH_SPS_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
# Profiles whose avcC carries the chroma/bit-depth extension (ISO/IEC 14496-15 5.3.3.1.2).
_AVCC_EXTENSION_PROFILES = frozenset({100, 110, 122, 244})


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex B byte stream into NAL units, start codes removed.

    Accepts 3- and 4-byte start codes; bytes before the first start code are ignored, and trailing
    zero bytes (the leading zero of a 4-byte start code, or trailing_zero_8bits) are not part of a NAL.
    """
    nals = []
    start = data.find(b"\x00\x00\x01")
    while start != -1:
        begin = start + 3
        start = data.find(b"\x00\x00\x01", begin)
        # A NAL unit never ends in a zero byte (rbsp_trailing_bits), so stripping zeros is safe.
        nal = data[begin : len(data) if start == -1 else start].rstrip(b"\x00")
        if nal:
            nals.append(nal)
    return nals


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def annexb_to_length_prefixed(data: bytes, drop_types: frozenset[int] = AVC1_DROPPED_NAL_TYPES) -> bytes:
    """Convert an Annex B access unit to AVCC: each NAL prefixed by its 4-byte big-endian length.

    NAL units whose type is in ``drop_types`` are left out (by default SPS, PPS and AUD).
    """
    return b"".join(
        struct.pack(">I", len(nal)) + nal for nal in split_annexb(data) if nal_type(nal) not in drop_types
    )


def parameter_sets(codec_config: bytes) -> tuple[bytes, bytes]:
    """Return the first (SPS, PPS) NAL units of an Annex B global header; ValueError if either is missing."""
    nals = split_annexb(codec_config)
    sps = next((nal for nal in nals if nal_type(nal) == NAL_SPS), None)
    pps = next((nal for nal in nals if nal_type(nal) == NAL_PPS), None)
    if sps is None or pps is None:
        raise ValueError("codec config lacks an SPS or a PPS")
    return sps, pps


@dataclass(frozen=True)
class SpsInfo:
    """What a container needs from a sequence parameter set. ``width``/``height`` are in pixels, cropped."""

    profile_idc: int
    constraint_flags: int
    level_idc: int
    width: int
    height: int
    chroma_format_idc: int = 1
    bit_depth_luma: int = 8
    bit_depth_chroma: int = 8


class _BitReader:
    """Reads an RBSP (emulation prevention already removed) most significant bit first."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._remaining = len(data) * 8

    def bits(self, count: int) -> int:
        if count > self._remaining:
            raise ValueError("SPS is truncated")
        self._remaining -= count
        return (self._value >> self._remaining) & ((1 << count) - 1)

    def flag(self) -> bool:
        return self.bits(1) == 1

    def ue(self) -> int:
        leading_zeros = 0
        while self.bits(1) == 0:
            leading_zeros += 1
            if leading_zeros > 31:
                raise ValueError("exp-Golomb code too long")
        return (1 << leading_zeros) - 1 + self.bits(leading_zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code % 2 else -(code // 2)


def remove_emulation_prevention(nal: bytes) -> bytes:
    # Encoders insert 0x03 after any two zero bytes that would otherwise look like a start code.
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _skip_scaling_list(reader: _BitReader, size: int) -> None:
    # Each delta moves the scale modulo 256; a zero scale ends the list early (the default matrix applies).
    scale = 8
    for _ in range(size):
        scale = (scale + reader.se()) % 256
        if scale == 0:
            return


def parse_sps(nal: bytes) -> SpsInfo:
    """Parse an SPS NAL unit (header byte included, no start code) far enough to learn the picture size.

    Raises ValueError for a NAL that is not an SPS or is truncated.
    """
    if not nal or nal_type(nal) != NAL_SPS:
        raise ValueError("not an SPS NAL unit")
    reader = _BitReader(remove_emulation_prevention(nal[1:]))
    profile_idc, constraint_flags, level_idc = reader.bits(8), reader.bits(8), reader.bits(8)
    reader.ue()  # seq_parameter_set_id
    chroma_format_idc, separate_colour_plane, bit_depth_luma, bit_depth_chroma = 1, False, 8, 8
    if profile_idc in _HIGH_SPS_PROFILES:
        chroma_format_idc = reader.ue()
        if chroma_format_idc == 3:
            separate_colour_plane = reader.flag()
        bit_depth_luma = reader.ue() + 8
        bit_depth_chroma = reader.ue() + 8
        reader.flag()  # qpprime_y_zero_transform_bypass_flag
        if reader.flag():  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma_format_idc != 3 else 12):
                if reader.flag():
                    _skip_scaling_list(reader, 16 if index < 6 else 64)
    reader.ue()  # log2_max_frame_num_minus4
    pic_order_cnt_type = reader.ue()
    if pic_order_cnt_type == 0:
        reader.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif pic_order_cnt_type == 1:
        reader.flag()  # delta_pic_order_always_zero_flag
        reader.se()  # offset_for_non_ref_pic
        reader.se()  # offset_for_top_to_bottom_field
        for _ in range(reader.ue()):
            reader.se()  # offset_for_ref_frame
    reader.ue()  # max_num_ref_frames
    reader.flag()  # gaps_in_frame_num_value_allowed_flag
    width_in_mbs = reader.ue() + 1
    height_in_map_units = reader.ue() + 1
    frame_mbs_only = reader.flag()
    if not frame_mbs_only:
        reader.flag()  # mb_adaptive_frame_field_flag
    reader.flag()  # direct_8x8_inference_flag
    crop_left = crop_right = crop_top = crop_bottom = 0
    if reader.flag():  # frame_cropping_flag
        crop_left, crop_right, crop_top, crop_bottom = reader.ue(), reader.ue(), reader.ue(), reader.ue()

    # Crop offsets count chroma samples (and field rows for interlaced streams), H.264 eq. 7-19..7-22.
    field_factor = 1 if frame_mbs_only else 2
    chroma_array_type = 0 if separate_colour_plane else chroma_format_idc
    if chroma_array_type == 0:
        crop_unit_x, crop_unit_y = 1, field_factor
    else:
        crop_unit_x = 1 if chroma_array_type == 3 else 2
        crop_unit_y = (2 if chroma_array_type == 1 else 1) * field_factor
    return SpsInfo(
        profile_idc=profile_idc,
        constraint_flags=constraint_flags,
        level_idc=level_idc,
        width=width_in_mbs * 16 - crop_unit_x * (crop_left + crop_right),
        height=height_in_map_units * 16 * field_factor - crop_unit_y * (crop_top + crop_bottom),
        chroma_format_idc=chroma_format_idc,
        bit_depth_luma=bit_depth_luma,
        bit_depth_chroma=bit_depth_chroma,
    )


def avc_decoder_configuration(sps: bytes, pps: bytes) -> bytes:
    """Build an AVCDecoderConfigurationRecord (the avcC box payload) with 4-byte NAL lengths."""
    info = parse_sps(sps)
    record = bytearray([1, info.profile_idc, info.constraint_flags, info.level_idc])
    record.append(0xFC | 3)  # reserved bits + lengthSizeMinusOne
    record.append(0xE0 | 1)  # reserved bits + numOfSequenceParameterSets
    record += struct.pack(">H", len(sps)) + sps
    record.append(1)  # numOfPictureParameterSets
    record += struct.pack(">H", len(pps)) + pps
    if info.profile_idc in _AVCC_EXTENSION_PROFILES:
        record.append(0xFC | info.chroma_format_idc)
        record.append(0xF8 | (info.bit_depth_luma - 8))
        record.append(0xF8 | (info.bit_depth_chroma - 8))
        record.append(0)  # numOfSequenceParameterSetExt
    return bytes(record)


def codecs_string(sps: SpsInfo) -> str:
    """RFC 6381 codecs value for HLS CODECS, e.g. ``"avc1.64001f"`` (profile, constraints, level in hex)."""
    return f"avc1.{sps.profile_idc:02x}{sps.constraint_flags:02x}{sps.level_idc:02x}"
