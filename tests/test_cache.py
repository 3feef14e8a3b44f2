"""MemoryCache: byte budget, LRU order, pins, expiry on a fake clock, and its statistics."""

from __future__ import annotations

import pytest

from edge.cache import Cache, CacheStats, MemoryCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_byte_budget_evicts_oldest(clock):
    cache = MemoryCache(max_bytes=10, clock=clock)
    assert cache.set_now("a", b"aaaa")
    assert cache.set_now("b", b"bbbb")
    assert cache.stats().bytes == 8
    assert cache.set_now("c", b"cccc")  # 12 > 10: "a" goes
    assert "a" not in cache
    assert cache.get_now("b") == b"bbbb" and cache.get_now("c") == b"cccc"
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 8, 1)


def test_many_small_entries_stay_under_budget(clock):
    cache = MemoryCache(max_bytes=1000, clock=clock)
    for index in range(500):
        cache.set_now(f"k{index}", bytes(7))
        assert cache.stats().bytes <= 1000
    stats = cache.stats()
    assert stats.entries == 1000 // 7
    assert stats.evictions == 500 - 1000 // 7
    # The survivors are exactly the newest ones.
    assert all(f"k{index}" in cache for index in range(500 - 1000 // 7, 500))


def test_one_large_value_evicts_several(clock):
    cache = MemoryCache(max_bytes=10, clock=clock)
    for key in "abcde":
        cache.set_now(key, b"xx")
    cache.set_now("big", b"y" * 9)
    assert len(cache) == 1 and cache.stats().evictions == 5 and cache.stats().bytes == 9


def test_lru_order_follows_access_not_insertion(clock):
    cache = MemoryCache(max_bytes=9, clock=clock)
    cache.set_now("a", b"111")
    cache.set_now("b", b"222")
    cache.set_now("c", b"333")
    assert cache.get_now("a") == b"111"  # "a" is now the most recent; "b" the oldest
    cache.set_now("d", b"444")
    assert "b" not in cache
    assert {"a", "c", "d"} == {key for key in "abcd" if key in cache}
    cache.get_now("c")
    cache.set_now("e", b"555")
    assert "a" not in cache and "c" in cache


def test_membership_check_does_not_refresh_recency(clock):
    cache = MemoryCache(max_bytes=4, clock=clock)
    cache.set_now("a", b"aa")
    cache.set_now("b", b"bb")
    assert "a" in cache
    cache.set_now("c", b"cc")
    assert "a" not in cache and "b" in cache


def test_replacing_a_value_updates_bytes(clock):
    cache = MemoryCache(max_bytes=100, clock=clock)
    cache.set_now("a", b"x" * 40)
    cache.set_now("a", b"y" * 10)
    assert cache.get_now("a") == b"y" * 10
    assert (cache.stats().entries, cache.stats().bytes) == (1, 10)


def test_oversized_value_is_not_stored_and_drops_the_old_one(clock):
    cache = MemoryCache(max_bytes=10, clock=clock)
    cache.set_now("other", b"12345")
    cache.set_now("a", b"old")
    assert not cache.set_now("a", b"z" * 11)
    assert "a" not in cache
    assert cache.get_now("other") == b"12345"  # nothing else was evicted to make room
    assert cache.stats().bytes == 5 and cache.stats().evictions == 0
    assert cache.set_now("exact", b"e" * 5)  # exactly filling the budget is allowed
    assert not cache.set_now("pinned-too", b"p" * 11, pinned=True)


def test_pinned_entries_are_never_evicted(clock):
    cache = MemoryCache(max_bytes=10, clock=clock)
    cache.set_now("live-1", b"1111", pinned=True)
    cache.set_now("old", b"oooo")
    cache.set_now("live-2", b"2222", pinned=True)
    cache.set_now("new", b"nn")  # 14 > 10: only unpinned entries may go, oldest first
    assert "old" not in cache
    assert {"live-1", "live-2", "new"} == {key for key in ("live-1", "live-2", "new") if key in cache}
    stats = cache.stats()
    assert (stats.bytes, stats.pinned_bytes, stats.pinned_entries) == (10, 8, 2)
    # Accessing unpinned entries cannot push out pinned ones either.
    for index in range(20):
        cache.set_now(f"vod-{index}", b"v")
    assert cache.get_now("live-1") == b"1111" and cache.get_now("live-2") == b"2222"


def test_pinned_bytes_beyond_budget_overcommit(clock):
    cache = MemoryCache(max_bytes=10, clock=clock)
    cache.set_now("u", b"uu")
    for index in range(3):
        assert cache.set_now(f"p{index}", b"pppppp", pinned=True)
    stats = cache.stats()
    assert "u" not in cache
    assert (stats.entries, stats.bytes, stats.pinned_bytes, stats.overcommit_bytes) == (3, 18, 18, 8)
    # A new unpinned value cannot fit beside the pins: it is evicted at once.
    assert not cache.set_now("x", b"x")
    assert cache.stats().overcommit_bytes == 8


def test_unpin_makes_entries_evictable_and_restores_the_budget(clock):
    cache = MemoryCache(max_bytes=10, clock=clock)
    cache.set_now("p1", b"666666", pinned=True)
    cache.set_now("p2", b"666666", pinned=True)
    assert cache.stats().overcommit_bytes == 2
    assert cache.unpin("p1")  # now over budget with an evictable entry: it goes
    assert "p1" not in cache and "p2" in cache
    assert cache.stats().bytes == 6 and cache.stats().overcommit_bytes == 0
    assert not cache.unpin("p1") and not cache.unpin("missing")


def test_pin_existing_entry_and_sticky_pin_on_replace(clock):
    cache = MemoryCache(max_bytes=6, clock=clock)
    cache.set_now("a", b"aa")
    cache.set_now("b", b"bb")
    assert cache.pin("a") and cache.pin("a")
    assert not cache.pin("missing")
    cache.set_now("a", b"AA")  # replacing a pinned entry keeps the pin
    cache.set_now("c", b"cc")
    cache.set_now("d", b"dd")
    assert cache.get_now("a") == b"AA" and "b" not in cache
    assert cache.stats().pinned_bytes == 2


def test_expiry_with_fake_clock(clock):
    cache = MemoryCache(max_bytes=100, clock=clock)
    cache.set_now("short", b"s", ttl=2)
    cache.set_now("pinned", b"p", ttl=2, pinned=True)
    cache.set_now("forever", b"f")
    clock.now += 1.999
    assert cache.get_now("short") == b"s" and cache.get_now("pinned") == b"p"
    clock.now += 0.001
    assert cache.get_now("short") is None
    assert cache.get_now("pinned") is None  # pins stop eviction, not expiry
    assert cache.get_now("forever") == b"f"
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.pinned_bytes, stats.expirations) == (1, 1, 0, 2)


def test_non_positive_ttl_is_not_stored(clock):
    cache = MemoryCache(max_bytes=100, clock=clock)
    assert not cache.set_now("zero", b"z", ttl=0)
    assert not cache.set_now("negative", b"n", ttl=-1)
    assert len(cache) == 0


def test_purge_expired(clock):
    cache = MemoryCache(max_bytes=100, clock=clock)
    cache.set_now("a", b"aaa", ttl=1)
    cache.set_now("b", b"bbb", ttl=5, pinned=True)
    cache.set_now("c", b"ccc", ttl=10)
    clock.now += 6
    assert cache.purge_expired() == 2
    assert len(cache) == 1 and cache.stats().bytes == 3 and cache.stats().pinned_bytes == 0


def test_stats_counts_hits_and_misses(clock):
    cache = MemoryCache(max_bytes=100, clock=clock)
    cache.set_now("a", b"1")
    cache.get_now("a")
    cache.get_now("a")
    cache.get_now("nope")
    cache.delete("a")
    cache.get_now("a")
    assert cache.stats() == CacheStats(
        entries=0, bytes=0, max_bytes=100, hits=2, misses=2, evictions=0, pinned_bytes=0
    )


def test_delete_pinned_and_unpinned(clock):
    cache = MemoryCache(max_bytes=100, clock=clock)
    cache.set_now("p", b"pp", pinned=True)
    cache.set_now("u", b"uuu")
    assert cache.delete("p") and cache.delete("u") and not cache.delete("u")
    assert cache.stats().bytes == 0 and cache.stats().pinned_bytes == 0


def test_invalid_budget():
    with pytest.raises(ValueError):
        MemoryCache(max_bytes=0)


async def test_async_protocol(clock):
    cache: Cache = MemoryCache(max_bytes=100, clock=clock)
    await cache.set("k", b"value", ttl=1)
    assert await cache.get("k") == b"value"
    clock.now += 1
    assert await cache.get("k") is None
    await cache.set("n", bytearray(b"copied"))
    assert await cache.get("n") == b"copied"
    assert isinstance(await cache.get("n"), bytes)
