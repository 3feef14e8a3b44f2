"""Stream and rendition names: a closed alphabet that can never address anything but itself."""

from __future__ import annotations

import pytest

from edge.errors import BadRequest
from edge.names import (
    RENDITION_NAME_MAX_LENGTH,
    STREAM_NAME_MAX_LENGTH,
    validate_rendition_name,
    validate_stream_name,
)

VALID_STREAM_NAMES = [
    "a",
    "cam-1",
    "Cam_2",
    "live.main",
    "a.b.c",
    "trailing.",
    "-dash-first",
    "_underscore",
    "0123456789",
    "x" * STREAM_NAME_MAX_LENGTH,
]

INVALID_STREAM_NAMES = [
    ("empty", ""),
    ("too long", "x" * (STREAM_NAME_MAX_LENGTH + 1)),
    ("huge", "a" * 1_000_000),
    ("dot", "."),
    ("dot dot", ".."),
    ("leading dot", ".hidden"),
    ("parent traversal", "../x"),
    ("inner dot dot", "a..b"),
    ("trailing dot dot", "a.."),
    ("slash", "a/b"),
    ("leading slash", "/etc"),
    ("backslash", "a\\b"),
    ("windows traversal", "..\\x"),
    ("percent-encoded dots", "%2e%2e"),
    ("percent-encoded slash", "a%2Fb"),
    ("nul", "a\x00b"),
    ("trailing nul", "cam\x00"),
    ("newline", "cam\n"),
    ("carriage return", "cam\rx"),
    ("tab", "a\tb"),
    ("space", "a b"),
    ("unicode letter", "caméra"),
    ("fullwidth dot look-alike", "a\uff0e\uff0eb"),
    ("one dot leader", "a\u2024b"),
    ("cyrillic look-alike", "c\u0430m"),
    ("emoji", "\U0001f4f9"),
    ("zero width space", "cam\u200b"),
    ("query", "cam?x=1"),
    ("fragment", "cam#x"),
    ("colon", "c:x"),
    ("asterisk", "cam-*"),
    ("shell", "$(reboot)"),
]


@pytest.mark.parametrize("name", VALID_STREAM_NAMES)
def test_valid_stream_names_are_returned_unchanged(name):
    assert validate_stream_name(name) == name


@pytest.mark.parametrize(
    "name", [case[1] for case in INVALID_STREAM_NAMES], ids=[case[0] for case in INVALID_STREAM_NAMES]
)
def test_invalid_stream_names_are_bad_requests(name):
    with pytest.raises(BadRequest) as raised:
        validate_stream_name(name)
    assert raised.value.status == 400
    assert "stream name" in raised.value.message
    # The rejected name is never echoed back (it may hold control characters or be huge).
    assert len(raised.value.message) < 200


@pytest.mark.parametrize("name", [None, 7, b"cam", ["cam"]])
def test_non_strings_are_bad_requests(name):
    with pytest.raises(BadRequest):
        validate_stream_name(name)


def test_rendition_names_have_their_own_length_limit():
    assert validate_rendition_name("720p") == "720p"
    assert validate_rendition_name("source") == "source"
    assert validate_rendition_name("x" * RENDITION_NAME_MAX_LENGTH)
    with pytest.raises(BadRequest, match="rendition name is longer than 32"):
        validate_rendition_name("x" * (RENDITION_NAME_MAX_LENGTH + 1))
    # A stream name of that length is fine: the limits differ.
    assert validate_stream_name("x" * (RENDITION_NAME_MAX_LENGTH + 1))


@pytest.mark.parametrize("name", ["", "../720p", "720p/x", ".720p", "7\x0020p", "720ρ", "a..b"])
def test_invalid_rendition_names(name):
    with pytest.raises(BadRequest, match="rendition name"):
        validate_rendition_name(name)
