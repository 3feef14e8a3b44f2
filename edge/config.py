"""Node settings: one frozen ``Settings`` value built from a TOML file, the environment and the CLI.

Precedence is TOML < environment < CLI overrides. ``load_settings`` parses every value it is given,
checks ranges and cross-field rules, and reports *all* problems at once in a ``ConfigError`` (one line
each, naming where the bad value came from), so an operator fixes a config in one round.

Units: durations in seconds, ``cache_memory`` in bytes (``512MiB``, ``1GB``, ``512M`` = MiB, plain
integers), bitrates in bits per second (``2800k``, ``2.8M``, plain integers).
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from edge.errors import BadRequest
from edge.names import validate_rendition_name, validate_stream_name
from edge.tokens import DEFAULT_AUDIENCE


@dataclass(frozen=True)
class Rung:
    """One rendition of the transcoding ladder. ``video_bitrate`` is in bits per second."""

    name: str
    width: int
    height: int
    video_bitrate: int
    max_frame_rate: float | None = None


DEFAULT_LADDER = (
    Rung("1080p", 1920, 1080, 5_000_000),
    Rung("720p", 1280, 720, 2_800_000),
    Rung("480p", 854, 480, 1_400_000),
    Rung("360p", 640, 360, 800_000),
)

# The rendition passthrough publishes under; a transcoded rung may not take the name.
SOURCE_RENDITION = "source"


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 3000
    ws_port: int = 3001
    redis_url: str | None = None
    # Redis deployments (issue 4, edge/redis_tier.py): Sentinel or Cluster instead of one URL.
    redis_sentinels: tuple[str, ...] = ()  # host:port of each Sentinel
    redis_sentinel_service: str = "mymaster"
    redis_cluster: bool = False
    redis_dvr_seconds: float = 30.0  # segments stay in Redis this long past the window
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwks_file: str | None = None
    jwt_audience: str = DEFAULT_AUDIENCE  # the aud every token must carry
    jwt_issuer: str | None = None
    playback_auth: str = "open"  # "open" or "token"
    metrics_auth: str = "open"  # "open", or "admin": /metrics wants an admin token (it names streams)
    log_level: str = "info"
    cache_memory: int = 512 * 1024 * 1024  # bytes
    cache_ttl_seconds: float = 3600.0
    segment_duration: float = 2.0  # seconds
    part_duration: float = 0.5  # seconds; LL-HLS part target
    window_segments: int = 6
    ladder: tuple[Rung, ...] = DEFAULT_LADDER
    audio_bitrate: int = 128_000  # bits/s
    x264_preset: str = "veryfast"
    x264_tune: str = "zerolatency"
    passthrough_source: bool = False  # also publish the source H.264 untouched as rendition "source"
    pull_streams: tuple[tuple[str, str], ...] = ()  # (stream name, source URL)
    max_publishers: int = 32
    publish_grace_seconds: float = 10.0
    webrtc_hosts: tuple[str, ...] = ()
    ice_servers: tuple[str, ...] = ()
    demo: bool = False
    max_sessions_per_address: int = 8  # concurrent publish sessions from one client address
    max_sessions_per_subject: int = 8  # concurrent publish sessions under one token subject
    # Hostile clients (edge/limits.py), per client address (IPv6: per /64).
    publish_rate: float = 10.0  # WHIP POSTs and WebSocket ingest handshakes per second
    publish_burst: int = 20  # ... of which this many at once
    auth_failure_limit: int = 20  # refused credentials within 10 s that lock the address out
    auth_lockout_seconds: float = 60.0  # how long a locked-out address gets 429 for credentials
    max_requests_per_address: int = 256  # concurrent HTTP requests (probes excluded); 0: no cap
    http_read_timeout: float = 15.0  # seconds to send a request's headers or offer; idle time
    max_connections_per_address: int = 1024  # open HTTP connections of one address; 0: no cap
    listen_backlog: int = 4096  # the HTTP socket's accept queue (the kernel caps it at somaxconn)
    fast_lane: bool = True  # hot HLS requests answered without aiohttp (edge/fastlane.py)
    http_workers: int = 1  # processes serving viewers on the port (edge/workers.py)
    # Set by the main process on the workers it starts (edge/workers.py), not by operators.
    worker_of: str | None = None  # the main process's private URL: this process is a worker
    worker_secret: str | None = None  # the credential workers and their main process share
    on_publish_url: str | None = None  # webhook: POSTed before a publish starts; non-2xx rejects it
    on_unpublish_url: str | None = None  # webhook: POSTed when a publish ends
    drain_seconds: float = 10.0  # on SIGTERM, how long publishers may take to finish
    # Fleet (edge/fleet.py): gossip membership and peer fill; off unless SEEDS or GOSSIP_KEYS is set.
    node_name: str | None = None  # unique in the fleet; default: host name
    seeds: tuple[str, ...] = ()  # host:port of other members, or a DNS name resolving to many
    gossip_bind: str = "0.0.0.0:7946"
    gossip_advertise: str | None = None  # host:port peers reach our gossip at, if not gossip_bind
    gossip_keys: tuple[str, ...] = ()  # base64 32-byte keys; the first encrypts (rotation)
    fleet_secret: str | None = None  # edge-to-edge credential; default: derived from the gossip key
    advertise_url: str | None = None  # how peers reach our HTTP; default http://NODE_NAME:PORT
    zone: str = ""
    origin_url: str | None = None  # the origin role's HTTP address, the last hop of a miss
    role: str = "edge"  # "edge", or "origin" (livedge origin): no ingest, a shield and directory


class ConfigError(ValueError):
    """Every problem found in a configuration; ``str()`` is one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Invalid(Exception):
    """Raised by a parser with one or more messages (without the source label)."""

    def __init__(self, *messages: str) -> None:
        self.messages = messages
        super().__init__("; ".join(messages))


