"""CMAF fragmented MP4 writer: one init segment per track, then self-contained moof+mdat fragments.

Pure functions over values from ``ingest.media``, no I/O. Each track is packaged on its own (one track
per init segment, track ID 1), as CMAF and LL-HLS renditions expect. A fragment carries its own base
decode time and its data offset is relative to its moof, so fragments can be served as LL-HLS parts
and concatenated into segments in any grouping.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ingest.media import EncodedSample, TrackInfo, TrackKind
from origin import h264

TRACK_ID = 1
# CMAF (ISO/IEC 23000-19) fragments need iso6 features (tfdt v1, signed trun offsets); isom/mp41 keep
# older parsers happy.
_MAJOR_BRAND = b"iso6"
_COMPATIBLE_BRANDS = (b"iso6", b"cmfc", b"isom", b"mp41")
_UNITY_MATRIX = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_LANGUAGE_UND = ((ord("u") - 0x60) << 10) | ((ord("n") - 0x60) << 5) | (ord("d") - 0x60)

# trun flags and per-sample flags (ISO/IEC 14496-12 8.8.8, 8.8.3.1). Every sample gets an explicit
# duration, size, flags and composition offset: simple, and each part describes itself fully.
_TRUN_FLAGS = (
    0x000001  # data-offset-present
    | 0x000100  # sample-duration-present
    | 0x000200  # sample-size-present
    | 0x000400  # sample-flags-present
    | 0x000800  # sample-composition-time-offsets-present
)
_TFHD_DEFAULT_BASE_IS_MOOF = 0x020000
_SYNC_SAMPLE_FLAGS = 2 << 24  # depends on no other sample
_NON_SYNC_SAMPLE_FLAGS = (1 << 24) | (1 << 16)  # depends on others, sample_is_non_sync_sample


def box(kind: bytes, *payload: bytes) -> bytes:
    """Wrap the concatenated ``payload`` in an ISO BMFF box of four-character type ``kind``."""
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A box whose payload starts with a version byte and 24 bits of flags."""
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def init_segment(track: TrackInfo) -> bytes:
    """ftyp + moov for one H.264 or AAC track, with no samples (they all come in fragments)."""
    ftyp = box(b"ftyp", _MAJOR_BRAND, struct.pack(">I", 0), *_COMPATIBLE_BRANDS)
    # trex defaults stay zero: every trun spells out each sample's duration, size and flags.
    trex = full_box(b"trex", 0, 0, struct.pack(">5I", TRACK_ID, 1, 0, 0, 0))
    return ftyp + box(b"moov", _mvhd(), _trak(track), box(b"mvex", trex))


