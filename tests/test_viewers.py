"""Viewer counts (edge/viewers.py): distinct clients per stream within a window, bounded."""

from __future__ import annotations

from edge.viewers import MAX_CLIENT_CHARS, ViewerTracker
from tests.conftest import Clock


def test_distinct_clients_are_counted_within_the_window():
    clock = Clock()
    viewers = ViewerTracker(10.0, clock)
    for client in ("a|ua", "b|ua", "a|ua"):
        viewers.saw("cam", client)
    assert viewers.count("cam") == 2 and viewers.count("other") == 0
    clock.now += 11
    viewers.saw("cam", "c|ua")
    assert viewers.count("cam") == 1


def test_a_long_client_key_is_kept_short():
    # The key holds the User-Agent, which a client chooses: each would otherwise be kept whole.
    viewers = ViewerTracker(10.0, Clock())
    viewers.saw("cam", "10.0.0.1|" + "x" * 8000)
    viewers.saw("cam", "10.0.0.1|" + "x" * 9000)  # the same client as far as the count goes
    assert viewers.count("cam") == 1
    assert max(map(len, viewers._seen["cam"])) == MAX_CLIENT_CHARS
