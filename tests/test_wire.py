"""Window events as flat fields: table-driven round trips, no media bytes, bad input refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ingest.media import TrackInfo, TrackKind
from origin.live import LiveSettings, StreamEnded, TrackDeclared
from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.wire import (WireError, decode_event, decode_settings, encode_event, encode_settings,
                         pack_event, unpack_event)

VIDEO = TrackInfo("720p", TrackKind.VIDEO, "h264", 90_000, b"\x00\x00\x00\x01\x67\x64\x00\x1f\xff",
                  2_800_000, width=1280, height=720, frame_rate=29.97002997002997)
AUDIO = TrackInfo("audio", TrackKind.AUDIO, "aac", 48_000, bytes([0x11, 0x90]), 128_000,
                  sample_rate=48_000, channels=2)

# (event, what decoding gives back): the same event without its media bytes.
CASES = [
    (TrackDeclared(VIDEO, b"init-bytes"), TrackDeclared(VIDEO, b"")),
    (TrackDeclared(AUDIO, b""), TrackDeclared(AUDIO, b"")),
    (SegmentOpened("720p", 0, 1_700_000_000.123456, False),) * 2,
    (SegmentOpened("audio", 2**40, 0.1 + 0.2, True),) * 2,
    (PartReady("720p", 7, 3, 0.3336666666666667, True, b"moof..."),
     PartReady("720p", 7, 3, 0.3336666666666667, True, b"")),
    (PartReady("audio", 0, 0, 0.021333333333333333, False, b""),) * 2,
    (SegmentReady("720p", 7, 2.002, 6, 412_345, b"x" * 10),
     SegmentReady("720p", 7, 2.002, 6, 412_345, b"")),
    (StreamEnded(), StreamEnded()),
    # A later format of a track: its init generation names its init URI (init-2.mp4).
    (TrackDeclared(VIDEO, b"init-bytes", 2), TrackDeclared(VIDEO, b"", 2)),
    (SegmentOpened("720p", 9, 1_700_000_002.0, True, 2),) * 2,
]


@pytest.mark.parametrize("event, decoded", CASES, ids=lambda value: type(value).__name__)
def test_events_round_trip_without_media_bytes(event, decoded):
    fields = encode_event(event)
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in fields.items())
    assert decode_event(fields) == decoded
    # As Redis answers: bytes keys and values.
    assert decode_event({k.encode(): v.encode() for k, v in fields.items()}) == decoded
    assert unpack_event(pack_event(event)) == decoded


def test_no_media_bytes_travel_in_the_fields():
    fields = encode_event(PartReady("720p", 1, 0, 0.5, True, b"\xffSECRET-MEDIA"))
    assert not any("SECRET" in value for value in fields.values())
    declared = encode_event(TrackDeclared(VIDEO, b"INIT-SEGMENT"))
    assert not any("INIT" in value for value in declared.values())


def test_track_info_round_trips_exactly_including_float_frame_rates():
    odd = replace(VIDEO, frame_rate=1 / 3, codec_config=bytes(range(256)), bitrate=1)
    assert decode_event(encode_event(TrackDeclared(odd, b""))).track == odd


@pytest.mark.parametrize("fields, message", [
    ({"v": "2", "e": "end"}, "version"),
    ({"e": "end"}, "version"),
    ({"v": "1", "e": "nope"}, "unknown event type"),
    ({"v": "1", "e": "part", "t": "a", "m": "1"}, "bad 'part'"),
    ({"v": "1", "e": "open", "t": "a", "m": "x", "pdt": "1.0", "disc": "0"}, "bad 'open'"),
    ({"v": "1", "e": "open", "t": "a", "m": "1", "pdt": "1.0", "disc": "yes"}, "bad 'open'"),
    ({"v": "1", "e": "track", "t": "a", "kind": "smell", "codec": "h264", "ts": "1",
      "config": "", "br": "1", "w": "0", "h": "0", "fps": "0", "sr": "0", "ch": "0"}, "bad 'track'"),
    ({b"v": b"1", b"e": b"\xff\xfe"}, "not text"),
])
def test_bad_fields_raise_wire_error(fields, message):
    with pytest.raises(WireError, match=message):
        decode_event(fields)


@pytest.mark.parametrize("value", [b"not json", b"[1, 2]", b'{"v": "1"}'])
def test_bad_packed_values_raise_wire_error(value):
    with pytest.raises(WireError):
        unpack_event(value)


def test_encoding_a_non_event_is_a_type_error():
    with pytest.raises(TypeError):
        encode_event("segment")  # type: ignore[arg-type]


@pytest.mark.parametrize("settings, part_target", [
    (LiveSettings(2.0, 0.5, 6), 0.522),
    (LiveSettings(1.0, 0.25, 3), 0.272),
    (LiveSettings(6.006, 1.001, 10_000), 1.023),
])
def test_settings_round_trip(settings, part_target):
    fields = encode_settings(settings, part_target)
    assert decode_settings(fields) == (settings, part_target)
    assert decode_settings({k.encode(): v.encode() for k, v in fields.items()}) == \
        (settings, part_target)


def test_bad_settings_raise_wire_error():
    with pytest.raises(WireError):
        decode_settings({"v": "1", "seg": "2"})
    with pytest.raises(WireError):
        decode_settings({"v": "0", "seg": "2", "part": "1", "window": "3", "part_target": "1"})
