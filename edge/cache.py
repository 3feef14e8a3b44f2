"""The first cache tier: an in-process LRU bounded by bytes, with pins for the live window.

A live edge serves the same few segments and parts to every viewer, so those must never be evicted by a
burst of requests for older objects. Entries the live window currently lists are *pinned*: they count
towards the byte budget but sit outside the LRU's eviction order. Only unpinned entries are evicted,
least recently used first. If pinned bytes alone exceed the budget the cache overcommits rather than
drop a listed object, and reports the excess in ``stats()``.

Sizes are the byte length of values (keys and bookkeeping are not counted). Times are seconds on the
injected monotonic ``clock``. Not thread-safe: use it from the event loop thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import lru

# lru-dict bounds by entry count; we bound by bytes, so its count limit only has to be out of reach.
_LRU_CAPACITY = 2**31 - 1


class Cache(Protocol):
    """What a cache tier offers the HTTP layer. ``ttl`` is in seconds; ``None`` means no expiry."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...


@dataclass(frozen=True)
class CacheStats:
    """A snapshot for metrics. ``overcommit_bytes`` is how far pinned entries push ``bytes`` past
    ``max_bytes``; ``evictions`` counts budget evictions, ``expirations`` entries dropped as expired."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    pinned_bytes: int
    pinned_entries: int = 0
    expirations: int = 0
    overcommit_bytes: int = 0


@dataclass(frozen=True, slots=True)
class _Entry:
    value: bytes
    expires_at: float | None  # on the cache's clock; None: never


class MemoryCache:
    """Byte-budgeted LRU. ``get_now``/``set_now`` are the synchronous fast paths; ``get``/``set``
    implement the async ``Cache`` protocol on top of them."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._evictable: lru.LRU = lru.LRU(_LRU_CAPACITY)
        self._pinned: dict[str, _Entry] = {}
        self._bytes = 0
        self._pinned_bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0

    # --- synchronous API ------------------------------------------------------------------------

    def get_now(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None`` if absent or expired. A hit makes the entry the most
        recently used."""
        entry = self._pinned.get(key)
        if entry is None:
            entry = self._evictable.get(key)  # lru-dict moves it to the most recent end
        if entry is None:
            self._misses += 1
            return None
        if entry.expires_at is not None and self._clock() >= entry.expires_at:
            self._remove(key)
            self._expirations += 1
            self._misses += 1
            return None
        self._hits += 1
        return entry.value

    def set_now(self, key: str, value: bytes, ttl: float | None = None, pinned: bool = False) -> bool:
        """Store ``value`` for ``ttl`` seconds (``None``: until evicted). Returns whether it was stored.

        A value larger than ``max_bytes``, or with ``ttl <= 0``, is not stored and any older value
        under ``key`` is dropped. An entry stays pinned if it was pinned before; ``pinned=True`` pins it.
        Storing may evict least recently used unpinned entries, possibly this one if pinned entries
        already fill the budget.
        """
        was_pinned = key in self._pinned
        self._remove(key)
        if len(value) > self.max_bytes or (ttl is not None and ttl <= 0):
            return False
        entry = _Entry(bytes(value), None if ttl is None else self._clock() + ttl)
        self._bytes += len(entry.value)
        if pinned or was_pinned:
            self._pinned[key] = entry
            self._pinned_bytes += len(entry.value)
        else:
            self._evictable[key] = entry
        self._evict_to_budget()
        return key in self._pinned or key in self._evictable

    def pin(self, key: str) -> bool:
        """Exempt ``key`` from eviction (expiry still applies). Returns whether the key is present."""
        if key in self._pinned:
            return True
        entry = self._evictable.pop(key, None)
        if entry is None:
            return False
        self._pinned[key] = entry
        self._pinned_bytes += len(entry.value)
        return True

    def unpin(self, key: str) -> bool:
        """Make ``key`` evictable again, as the most recently used entry; evicts if the cache was
        overcommitted. Returns whether the key was pinned."""
        entry = self._pinned.pop(key, None)
        if entry is None:
            return False
        self._pinned_bytes -= len(entry.value)
        self._evictable[key] = entry
        self._evict_to_budget()
        return True

    def delete(self, key: str) -> bool:
        """Drop ``key`` whether pinned or not. Returns whether it was present."""
        return self._remove(key)

    def purge_expired(self) -> int:
        """Drop every expired entry now (expiry is otherwise lazy, on ``get``). Returns how many."""
        now = self._clock()
        expired = [
            key
            for store in (self._pinned, self._evictable)
            for key, entry in store.items()
            if entry.expires_at is not None and now >= entry.expires_at
        ]
        for key in expired:
            self._remove(key)
        self._expirations += len(expired)
        return len(expired)

    def __contains__(self, key: object) -> bool:
        # Presence only: neither recency nor expiry nor the hit counters change.
        return key in self._pinned or key in self._evictable

    def __len__(self) -> int:
        return len(self._pinned) + len(self._evictable)

    def stats(self) -> CacheStats:
        return CacheStats(
            entries=len(self),
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            pinned_bytes=self._pinned_bytes,
            pinned_entries=len(self._pinned),
            expirations=self._expirations,
            overcommit_bytes=max(0, self._bytes - self.max_bytes),
        )

    # --- Cache protocol ---------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        return self.get_now(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.set_now(key, value, ttl)

    # --- internals --------------------------------------------------------------------------------

    def _remove(self, key: str) -> bool:
        entry = self._pinned.pop(key, None)
        if entry is not None:
            self._pinned_bytes -= len(entry.value)
        else:
            entry = self._evictable.pop(key, None)
            if entry is None:
                return False
        self._bytes -= len(entry.value)
        return True

    def _evict_to_budget(self) -> None:
        while self._bytes > self.max_bytes and len(self._evictable):
            # Not popitem(): lru-dict 1.4's popitem leaks the (key, value) tuple it returns, and
            # with it every evicted object (amitdev/lru-dict#64). peek + del releases them.
            key, entry = self._evictable.peek_last_item()  # least recently used
            del self._evictable[key]
            self._bytes -= len(entry.value)
            self._evictions += 1
