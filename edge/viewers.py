"""Counts viewers: distinct clients that fetched a stream's media playlist recently."""

from __future__ import annotations

import time
from typing import Callable

MAX_TRACKED_PER_STREAM = 100_000  # bounds memory however many clients come and go
MAX_CLIENT_CHARS = 160  # of a client's key (address and User-Agent): a long one costs no more


class ViewerTracker:
    def __init__(self, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_seconds
        self._clock = clock
        self._seen: dict[str, dict[str, float]] = {}

    def saw(self, stream: str, client: str) -> None:
        client = client[:MAX_CLIENT_CHARS]
        clients = self._seen.setdefault(stream, {})
        if client not in clients and len(clients) >= MAX_TRACKED_PER_STREAM:
            self._expire(clients)
            if len(clients) >= MAX_TRACKED_PER_STREAM:
                return
        clients[client] = self._clock()

    def count(self, stream: str) -> int:
        clients = self._seen.get(stream)
        if not clients:
            return 0
        self._expire(clients)
        return len(clients)

    def forget(self, stream: str) -> None:
        self._seen.pop(stream, None)

    def _expire(self, clients: dict[str, float]) -> None:
        horizon = self._clock() - self._window
        for client in [c for c, seen in clients.items() if seen < horizon]:
            del clients[client]
