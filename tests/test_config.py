"""Settings from TOML, environment and CLI: precedence, parsing, and all-at-once problem reports."""

from __future__ import annotations

import textwrap

import pytest

from edge.config import DEFAULT_LADDER, ConfigError, Rung, Settings, env_name, load_settings

SECRET = "0123456789abcdef0123456789abcdef"


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "livedge.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _problems(env=None, toml_path=None, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_settings(env or {}, toml_path, overrides)
    assert str(raised.value) == "\n".join(raised.value.problems)
    return raised.value.problems


def test_defaults():
    settings = load_settings({}, None)
    assert settings == Settings()
    assert (settings.host, settings.port, settings.ws_port) == ("0.0.0.0", 3000, 3001)
    assert settings.cache_memory == 512 * 1024 * 1024
    assert settings.ladder == DEFAULT_LADDER
    assert [rung.name for rung in settings.ladder] == ["1080p", "720p", "480p", "360p"]
    assert settings.ladder[2] == Rung("480p", 854, 480, 1_400_000)
    assert settings.jwt_secret is None and settings.playback_auth == "open"


def test_toml_file(tmp_path):
    path = _toml(
        tmp_path,
        f"""
        host = "127.0.0.1"
        port = 8080
        redis_url = "redis://cache:6379/0"
        jwt_secret = "{SECRET}"
        playback_auth = "token"
        cache_memory = "1GiB"
        segment_duration = 10
        part_duration = 1.0
        window_segments = 5
        passthrough_source = true
        webrtc_hosts = ["203.0.113.7", "edge.example.com"]
        ice_servers = ["stun:stun.example.com:3478"]
        x264_tune = "zerolatency,fastdecode"

        [[ladder]]
        name = "HD"
        width = 1280
        height = 720
        bitrate = "2.8M"
        max_frame_rate = 30

        [[ladder]]
        name = "SD"
        width = 640
        height = 360
        bitrate = 800000

        [[pull]]
        name = "lobby"
        url = "rtsp://camera.local/stream1"
        """,
    )
    settings = load_settings({}, path)
    assert settings.host == "127.0.0.1" and settings.port == 8080
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.jwt_secret == SECRET and settings.playback_auth == "token"
    assert settings.cache_memory == 2**30
    assert (settings.segment_duration, settings.part_duration) == (10.0, 1.0)
    assert settings.window_segments == 5 and settings.passthrough_source is True
    assert settings.ladder == (Rung("HD", 1280, 720, 2_800_000, 30.0), Rung("SD", 640, 360, 800_000))
    assert settings.pull_streams == (("lobby", "rtsp://camera.local/stream1"),)
    assert settings.webrtc_hosts == ("203.0.113.7", "edge.example.com")
    assert settings.ice_servers == ("stun:stun.example.com:3478",)
    assert settings.x264_tune == "zerolatency,fastdecode"
    assert settings.ws_port == 3001  # untouched fields keep defaults


def test_precedence_toml_then_env_then_overrides(tmp_path):
    path = _toml(tmp_path, 'port = 1111\nws_port = 2222\nlog_level = "debug"\nhost = "10.0.0.1"\n')
    env = {"PORT": "3333", "WS_PORT": "4444", "LOG_LEVEL": "WARNING"}
    settings = load_settings(env, path, {"port": 5555, "host": None})
    assert settings.port == 5555  # override beats env beats TOML
    assert settings.ws_port == 4444  # env beats TOML
    assert settings.log_level == "warning"
    assert settings.host == "10.0.0.1"  # a None override means "not given"


def test_empty_environment_variables_count_as_unset(tmp_path):
    path = _toml(tmp_path, 'redis_url = "redis://r"\nport = 1234\n')
    settings = load_settings({"REDIS_URL": "", "PORT": "  "}, path)
    assert (settings.redis_url, settings.port) == ("redis://r", 1234)


