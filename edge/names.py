"""Validation of names that come from clients and end up in URLs, cache keys and log lines.

Stream and rendition names are a closed ASCII alphabet so that they can never address anything but
themselves: no path separators, no ``..``, no percent escapes, no control characters, no Unicode
look-alikes. Validation is on the decoded string; a name is either returned unchanged or rejected.
"""

from __future__ import annotations

import re

from edge.errors import BadRequest

STREAM_NAME_MAX_LENGTH = 64
RENDITION_NAME_MAX_LENGTH = 32

# First character is never '.', so '.', '..' and hidden-file names are impossible; '..' inside a name
# is rejected separately. \Z (not $) so that a trailing newline does not slip through.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")


def _validate(kind: str, name: object, max_length: int) -> str:
    if not isinstance(name, str):
        raise BadRequest(f"{kind} name must be a string")
    if not name:
        raise BadRequest(f"{kind} name is empty")
    if len(name) > max_length:
        raise BadRequest(f"{kind} name is longer than {max_length} characters")
    if not _NAME_PATTERN.match(name) or ".." in name:
        # The name itself is not echoed: it may hold control characters meant for a log.
        raise BadRequest(
            f"{kind} name may only hold letters, digits, '_', '-' and single '.' not at the start"
        )
    return name


def validate_stream_name(name: str) -> str:
    """Return ``name`` if it is a valid stream name (1..64 chars of ``[A-Za-z0-9_.-]``, no leading
    ``.``, no ``..``); raise ``BadRequest`` otherwise."""
    return _validate("stream", name, STREAM_NAME_MAX_LENGTH)


def validate_rendition_name(name: str) -> str:
    """Return ``name`` if it is a valid rendition name (same alphabet, 1..32 chars); raise
    ``BadRequest`` otherwise."""
    return _validate("rendition", name, RENDITION_NAME_MAX_LENGTH)
