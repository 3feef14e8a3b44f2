"""Free 127.0.0.1 ports for the nodes, Redis servers and load generators that tests and benches start.

A port from ``bind(0)`` is free only at that instant: the kernel hands the same number out again
for the next ``bind(0)`` or for an outgoing connection's local end, and a test that asks for a node's
HTTP, WebSocket and gossip ports before starting anything lost a run to that ("Address already in
use" from the gossip bind). So ports come from below Linux's ephemeral range (32768-60999 by
default), where the kernel never picks on its own, each is probed on TCP and UDP (gossip binds
both), and none is handed out twice by one process. Each process starts at its own offset so a
bench and a test run side by side rarely probe the same numbers.
"""

from __future__ import annotations

import itertools
import os
import socket

_FIRST, _LAST = 20000, 32000  # below the ephemeral range, above the well-known and registered few
_handed_out: set[int] = set()
_start = _FIRST + os.getpid() * 97 % (_LAST - _FIRST)
_candidates = itertools.cycle(itertools.chain(range(_start, _LAST), range(_FIRST, _start)))


def _is_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A 127.0.0.1 port free on TCP and UDP that this process has not handed out before."""
    for _ in range(_LAST - _FIRST):
        port = next(_candidates)
        if port not in _handed_out and _is_free(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port left in {_FIRST}-{_LAST}")
