"""The waiters bench, short: 50 blocking reloads against the node and against the anchor
(``bench.anchor``), measured the same way. The long runs are ``python -m bench.waiters``."""

from __future__ import annotations

import pytest

from bench.load import http_get, running_node, wait_for_stream
from bench.loadclient import listed_parts, preload_hint
from bench.waiters import STREAM, calibrate, run_step

PATH = f"/hls/{STREAM}/180p/index.m3u8"
WAITERS = 50

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["livedge", "anchor"])
def server(request, tmp_path):
    if request.param == "livedge":
        started = running_node(tmp_path, "--demo", LADDER="180p:320x180:250k",
                               SEGMENT_DURATION="2", PART_DURATION="0.333")
    else:
        started = running_node(tmp_path, "--part", "0.333", "--answer-bytes", "1500",
                               program=("bench.anchor",))
    with started as node:
        wait_for_stream(node.url, STREAM)
        yield request.param, node


def test_every_waiter_is_answered_when_its_part_is_produced(server):
    name, node = server
    offset = calibrate(node.port, PATH, seconds=2.0)
    result = run_step(node, PATH, WAITERS, 3.0, offset, None)
    assert result.connected == WAITERS and result.errors == {}
    # About nine parts in 3 s; each had its waiters, answered after it was produced.
    assert result.parts >= 5 and result.blocked_answers >= 5 * WAITERS
    assert result.last_p50 is not None and result.last_p50 >= 0
    assert result.node_cpu > 0 and result.answers_per_second > 0
    if name == "anchor":
        assert result.answer_bytes == 1500  # padded to the size it was given


def test_waiters_whose_connections_opened_with_a_404_are_measured_without_errors(tmp_path):
    """``--opening-404``: each connection first asks for a part that does not exist."""
    with running_node(tmp_path, "--demo", LADDER="180p:320x180:250k", SEGMENT_DURATION="2",
                      PART_DURATION="0.333") as node:
        wait_for_stream(node.url, STREAM)
        offset = calibrate(node.port, PATH, seconds=2.0)
        result = run_step(node, PATH, WAITERS, 3.0, offset, None,
                          opening=PATH.replace("index.m3u8", "part0.999.m4s"))
    assert result.connected == WAITERS and result.errors == {}
    assert result.parts >= 5 and result.blocked_answers >= 5 * WAITERS


def test_the_anchor_lists_parts_and_hints_the_next_like_a_node(tmp_path):
    with running_node(tmp_path, "--part", "0.25", program=("bench.anchor",)) as anchor:
        status, body = http_get(anchor.url + PATH)
        assert status == 200 and body.startswith(b"#EXTM3U\n")
        parts = listed_parts(body)
        hint = preload_hint(body)
        assert parts and hint is not None
        newest = max((part.msn, part.index) for part in parts)
        # The hint is the part after the newest: 8 parts of 0.25 s to a 2 s segment.
        assert hint == ((newest[0] + 1, 0) if newest[1] == 7 else (newest[0], newest[1] + 1))
        # A reload for the hinted part blocks until it is produced, then lists it.
        status, body = http_get(anchor.url + PATH + f"?_HLS_msn={hint[0]}&_HLS_part={hint[1]}")
        assert status == 200 and max((p.msn, p.index) for p in listed_parts(body)) == hint