def _fmt(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def _integer(minimum: int, maximum: int | None = None, unit: str = "") -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            value = int(raw)
        else:
            raise _Invalid(f"{raw!r} is not an integer")
        _check_range(value, minimum, maximum, unit)
        return value

    return parse


def _number(minimum: float, maximum: float | None = None, unit: str = " s") -> Callable[[object], float]:
    def parse(raw: object) -> float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        else:
            try:
                value = float(raw) if isinstance(raw, str) else float("nan")
            except ValueError:
                value = float("nan")
        if value != value or value in (float("inf"), float("-inf")):
            raise _Invalid(f"{raw!r} is not a number")
        _check_range(value, minimum, maximum, unit)
        return value

    return parse


def _check_range(value: float, minimum: float, maximum: float | None, unit: str) -> None:
    if value < minimum:
        raise _Invalid(f"{_fmt(value)} is below the minimum {_fmt(minimum)}{unit}")
    if maximum is not None and value > maximum:
        raise _Invalid(f"{_fmt(value)} is above the maximum {_fmt(maximum)}{unit}")


def _text(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _Invalid(f"{raw!r} is not a non-empty string")
    return raw.strip()


def _optional_text(raw: object) -> str | None:
    if isinstance(raw, str) and not raw.strip():
        return None
    return _text(raw)


def _choice(*options: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        value = raw.strip().lower() if isinstance(raw, str) else raw
        if value not in options:
            raise _Invalid(f"{raw!r} is not one of {', '.join(options)}")
        return value

    return parse


_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off"}


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    word = raw.strip().lower() if isinstance(raw, str) else None
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _Invalid(f"{raw!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTE_UNITS.update({"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40})
_BYTE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
# Below this a cache is useless; a bare "512" here is almost always someone meaning megabytes.
MIN_CACHE_MEMORY = 2**20


def _byte_size(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        match = _SIZE_PATTERN.fullmatch(raw) if isinstance(raw, str) else None
        multiplier = _BYTE_UNITS.get(match.group(2).lower()) if match else None
        if match is None or multiplier is None:
            raise _Invalid(f"{raw!r} is not a size (e.g. 512MiB, 1GB, 536870912)")
        value = round(float(match.group(1)) * multiplier)
    _check_range(value, MIN_CACHE_MEMORY, None, " bytes (1 MiB)")
    return value


_BITRATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_BITRATE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:bps|b/s)?\s*")


def _bitrate(minimum: int, maximum: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = round(raw)
        else:
            match = _BITRATE_PATTERN.fullmatch(raw) if isinstance(raw, str) else None
            if match is None:
                raise _Invalid(f"{raw!r} is not a bitrate (e.g. 2800k, 2.8M, 2800000)")
            value = round(float(match.group(1)) * _BITRATE_UNITS[match.group(2).lower()])
        _check_range(value, minimum, maximum, " bit/s")
        return value

    return parse


def _string_list(check: Callable[[str], str | None] | None = None) -> Callable[[object], tuple[str, ...]]:
    """A comma-separated string or a list of strings; ``check`` returns a problem or ``None``."""

    def parse(raw: object) -> tuple[str, ...]:
        if isinstance(raw, str):
            items = [item.strip() for item in raw.split(",") if item.strip()]
        elif isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
            items = [item.strip() for item in raw]
        else:
            raise _Invalid(f"{raw!r} is not a comma-separated list")
        problems = [problem for item in items if check and (problem := check(item))]
        if problems:
            raise _Invalid(*problems)
        return tuple(items)

    return parse


def _host_problem(host: str) -> str | None:
    return None if host and not re.search(r"[\s/]", host) else f"{host!r} is not a host name or address"


def _redis_url(raw: object) -> str | None:
    url = _optional_text(raw)
    if url is not None and not re.match(r"(rediss?://\S*|unix://\S+)\Z", url):
        # Not echoed: the URL may carry a password.
        raise _Invalid("is not a redis://, rediss:// or unix:// URL")
    return url


def _host_port_problem(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    if host and not _host_problem(host) and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"{address!r} is not host:port"


def _gossip_key_problem(text: str) -> str | None:
    try:
        if len(base64.b64decode(text, validate=True)) == 32:
            return None
    except ValueError:
        pass
    return "a gossip key is 32 random bytes in base64 (the value is not shown)"


def _ice_server_problem(url: str) -> str | None:
    if re.match(r"(stun|turns?):\S+\Z", url):
        return None
    return f"{url!r} is not a stun:, turn: or turns: URL"


_X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
_X264_TUNES = {"film", "animation", "grain", "stillimage", "psnr", "ssim", "fastdecode", "zerolatency"}


def _x264_tune(raw: object) -> str:
    if not isinstance(raw, str):
        raise _Invalid(f"{raw!r} is not a string")
    value = raw.strip().lower()
    unknown = [tune for tune in value.split(",") if tune and tune not in _X264_TUNES]
    if unknown:
        raise _Invalid(f"unknown tune {', '.join(unknown)} (one of {', '.join(sorted(_X264_TUNES))})")
    return value


_parse_dimension = _integer(16, 8192)
_parse_video_bitrate = _bitrate(10_000, 200_000_000)
_parse_frame_rate = _number(1, 240, " fps")
_RUNG_KEYS = {"name", "width", "height", "bitrate", "video_bitrate", "max_frame_rate"}


def _rung(raw: object, position: int) -> Rung:
    """One rung from ``name:WxH:bitrate[:fps]``, a TOML table, or a ``Rung``."""
    if isinstance(raw, Rung):
        raw = {"name": raw.name, "width": raw.width, "height": raw.height,
               "bitrate": raw.video_bitrate, "max_frame_rate": raw.max_frame_rate}  # fmt: skip
    if isinstance(raw, str):
        match = re.fullmatch(r"\s*([^:]+):(\d+)x(\d+):([^:]+)(?::([^:]+))?\s*", raw)
        if match is None:
            raise _Invalid(f"rung {position}: {raw!r} is not name:WIDTHxHEIGHT:bitrate[:fps]")
        name, width, height, bitrate, frame_rate = match.groups()
        raw = {"name": name, "width": width, "height": height, "bitrate": bitrate,
               "max_frame_rate": frame_rate}  # fmt: skip
    if not isinstance(raw, Mapping):
        raise _Invalid(f"rung {position}: {raw!r} is not a table")
    label = f"rung {position}" + (f" ({raw['name']!r})" if isinstance(raw.get("name"), str) else "")
    problems = [f"{label}: unknown key {key!r}" for key in raw if key not in _RUNG_KEYS]
    parsed: dict[str, Any] = {}
    bitrate = raw.get("bitrate", raw.get("video_bitrate"))
    steps: list[tuple[str, object, Callable[[object], Any]]] = [
        ("name", raw.get("name"), _rendition_name),
        ("width", raw.get("width"), _parse_dimension),
        ("height", raw.get("height"), _parse_dimension),
        ("video_bitrate", bitrate, _parse_video_bitrate),
    ]
    if raw.get("max_frame_rate") is not None:
        steps.append(("max_frame_rate", raw["max_frame_rate"], _parse_frame_rate))
    for key, value, parse in steps:
        if value is None:
            problems.append(f"{label}: {key} is missing")
            continue
        try:
            parsed[key] = parse(value)
        except _Invalid as error:
            problems.extend(f"{label}: {key} {message}" for message in error.messages)
    for key in ("width", "height"):
        # 4:2:0 chroma subsampling halves both dimensions, so libx264 needs them even.
        if key in parsed and parsed[key] % 2:
            problems.append(f"{label}: {key} {parsed[key]} is odd; H.264 4:2:0 needs even dimensions")
    if problems:
        raise _Invalid(*problems)
    return Rung(**parsed)


def _rendition_name(raw: object) -> str:
    try:
        return validate_rendition_name(raw.strip() if isinstance(raw, str) else raw)
    except BadRequest as error:
        raise _Invalid(error.message) from None


def _ladder(raw: object) -> tuple[Rung, ...]:
    entries = [entry for entry in raw.split(",") if entry.strip()] if isinstance(raw, str) else raw
    if not isinstance(entries, (list, tuple)):
        raise _Invalid(f"{raw!r} is not a ladder (name:WxH:bitrate,... or [[ladder]] tables)")
    rungs: list[Rung] = []
    problems: list[str] = []
    for position, entry in enumerate(entries, start=1):
        try:
            rungs.append(_rung(entry, position))
        except _Invalid as error:
            problems.extend(error.messages)
    names = [rung.name for rung in rungs]
    problems.extend(f"rung name {name!r} is used twice" for name in _duplicates(names))
    if problems:
        raise _Invalid(*problems)
    return tuple(rungs)


def _duplicates(names: list[str]) -> list[str]:
    return sorted({name for name in names if names.count(name) > 1})


def _pull_streams(raw: object) -> tuple[tuple[str, str], ...]:
    """``name=url,...``, ``[[pull]]`` tables with ``name`` and ``url``, or (name, url) pairs."""
    if isinstance(raw, str):
        entries: Any = [tuple(item.strip().partition("=")[::2]) for item in raw.split(",") if item.strip()]
    elif isinstance(raw, (list, tuple)):
        entries = [(e.get("name"), e.get("url")) if isinstance(e, Mapping) else e for e in raw]
    else:
        raise _Invalid(f"{raw!r} is not a list of name=url pairs")
    pulls: list[tuple[str, str]] = []
    problems: list[str] = []
    for position, entry in enumerate(entries, start=1):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            problems.append(f"pull {position}: {entry!r} is not a name and a url")
            continue
        name, url = entry
        try:
            name = validate_stream_name(name.strip() if isinstance(name, str) else name)
        except BadRequest as error:
            problems.append(f"pull {position}: {error.message}")
            continue
        # FFmpeg-readable: a URL with a scheme, a file: URL, or an absolute file path.
        if not isinstance(url, str) or not re.match(
                r"([A-Za-z][A-Za-z0-9+.-]*://\S+|file:\S+|/\S*)\Z", url.strip()):
            problems.append(f"pull {position} ({name!r}): url {url!r} is not a URL with a scheme "
                            "or an absolute file path")
            continue
        pulls.append((name, url.strip()))
    names = [name for name, _ in pulls]
    problems.extend(f"stream {name!r} is pulled twice" for name in _duplicates(names))
    if problems:
        raise _Invalid(*problems)
    return tuple(pulls)


# HS256 keys shorter than the hash output make offline brute force of a captured token practical
# (RFC 7518 section 3.2 requires at least 256 bits).
MIN_JWT_SECRET_BYTES = 32


def _jwt_secret(raw: object) -> str | None:
    # Messages never echo the value: it is a secret.
    if not isinstance(raw, str):
        raise _Invalid("the secret is not a string")
    secret = raw.strip() or None
    if secret is not None and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise _Invalid(f"the secret is shorter than {MIN_JWT_SECRET_BYTES} bytes, the minimum for HS256")
    return secret


@dataclass(frozen=True)
class _Field:
    env: str | None
    parse: Callable[[object], Any]


_FIELDS: dict[str, _Field] = {
    "host": _Field("HOST", _text),
    "port": _Field("PORT", _integer(0, 65535)),
    "ws_port": _Field("WS_PORT", _integer(0, 65535)),
    "redis_url": _Field("REDIS_URL", _redis_url),
    "redis_sentinels": _Field("REDIS_SENTINELS", _string_list(_host_port_problem)),
    "redis_sentinel_service": _Field("REDIS_SENTINEL_SERVICE", _text),
    "redis_cluster": _Field("REDIS_CLUSTER", _boolean),
    "redis_dvr_seconds": _Field("REDIS_DVR_SECONDS", _number(0, 86_400)),
    "jwt_secret": _Field("JWT_SECRET", _jwt_secret),
    "jwt_public_key_file": _Field("JWT_PUBLIC_KEY", _optional_text),
    "jwks_file": _Field("JWKS_FILE", _optional_text),
    "jwt_audience": _Field("JWT_AUDIENCE", _text),
    "jwt_issuer": _Field("JWT_ISSUER", _optional_text),
    "playback_auth": _Field("PLAYBACK_AUTH", _choice("open", "token")),
    "metrics_auth": _Field("METRICS_AUTH", _choice("open", "admin")),
    "log_level": _Field("LOG_LEVEL", _choice("debug", "info", "warning", "error", "critical")),
    "cache_memory": _Field("CACHE_MEMORY", _byte_size),
    "cache_ttl_seconds": _Field("CACHE_TTL", _number(1)),
    # Above a minute a value is almost surely milliseconds typed as seconds.
    "segment_duration": _Field("SEGMENT_DURATION", _number(0.4, 60)),
    "part_duration": _Field("PART_DURATION", _number(0.2)),
    # RFC 8216 6.2.2: a live playlist must span at least three target durations.
    "window_segments": _Field("WINDOW_SEGMENTS", _integer(3, 10_000)),
    "ladder": _Field("LADDER", _ladder),
    "audio_bitrate": _Field("AUDIO_BITRATE", _bitrate(8_000, 512_000)),
    "x264_preset": _Field("X264_PRESET", _choice(*_X264_PRESETS)),
    "x264_tune": _Field("X264_TUNE", _x264_tune),
    "passthrough_source": _Field("PASSTHROUGH_SOURCE", _boolean),
    "pull_streams": _Field("PULL_STREAMS", _pull_streams),
    "max_publishers": _Field("MAX_PUBLISHERS", _integer(1, 100_000)),
    "publish_grace_seconds": _Field("PUBLISH_GRACE", _number(0, 3600)),
    "webrtc_hosts": _Field("WEBRTC_HOSTS", _string_list(_host_problem)),
    "ice_servers": _Field("ICE_SERVERS", _string_list(_ice_server_problem)),
    "demo": _Field("DEMO", _boolean),
    "max_sessions_per_address": _Field("MAX_SESSIONS_PER_ADDRESS", _integer(1, 100_000)),
    "max_sessions_per_subject": _Field("MAX_SESSIONS_PER_SUBJECT", _integer(1, 100_000)),
    "publish_rate": _Field("PUBLISH_RATE", _number(0.01, 100_000, " /s")),
    "publish_burst": _Field("PUBLISH_BURST", _integer(1, 100_000)),
    "auth_failure_limit": _Field("AUTH_FAILURE_LIMIT", _integer(1, 1_000_000)),
    "auth_lockout_seconds": _Field("AUTH_LOCKOUT", _number(0, 86_400)),
    "max_requests_per_address": _Field("MAX_REQUESTS_PER_ADDRESS", _integer(0, 10_000_000)),
    "http_read_timeout": _Field("HTTP_READ_TIMEOUT", _number(0.5, 3600)),
    "max_connections_per_address": _Field("MAX_CONNECTIONS_PER_ADDRESS",
                                          _integer(0, 10_000_000)),
    "listen_backlog": _Field("LISTEN_BACKLOG", _integer(1, 1_000_000)),
    "fast_lane": _Field("FAST_LANE", _boolean),
    "http_workers": _Field("HTTP_WORKERS", _integer(1, 64)),
    "worker_of": _Field("WORKER_OF", _optional_text),
    "worker_secret": _Field("WORKER_SECRET", _optional_text),
    "on_publish_url": _Field("ON_PUBLISH_URL", _optional_text),
    "on_unpublish_url": _Field("ON_UNPUBLISH_URL", _optional_text),
    "drain_seconds": _Field("DRAIN_SECONDS", _number(0, 3600)),
    "node_name": _Field("NODE_NAME", _optional_text),
    "seeds": _Field("SEEDS", _string_list(_host_port_problem)),
    "gossip_bind": _Field("GOSSIP_BIND", _text),
    "gossip_advertise": _Field("GOSSIP_ADVERTISE", _optional_text),
    "gossip_keys": _Field("GOSSIP_KEYS", _string_list(_gossip_key_problem)),
    "fleet_secret": _Field("FLEET_SECRET", _optional_text),
    "advertise_url": _Field("ADVERTISE_URL", _optional_text),
    "zone": _Field("ZONE", _text),
    "origin_url": _Field("ORIGIN_URL", _optional_text),
    "role": _Field("ROLE", _choice("edge", "origin")),
}
assert set(_FIELDS) == {field.name for field in fields(Settings)}

_TOML_ALIASES = {"pull": "pull_streams"}


def env_name(field_name: str) -> str | None:
    """The environment variable that sets ``field_name`` (for help texts)."""
    return _FIELDS[field_name].env


def _read_toml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        problems.append(f"{path}: cannot read: {error.strerror or error}")
    except tomllib.TOMLDecodeError as error:
        problems.append(f"{path}: not valid TOML: {error}")
    return {}


def load_settings(
    env: Mapping[str, str],
    toml_path: str | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build ``Settings`` from a TOML file (lowercase field names, ``[[ladder]]``, ``[[pull]]``), then
    environment variables, then ``overrides`` (field names; ``None`` values mean "not given").

    Empty environment variables count as unset. Raises ``ConfigError`` listing every problem.
    """
    problems: list[str] = []
    given: dict[str, tuple[str, object]] = {}  # field name -> (where it came from, raw value)
    if toml_path is not None:
        for key, value in _read_toml(toml_path, problems).items():
            name = _TOML_ALIASES.get(key, key)
            if name in _FIELDS:
                given[name] = (f"{toml_path}: {key}", value)
            else:
                problems.append(f"{toml_path}: unknown key {key!r}")
    for name, field in _FIELDS.items():
        if field.env is not None and env.get(field.env, "").strip():
            given[name] = (field.env, env[field.env])
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name in _FIELDS:
            given[name] = (f"--{name.replace('_', '-')}", value)
        else:
            problems.append(f"--{name.replace('_', '-')}: unknown setting")

    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for name, (label, raw) in given.items():
        labels[name] = label
        try:
            values[name] = _FIELDS[name].parse(raw)
        except _Invalid as error:
            problems.extend(f"{label}: {message}" for message in error.messages)

    failed = set(given) - set(values)
    defaults = Settings()
    effective = {name: values.get(name, getattr(defaults, name)) for name in _FIELDS}
    problems.extend(_cross_field_problems(effective, labels, failed))
    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _cross_field_problems(values: dict[str, Any], labels: dict[str, str], failed: set[str]) -> list[str]:
    problems: list[str] = []
    if not {"part_duration", "segment_duration"} & failed:
        part, segment = values["part_duration"], values["segment_duration"]
        # A segment must hold at least two parts for parts to lower latency at all.
        if part > segment / 2:
            label = labels.get("part_duration") or labels.get("segment_duration") or "part_duration"
            problems.append(
                f"{label}: part duration {_fmt(part)} s is above half the segment duration "
                f"({_fmt(segment)} s / 2 = {_fmt(segment / 2)} s)"
            )
    if values["redis_cluster"] and not values["redis_url"] and "redis_url" not in failed:
        problems.append(f"{labels.get('redis_cluster', 'redis_cluster')}: a Redis Cluster needs "
                        "REDIS_URL naming one of its nodes")
    if values["redis_cluster"] and values["redis_sentinels"]:
        problems.append(f"{labels.get('redis_cluster', 'redis_cluster')}: choose Sentinel or "
                        "Cluster, not both")
    if not {"ladder", "passthrough_source"} & failed:
        label = labels.get("ladder") or labels.get("passthrough_source") or "ladder"
        names = {rung.name for rung in values["ladder"]}
        if not names and not values["passthrough_source"]:
            problems.append(f"{label}: no renditions; configure a ladder or enable passthrough_source")
        if SOURCE_RENDITION in names and values["passthrough_source"]:
            problems.append(f"{label}: rung name {SOURCE_RENDITION!r} is reserved for passthrough")
    return problems
