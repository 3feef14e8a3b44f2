"""JSON log lines carry their context (stream, session, request id) and nothing else."""

from __future__ import annotations

import json
import logging

from edge.logs import JsonFormatter, request_id


def format_record(message: str, **extra) -> dict:
    record = logging.LogRecord("livedge.test", logging.WARNING, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return json.loads(JsonFormatter().format(record))


def test_a_line_is_one_json_object_with_its_context():
    line = format_record("publish started", stream="cam", session="s1")
    assert line["message"] == "publish started" and line["level"] == "warning"
    assert line["stream"] == "cam" and line["session"] == "s1"
    assert line["time"].endswith("Z")


def test_the_current_request_id_is_added():
    token = request_id.set("req-42")
    try:
        assert format_record("x")["request_id"] == "req-42"
    finally:
        request_id.reset(token)
    assert "request_id" not in format_record("x")