def test_environment_names_and_compact_forms():
    env = {
        "HOST": "::",
        "JWT_SECRET": SECRET,
        "JWT_PUBLIC_KEY": "/keys/pub.pem",
        "JWKS_FILE": "/keys/jwks.json",
        "JWT_AUDIENCE": "livedge",
        "JWT_ISSUER": "https://idp",
        "CACHE_TTL": "60",
        "SEGMENT_DURATION": "4",
        "PART_DURATION": "0.333",
        "WINDOW_SEGMENTS": "10",
        "LADDER": "4K:3840x2160:16M:60, HD:1280x720:2800k,SD:640x360:800000",
        "X264_PRESET": "ultrafast",
        "MAX_PUBLISHERS": "4",
        "WEBRTC_HOSTS": "198.51.100.1, edge.example.com",
        "ICE_SERVERS": "stun:stun.l.google.com:19302,turns:turn.example.com:443",
        "PUBLISH_GRACE": "2.5",
        "PULL_STREAMS": "cam-1=rtsp://a/1,cam-2=srt://b:9000?streamid=x",
        "DEMO": "yes",
    }
    settings = load_settings(env, None)
    assert settings.host == "::"
    assert settings.jwt_public_key_file == "/keys/pub.pem" and settings.jwks_file == "/keys/jwks.json"
    assert (settings.jwt_audience, settings.jwt_issuer) == ("livedge", "https://idp")
    assert settings.cache_ttl_seconds == 60.0
    assert (settings.segment_duration, settings.part_duration) == (4.0, 0.333)
    assert settings.ladder == (
        Rung("4K", 3840, 2160, 16_000_000, 60.0),
        Rung("HD", 1280, 720, 2_800_000),
        Rung("SD", 640, 360, 800_000),
    )
    assert settings.x264_preset == "ultrafast" and settings.max_publishers == 4
    assert settings.webrtc_hosts == ("198.51.100.1", "edge.example.com")
    assert settings.ice_servers[1] == "turns:turn.example.com:443"
    assert settings.publish_grace_seconds == 2.5
    assert settings.pull_streams == (("cam-1", "rtsp://a/1"), ("cam-2", "srt://b:9000?streamid=x"))
    assert settings.demo is True
    assert env_name("publish_grace_seconds") == "PUBLISH_GRACE"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("512MiB", 512 * 2**20),
        ("512M", 512 * 2**20),
        ("512 mib", 512 * 2**20),
        ("1GB", 10**9),
        ("1GiB", 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2000000", 2_000_000),
        (64 * 2**20, 64 * 2**20),
    ],
)
def test_cache_memory_sizes(raw, expected):
    assert load_settings({}, None, {"cache_memory": raw}).cache_memory == expected


@pytest.mark.parametrize(
    "raw,problem",
    [
        ("12 parsecs", "CACHE_MEMORY: '12 parsecs' is not a size"),
        ("-5MiB", "CACHE_MEMORY: '-5MiB' is not a size"),
        ("512", "CACHE_MEMORY: 512 is below the minimum 1048576 bytes (1 MiB)"),
        ("MiB", "CACHE_MEMORY: 'MiB' is not a size"),
    ],
)
def test_bad_cache_memory(raw, problem):
    [reported] = _problems({"CACHE_MEMORY": raw})
    assert reported.startswith(problem)


@pytest.mark.parametrize(
    "raw,expected", [("2800k", 2_800_000), ("2.8M", 2_800_000), ("5Mbps", 5_000_000), ("96000", 96_000)]
)
def test_bitrates(raw, expected):
    settings = load_settings({"LADDER": f"x:640x360:{raw}", "AUDIO_BITRATE": "96k"}, None)
    assert settings.ladder[0].video_bitrate == expected
    assert settings.audio_bitrate == 96_000