def media_fragment(
    track: TrackInfo, sequence_number: int, base_decode_time: int, samples: Sequence[EncodedSample]
) -> bytes:
    """moof + mdat holding ``samples`` in decode order.

    ``sequence_number`` must increase from one fragment to the next; ``base_decode_time`` (>= 0) is the
    first sample's decode time in ``track.timescale`` ticks. H.264 sample data is Annex B and is written
    length-prefixed; AAC data is written as is. Every sample needs ``duration > 0``. ValueError if a
    requirement is not met or ``samples`` is empty.
    """
    if not samples:
        raise ValueError("a fragment needs at least one sample")
    if base_decode_time < 0:
        raise ValueError(f"negative base decode time {base_decode_time}")
    is_h264 = track.codec == "h264"
    payloads = [h264.annexb_to_length_prefixed(s.data) if is_h264 else s.data for s in samples]
    entries = []
    for sample, payload in zip(samples, payloads):
        if sample.duration <= 0:
            raise ValueError(f"sample at dts {sample.dts} has no duration")
        # Audio frames decode on their own whatever the producer flagged.
        sync = sample.keyframe or track.kind is TrackKind.AUDIO
        flags = _SYNC_SAMPLE_FLAGS if sync else _NON_SYNC_SAMPLE_FLAGS
        entries.append(struct.pack(">IIIi", sample.duration, len(payload), flags, sample.pts - sample.dts))

    def moof(data_offset: int) -> bytes:
        return box(
            b"moof",
            full_box(b"mfhd", 0, 0, struct.pack(">I", sequence_number)),
            box(
                b"traf",
                full_box(b"tfhd", 0, _TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", TRACK_ID)),
                full_box(b"tfdt", 1, 0, struct.pack(">Q", base_decode_time)),
                full_box(b"trun", 1, _TRUN_FLAGS, struct.pack(">Ii", len(samples), data_offset), *entries),
            ),
        )

    # The moof's size does not depend on the offset's value, so measure it once with a placeholder.
    mdat_payload_offset = len(moof(0)) + 8
    return moof(mdat_payload_offset) + box(b"mdat", *payloads)


def _mvhd() -> bytes:
    return full_box(
        b"mvhd", 0, 0,
        struct.pack(">IIII", 0, 0, 1000, 0),  # creation, modification, timescale, duration
        struct.pack(">IH10x", 0x00010000, 0x0100),  # rate 1.0, volume 1.0, reserved
        _UNITY_MATRIX,
        bytes(24),  # pre_defined
        struct.pack(">I", TRACK_ID + 1),  # next_track_ID
    )  # fmt: skip


def _trak(track: TrackInfo) -> bytes:
    is_video = track.kind is TrackKind.VIDEO
    if track.codec == "h264":
        sps, pps = h264.parameter_sets(track.codec_config)
        sps_info = h264.parse_sps(sps)
        width, height = track.width or sps_info.width, track.height or sps_info.height
        sample_entry = _avc1(sps_info, h264.avc_decoder_configuration(sps, pps))
    elif track.codec == "aac":
        width = height = 0
        sample_entry = _mp4a(track)
    else:
        raise ValueError(f"cannot package codec {track.codec!r}")
    tkhd = full_box(
        b"tkhd", 0, 0x3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, TRACK_ID, 0, 0),  # creation, modification, track_ID, reserved, duration
        struct.pack(">8xhhH2x", 0, 0, 0 if is_video else 0x0100),  # layer, alternate_group, volume
        _UNITY_MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )  # fmt: skip
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, track.timescale, 0, _LANGUAGE_UND, 0))
    handler, handler_name = (b"vide", b"VideoHandler") if is_video else (b"soun", b"SoundHandler")
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, handler), handler_name + b"\x00")
    media_header = (
        full_box(b"vmhd", 0, 1, struct.pack(">HHHH", 0, 0, 0, 0))
        if is_video
        else full_box(b"smhd", 0, 0, struct.pack(">hH", 0, 0))
    )
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    empty_table = struct.pack(">I", 0)
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry),
        full_box(b"stts", 0, 0, empty_table),
        full_box(b"stsc", 0, 0, empty_table),
        full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        full_box(b"stco", 0, 0, empty_table),
    )
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", media_header, dinf, stbl)))


def _avc1(sps_info: h264.SpsInfo, avcc: bytes) -> bytes:
    return box(
        b"avc1",
        struct.pack(">6xH", 1),  # reserved, data_reference_index
        struct.pack(">HH12x", 0, 0),  # pre_defined, reserved, pre_defined
        struct.pack(">HHII4xH", sps_info.width, sps_info.height, 0x00480000, 0x00480000, 1),  # 72 dpi, 1 frame
        bytes(32),  # compressorname
        struct.pack(">Hh", 0x0018, -1),  # depth, pre_defined
        box(b"avcC", avcc),
    )


def _mp4a(track: TrackInfo) -> bytes:
    # The 16.16 field cannot hold rates from 64 kHz up; decoders then take the rate from the ASC.
    rate_field = track.sample_rate << 16 if track.sample_rate < 0x10000 else 0
    return box(
        b"mp4a",
        struct.pack(">6xH", 1),  # reserved, data_reference_index
        struct.pack(">8xHHHHI", track.channels, 16, 0, 0, rate_field),
        full_box(b"esds", 0, 0, _es_descriptor(track)),
    )


def _es_descriptor(track: TrackInfo) -> bytes:
    decoder_specific_info = _descriptor(0x05, track.codec_config)
    decoder_config = _descriptor(
        0x04,
        # objectTypeIndication 0x40 (MPEG-4 Audio), streamType 5 (audio) << 2 | reserved bit, bufferSizeDB
        struct.pack(">BB3sII", 0x40, (5 << 2) | 1, bytes(3), track.bitrate, track.bitrate),
        decoder_specific_info,
    )
    sl_config = _descriptor(0x06, b"\x02")  # predefined: MP4 file
    return _descriptor(0x03, struct.pack(">HB", TRACK_ID, 0), decoder_config, sl_config)


def _descriptor(tag: int, *payload: bytes) -> bytes:
    """An MPEG-4 systems descriptor: tag, then the size in 7-bit groups with continuation bits."""
    body = b"".join(payload)
    size = len(body)
    size_bytes = [size & 0x7F]
    while size > 0x7F:
        size >>= 7
        size_bytes.append(0x80 | (size & 0x7F))
    return bytes([tag, *reversed(size_bytes)]) + body
