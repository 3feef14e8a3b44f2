"""Window events as flat text fields, for a shared log (a Redis Stream entry, a hash field).

Pure: values in, values out, no I/O. An event is encoded WITHOUT the bytes of its part or segment
(those are stored under their own keys, ``origin.window.object_key``) and without the init segment
of a track declaration; decoding gives them back with ``data=b""`` / ``init_segment=b""``.
``SegmentReady`` keeps its ``size``, so a replica still measures bitrates. Floats are written with
``repr`` (shortest exact form), so every other field round-trips exactly.

Field names are short because a live stream writes a few dozen events a second per rendition:
``e`` (the event type), ``t`` (track), ``m`` (media sequence number), and so on. ``v`` is the
format version; a decoder refuses versions it does not know rather than guess.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ingest.media import TrackInfo, TrackKind
from origin.live import StreamEnded, TrackDeclared, WindowEvent
from origin.packager import PartReady, SegmentOpened, SegmentReady
from origin.window import LiveSettings

VERSION = "1"

Fields = dict[str, str]


class WireError(ValueError):
    """Fields that do not decode to an event (unknown type or version, missing or bad field)."""


def encode_event(event: WindowEvent) -> Fields:
    """The fields of ``event`` (media bytes left out, see the module docstring)."""
    if isinstance(event, TrackDeclared):
        return {"v": VERSION, "e": "track", **_track_fields(event.track),
                **_generation(event.init_generation)}
    if isinstance(event, SegmentOpened):
        return {"v": VERSION, "e": "open", "t": event.track, "m": str(event.msn),
                "pdt": repr(event.program_date_time), "disc": _flag(event.discontinuity),
                **_generation(event.init_generation)}
    if isinstance(event, PartReady):
        return {"v": VERSION, "e": "part", "t": event.track, "m": str(event.msn),
                "i": str(event.index), "d": repr(event.duration),
                "ind": _flag(event.independent)}
    if isinstance(event, SegmentReady):
        return {"v": VERSION, "e": "ready", "t": event.track, "m": str(event.msn),
                "d": repr(event.duration), "n": str(event.part_count), "size": str(event.size)}
    if isinstance(event, StreamEnded):
        return {"v": VERSION, "e": "end"}
    raise TypeError(f"not a window event: {event!r}")


def decode_event(fields: Mapping[str | bytes, str | bytes]) -> WindowEvent:
    """The event ``encode_event`` made these fields from. Accepts bytes keys and values, as Redis
    answers them. Raises ``WireError`` for anything else."""
    text = _text_fields(fields)
    try:
        if text.get("v") != VERSION:
            raise WireError(f"unknown event format version {text.get('v')!r}")
        kind = text["e"]
        if kind == "track":
            return TrackDeclared(_track_from(text), b"", int(text.get("g", "0")))
        if kind == "open":
            return SegmentOpened(text["t"], int(text["m"]), float(text["pdt"]),
                                 _from_flag(text["disc"]), int(text.get("g", "0")))
        if kind == "part":
            return PartReady(text["t"], int(text["m"]), int(text["i"]), float(text["d"]),
                             _from_flag(text["ind"]), b"")
        if kind == "ready":
            return SegmentReady(text["t"], int(text["m"]), float(text["d"]), int(text["n"]),
                                int(text["size"]), b"")
        if kind == "end":
            return StreamEnded()
    except (KeyError, ValueError) as error:
        if isinstance(error, WireError):
            raise
        raise WireError(f"bad {text.get('e', 'event')!r} fields: {error}") from None
    raise WireError(f"unknown event type {kind!r}")


def pack_event(event: WindowEvent) -> bytes:
    """``encode_event`` as one value (for a hash field): JSON of the fields."""
    return json.dumps(encode_event(event), separators=(",", ":"), sort_keys=True).encode()


def unpack_event(value: bytes | str) -> WindowEvent:
    try:
        fields = json.loads(value)
    except ValueError as error:
        raise WireError(f"not a packed event: {error}") from None
    if not isinstance(fields, dict):
        raise WireError("not a packed event: not an object")
    return decode_event(fields)


def encode_settings(settings: LiveSettings, part_target: float) -> Fields:
    """The window settings a replica needs to render the same playlists as the producing node.
    ``part_target`` is the advertised ``PART-TARGET`` in seconds."""
    return {"v": VERSION, "seg": repr(settings.segment_duration),
            "part": repr(settings.part_duration), "window": str(settings.window_segments),
            "part_target": repr(part_target)}


def decode_settings(fields: Mapping[str | bytes, str | bytes]) -> tuple[LiveSettings, float]:
    """(settings, part_target) from ``encode_settings`` fields; ``WireError`` otherwise."""
    text = _text_fields(fields)
    try:
        if text.get("v") != VERSION:
            raise WireError(f"unknown settings format version {text.get('v')!r}")
        return (LiveSettings(float(text["seg"]), float(text["part"]), int(text["window"])),
                float(text["part_target"]))
    except (KeyError, ValueError) as error:
        if isinstance(error, WireError):
            raise
        raise WireError(f"bad settings fields: {error}") from None


# -- helpers --------------------------------------------------------------------------------------
def _track_fields(track: TrackInfo) -> Fields:
    return {"t": track.name, "kind": track.kind.value, "codec": track.codec,
            "ts": str(track.timescale), "config": track.codec_config.hex(),
            "br": str(track.bitrate), "w": str(track.width), "h": str(track.height),
            "fps": repr(track.frame_rate), "sr": str(track.sample_rate),
            "ch": str(track.channels)}


def _track_from(text: Mapping[str, str]) -> TrackInfo:
    return TrackInfo(name=text["t"], kind=TrackKind(text["kind"]), codec=text["codec"],
                     timescale=int(text["ts"]), codec_config=bytes.fromhex(text["config"]),
                     bitrate=int(text["br"]), width=int(text["w"]), height=int(text["h"]),
                     frame_rate=float(text["fps"]), sample_rate=int(text["sr"]),
                     channels=int(text["ch"]))


def _generation(init_generation: int) -> Fields:
    # The track's init generation (``origin.rendition.init_uri``); absent means 0, so entries
    # written before it existed decode the same.
    return {"g": str(init_generation)} if init_generation else {}


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _from_flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{value!r} is not 0 or 1")
    return value == "1"


def _text_fields(fields: Mapping[str | bytes, str | bytes]) -> dict[str, str]:
    try:
        return {(key.decode() if isinstance(key, bytes) else key):
                (value.decode() if isinstance(value, bytes) else value)
                for key, value in fields.items()}
    except (UnicodeDecodeError, AttributeError) as error:
        raise WireError(f"fields are not text: {error}") from None