SINGLE_PROBLEMS = [
    ({"PORT": "abc"}, "PORT: 'abc' is not an integer"),
    ({"PORT": "3000.5"}, "PORT: '3000.5' is not an integer"),
    ({"PORT": "70000"}, "PORT: 70000 is above the maximum 65535"),
    ({"WS_PORT": "-1"}, "WS_PORT: -1 is below the minimum 0"),
    ({"PART_DURATION": "0.1"}, "PART_DURATION: 0.1 is below the minimum 0.2 s"),
    ({"SEGMENT_DURATION": "2000"}, "SEGMENT_DURATION: 2000 is above the maximum 60 s"),
    ({"SEGMENT_DURATION": "nan"}, "SEGMENT_DURATION: 'nan' is not a number"),
    ({"SEGMENT_DURATION": "two"}, "SEGMENT_DURATION: 'two' is not a number"),
    ({"WINDOW_SEGMENTS": "2"}, "WINDOW_SEGMENTS: 2 is below the minimum 3"),
    ({"PLAYBACK_AUTH": "maybe"}, "PLAYBACK_AUTH: 'maybe' is not one of open, token"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL: 'loud' is not one of debug, info, warning, error, critical"),
    ({"X264_PRESET": "warp"}, "X264_PRESET: 'warp' is not one of ultrafast, superfast, veryfast, "
     "faster, fast, medium, slow, slower, veryslow, placebo"),  # fmt: skip
    ({"MAX_PUBLISHERS": "0"}, "MAX_PUBLISHERS: 0 is below the minimum 1"),
    ({"PUBLISH_GRACE": "-1"}, "PUBLISH_GRACE: -1 is below the minimum 0 s"),
    ({"DEMO": "perhaps"}, "DEMO: 'perhaps' is not a boolean (true/false, yes/no, on/off, 1/0)"),
    ({"ICE_SERVERS": "http://x"}, "ICE_SERVERS: 'http://x' is not a stun:, turn: or turns: URL"),
    ({"WEBRTC_HOSTS": "a b"}, "WEBRTC_HOSTS: 'a b' is not a host name or address"),
    ({"LADDER": "720p:1280x720"}, "LADDER: rung 1: '720p:1280x720' is not name:WIDTHxHEIGHT:bitrate[:fps]"),
    ({"LADDER": "720p:1281x720:1M"}, "LADDER: rung 1 ('720p'): width 1281 is odd; "
     "H.264 4:2:0 needs even dimensions"),  # fmt: skip
    ({"LADDER": "a:640x360:1M,a:320x180:1M"}, "LADDER: rung name 'a' is used twice"),
    ({"LADDER": "a/b:640x360:1M"}, "LADDER: rung 1 ('a/b'): name rendition name may only hold letters, "
     "digits, '_', '-' and single '.' not at the start"),  # fmt: skip
    ({"LADDER": "a:640x360:fast"}, "LADDER: rung 1 ('a'): video_bitrate 'fast' is not a bitrate "
     "(e.g. 2800k, 2.8M, 2800000)"),  # fmt: skip
    ({"PULL_STREAMS": "../x=rtsp://a"}, "PULL_STREAMS: pull 1: stream name may only hold letters, "
     "digits, '_', '-' and single '.' not at the start"),  # fmt: skip
    ({"PULL_STREAMS": "a=rtsp://x,a=rtsp://y"}, "PULL_STREAMS: stream 'a' is pulled twice"),
    ({"PULL_STREAMS": "a=not a url"}, "PULL_STREAMS: pull 1 ('a'): url 'not a url' is not a URL with a scheme or an absolute file path"),
    ({"X264_TUNE": "zerolatency,speed"}, "X264_TUNE: unknown tune speed (one of animation, fastdecode, "
     "film, grain, psnr, ssim, stillimage, zerolatency)"),  # fmt: skip
    ({"SEGMENT_DURATION": "1", "PART_DURATION": "0.6"}, "PART_DURATION: part duration 0.6 s is above "
     "half the segment duration (1 s / 2 = 0.5 s)"),  # fmt: skip
    ({"SEGMENT_DURATION": "0.8"}, "SEGMENT_DURATION: part duration 0.5 s is above half the segment "
     "duration (0.8 s / 2 = 0.4 s)"),  # fmt: skip
    ({"LADDER": ","}, "LADDER: no renditions; configure a ladder or enable passthrough_source"),
    ({"PASSTHROUGH_SOURCE": "1", "LADDER": "source:640x360:1M"},
     "LADDER: rung name 'source' is reserved for passthrough"),  # fmt: skip
]


@pytest.mark.parametrize("env,problem", SINGLE_PROBLEMS, ids=[p[1][:40] for p in SINGLE_PROBLEMS])
def test_single_problem_messages(env, problem):
    assert _problems(env) == [problem]


def test_passthrough_alone_is_a_valid_ladder():
    settings = load_settings({"LADDER": ",", "PASSTHROUGH_SOURCE": "on"}, None)
    assert settings.ladder == () and settings.passthrough_source is True


def test_part_duration_bounds_are_inclusive():
    settings = load_settings({"SEGMENT_DURATION": "0.4", "PART_DURATION": "0.2"}, None)
    assert (settings.segment_duration, settings.part_duration) == (0.4, 0.2)


def test_all_problems_are_reported_together(tmp_path):
    path = _toml(tmp_path, 'prot = 80\nwindow_segments = "many"\n')
    problems = _problems(
        {"PORT": "abc", "PART_DURATION": "0.1", "CACHE_MEMORY": "lots"},
        path,
        {"log_level": "chatty", "colour": "blue"},
    )
    assert problems == [
        f"{path}: unknown key 'prot'",
        "--colour: unknown setting",
        f"{path}: window_segments: 'many' is not an integer",
        "PORT: 'abc' is not an integer",
        "CACHE_MEMORY: 'lots' is not a size (e.g. 512MiB, 1GB, 536870912)",
        "PART_DURATION: 0.1 is below the minimum 0.2 s",
        "--log-level: 'chatty' is not one of debug, info, warning, error, critical",
    ]


def test_every_bad_rung_is_reported(tmp_path):
    path = _toml(
        tmp_path,
        """
        [[ladder]]
        name = "a"
        width = 641
        height = 0
        bitrate = "1M"
        speed = 3

        [[ladder]]
        width = 640
        height = 360
        """,
    )
    assert _problems(toml_path=path) == [
        f"{path}: ladder: rung 1 ('a'): unknown key 'speed'",
        f"{path}: ladder: rung 1 ('a'): height 0 is below the minimum 16",
        f"{path}: ladder: rung 1 ('a'): width 641 is odd; H.264 4:2:0 needs even dimensions",
        f"{path}: ladder: rung 2: name is missing",
        f"{path}: ladder: rung 2: video_bitrate is missing",
    ]


def test_short_jwt_secret_is_refused_without_echoing_it():
    problems = _problems({"JWT_SECRET": "hunter2"})
    assert problems == ["JWT_SECRET: the secret is shorter than 32 bytes, the minimum for HS256"]
    assert "hunter2" not in problems[0]


def test_unreadable_and_invalid_toml(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert _problems({"PORT": "x"}, missing) == [
        f"{missing}: cannot read: No such file or directory",
        "PORT: 'x' is not an integer",
    ]
    broken = _toml(tmp_path, "port = = 3\n")
    [problem] = _problems(toml_path=broken)
    assert problem.startswith(f"{broken}: not valid TOML:")


def test_overrides_accept_typed_values():
    ladder = (Rung("only", 640, 360, 500_000),)
    settings = load_settings(
        {}, None, {"ladder": ladder, "demo": True, "pull_streams": (("cam", "rtsp://x"),), "port": 0}
    )
    assert settings.ladder == ladder and settings.demo is True
    assert settings.pull_streams == (("cam", "rtsp://x"),) and settings.port == 0


def test_toml_types_are_checked(tmp_path):
    path = _toml(tmp_path, 'port = true\ndemo = "sometimes"\nwebrtc_hosts = [1, 2]\n')
    assert _problems(toml_path=path) == [
        f"{path}: port: True is not an integer",
        f"{path}: demo: 'sometimes' is not a boolean (true/false, yes/no, on/off, 1/0)",
        f"{path}: webrtc_hosts: [1, 2] is not a comma-separated list",
    ]
