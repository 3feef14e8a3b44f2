"""Publish sessions: conflicts, takeover, grace period, discontinuity, ENDLIST, limits, webhooks.

A real node (in process) with a real ladder transcoder; the "publisher" is a thread feeding decoded
frames, as the WHIP and WebSocket transports do.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from typing import AsyncIterator

import av
import pytest
from aiohttp import web

import edge.node
from bench.ports import free_port
from edge.cache import MemoryCache
from edge.config import load_settings
from edge.errors import Conflict, Forbidden, TooManyRequests
from edge.node import Node
from edge.publish import Publication, Publishing
from edge.tokens import Claims, Scope
from edge.webhooks import Webhooks
from ingest.transcoder import LadderTranscoder


def settings(**env: str):
    base = {"LADDER": "180p:320x180:250k", "SEGMENT_DURATION": "1", "PART_DURATION": "0.25",
            "X264_PRESET": "ultrafast", "PUBLISH_GRACE": "1.5", "WINDOW_SEGMENTS": "3"}
    return load_settings({**base, **env}, None)


def claims(subject: str = "alice", **extra) -> Claims:
    return Claims(subject=subject, scopes=frozenset({Scope.PUBLISH}), stream_pattern="*",
                  expires_at=time.time() + 60, raw={"sub": subject, **extra})


def feed(publication: Publication, seconds: float) -> None:
    """Push ``seconds`` of 320x180 video and a tone, paced a little faster than real time."""
    graph = "testsrc2=size=320x180:rate=30[out0];sine=frequency=440:sample_rate=48000[out1]"
    started = time.monotonic()
    with av.open(graph, format="lavfi") as source:
        for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
            if frame.time >= seconds:
                break
            if isinstance(frame, av.VideoFrame):
                publication.transcoder.push_video(frame)
                ahead = frame.time / 1.5 - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            else:
                publication.transcoder.push_audio(frame)


@pytest.fixture
async def publishing():
    node = Node(settings(), MemoryCache(64 * 1024 * 1024))
    publishing = Publishing(node, Webhooks(None, None))
    node.publishing = publishing
    yield publishing
    await publishing.close()
    await node.close()


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_second_publisher_gets_409_unless_its_token_allows_takeover(publishing):
    first = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    with pytest.raises(Conflict):
        await publishing.begin("cam", claims("bob"), "10.0.0.2", "test")
    evicted = []
    first.on_evicted(evicted.append)
    second = await publishing.begin("cam", claims("bob", takeover=True), "10.0.0.2", "test")
    assert evicted == ["taken over by a new publisher"] and first.ended
    assert publishing.active("cam") is second


async def test_a_returning_publisher_continues_with_one_discontinuity(publishing):
    node = publishing._node
    first = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    await asyncio.to_thread(feed, first, 2.5)
    await publishing.end(first)
    stream = node.live_stream("cam")
    before = stream.media_playlist("180p")
    last_msn = max(int(n) for n in re.findall(r"^seg(\d+)\.m4s$", before, re.M))
    second = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    assert node.live_stream("cam") is stream  # same window, same playlists
    await asyncio.to_thread(feed, second, 2.5)
    await until(lambda: f"seg{last_msn + 2}.m4s" in stream.media_playlist("180p"))
    text = stream.media_playlist("180p")
    assert text.count("#EXT-X-DISCONTINUITY\n") == 1
    msns = [int(n) for n in re.findall(r"^seg(\d+)\.m4s$", text, re.M)]
    assert msns == list(range(msns[0], msns[0] + len(msns)))  # no gap in media sequence
    assert "#EXT-X-ENDLIST" not in text
    await publishing.end(second)


async def test_after_the_grace_period_playlists_end(publishing):
    node = publishing._node
    publication = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    await asyncio.to_thread(feed, publication, 1.5)
    await publishing.end(publication)
    stream = node.live_stream("cam")
    assert "#EXT-X-ENDLIST" not in stream.media_playlist("audio")
    await until(lambda: stream.ended, timeout=5)
    for rendition in ("180p", "audio"):
        assert stream.media_playlist(rendition).rstrip().endswith("#EXT-X-ENDLIST")
    # A new publish after the end starts fresh playlists.
    again = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    assert node.live_stream("cam") is not stream
    await publishing.end(again)


async def test_session_limits_per_address_and_subject():
    node = Node(settings(MAX_SESSIONS_PER_ADDRESS="2", MAX_SESSIONS_PER_SUBJECT="3"),
                MemoryCache(64 * 1024 * 1024))
    publishing = Publishing(node, Webhooks(None, None))
    try:
        await publishing.begin("a", claims(), "10.0.0.1", "test")
        await publishing.begin("b", claims(), "10.0.0.1", "test")
        with pytest.raises(TooManyRequests):
            await publishing.begin("c", claims(), "10.0.0.1", "test")
        await publishing.begin("c", claims(), "10.0.0.2", "test")
        with pytest.raises(TooManyRequests):
            await publishing.begin("d", claims(), "10.0.0.3", "test")
        publishing_b = publishing.active("b")
        await publishing.end(publishing_b)
        await publishing.begin("d", claims(), "10.0.0.1", "test")  # a freed slot is usable again
    finally:
        await publishing.close()
        await node.close()


async def test_publish_sessions_of_one_ipv6_64_count_as_one_address():
    node = Node(settings(MAX_SESSIONS_PER_ADDRESS="2"), MemoryCache(64 * 1024 * 1024))
    publishing = Publishing(node, Webhooks(None, None))
    try:
        first = await publishing.begin("a", claims("a"), "2001:db8:1:2::1", "test")
        await publishing.begin("b", claims("b"), "2001:db8:1:2::2", "test")
        with pytest.raises(TooManyRequests):
            await publishing.begin("c", claims("c"), "2001:db8:1:2:ffff::9", "test")
        await publishing.begin("c", claims("c"), "2001:db8:1:3::1", "test")  # another /64
        await publishing.end(first)
        await publishing.begin("d", claims("d"), "2001:db8:1:2::3", "test")  # its slot is free
    finally:
        await publishing.close()
        await node.close()


@contextlib.asynccontextmanager
async def webhook_receiver(banned: str = "") -> AsyncIterator[tuple[str, list[dict]]]:
    """A real HTTP endpoint on 127.0.0.1 for both hooks: its URL and the bodies it received. It
    rejects publishing ``banned``."""
    calls: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body)
        if body["action"] == "publish" and body["stream"] == banned:
            return web.json_response({"message": "stream key revoked"}, status=403)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", calls
    finally:
        await runner.cleanup()


async def test_on_publish_webhook_can_reject_with_a_reason():
    async with webhook_receiver(banned="banned") as (url, calls):
        node = Node(settings(), MemoryCache(64 * 1024 * 1024))
        webhooks = Webhooks(url, url)
        publishing = Publishing(node, webhooks)
        try:
            with pytest.raises(Forbidden, match="stream key revoked"):
                await publishing.begin("banned", claims(), "10.0.0.1", "test")
            assert node.live_stream("banned") is None
            ok = await publishing.begin("fine", claims(), "10.0.0.1", "test")
            await publishing.end(ok)
            await webhooks.close()
            assert [c["action"] for c in calls] == ["publish", "publish", "unpublish"]
            assert calls[-1]["stream"] == "fine" and calls[-1]["subject"] == "alice"
            assert calls[-1]["reason"] == "publisher left"
        finally:
            await publishing.close()
            await node.close()


async def test_on_unpublish_is_told_of_every_end_takeovers_and_shutdown_included():
    async with webhook_receiver() as (url, calls):
        node = Node(settings(), MemoryCache(64 * 1024 * 1024))
        webhooks = Webhooks(None, url)
        publishing = Publishing(node, webhooks)
        try:
            first = await publishing.begin("cam", claims("alice"), "10.0.0.1", "test")
            await publishing.begin("cam", claims("bob", takeover=True), "10.0.0.2", "test")
            await publishing.end(first)  # its publisher's session ends later: nothing more to tell
            await publishing.close()  # shutdown ends bob's
            await webhooks.close()
            assert [(c["action"], c["subject"], c["address"], c["reason"]) for c in calls] == [
                ("unpublish", "alice", "10.0.0.1", "taken over by a new publisher"),
                ("unpublish", "bob", "10.0.0.2", "the node is shutting down")]
        finally:
            await publishing.close()
            await node.close()


class GatedCloseTranscoder(LadderTranscoder):
    """A real ladder transcoder whose ``close()`` (run off the loop by Publishing) waits for the
    test to open its gate, holding a publisher's end in the middle of its transcoder close."""

    closing = threading.Event()  # set when a close has started
    gate = threading.Event()  # the close goes on once this is set

    def close(self) -> None:
        type(self).closing.set()
        assert type(self).gate.wait(timeout=30), "the test never opened the close gate"
        super().close()


@pytest.fixture
def gated_close(monkeypatch):
    class Gated(GatedCloseTranscoder):
        closing = threading.Event()
        gate = threading.Event()

    monkeypatch.setattr(edge.node, "LadderTranscoder", Gated)
    yield Gated
    Gated.gate.set()  # never leave a close thread blocked


async def end_held_in_its_close(publishing: Publishing,
                                gated_close) -> tuple[object, asyncio.Task]:
    """Publish ``cam``, then end it: the end is left held inside its transcoder close. The
    stream, and the task of the end."""
    first = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    stream = publishing._node.live_stream("cam")
    ending = asyncio.create_task(publishing.end(first))
    assert await asyncio.to_thread(gated_close.closing.wait, 10)
    return stream, ending


async def test_a_publisher_returning_while_the_last_close_runs_waits_and_continues(
        publishing, gated_close):
    # Issue #8: end() used to drop the publication, then await the transcoder close, and only then
    # start the grace period; a publisher reconnecting in between (the WebSocket closes before end()
    # runs) found the stream neither published nor in grace and got 409 "already live here".
    node = publishing._node
    stream, ending = await end_held_in_its_close(publishing, gated_close)
    returning = asyncio.create_task(publishing.begin("cam", claims(), "10.0.0.1", "test"))
    for _ in range(20):  # let it run as far as it can while the close is held
        await asyncio.sleep(0)
    if returning.done():
        returning.result()  # raised the wrong 409 before the fix
    assert not returning.done(), "the returning publisher must wait for the close to finish"
    gated_close.gate.set()
    await ending
    second = await returning
    assert publishing.active("cam") is second and not second.ended
    assert node.live_stream("cam") is stream  # the same playlists carry on, as after a grace
    await asyncio.sleep(node.settings.publish_grace_seconds + 0.5)
    assert not stream.ended  # the first session's grace period did not end the second's stream
    await publishing.end(second)


async def test_an_end_whose_caller_is_cancelled_still_starts_the_grace_period(
        publishing, gated_close):
    # A connection handler cancelled while its publication's transcoder closes (the client went
    # away, the server is closing it): before, the end stopped there and the stream stayed live,
    # without publisher or grace period, forever.
    node = publishing._node
    stream, ending = await end_held_in_its_close(publishing, gated_close)
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    gated_close.gate.set()
    await until(lambda: stream.ended, timeout=node.settings.publish_grace_seconds + 5)
    assert publishing.active("cam") is None


async def test_a_second_publisher_during_a_takeover_close_is_told_the_stream_is_published(
        publishing, gated_close):
    first = await publishing.begin("cam", claims(), "10.0.0.1", "test")
    takeover = asyncio.create_task(
        publishing.begin("cam", claims("bob", takeover=True), "10.0.0.2", "test"))
    assert await asyncio.to_thread(gated_close.closing.wait, 10)
    assert first.ended
    late = asyncio.create_task(publishing.begin("cam", claims("carol"), "10.0.0.3", "test"))
    for _ in range(20):
        await asyncio.sleep(0)
    gated_close.gate.set()
    second = await takeover
    with pytest.raises(Conflict, match="already being published"):
        await late
    assert publishing.active("cam") is second
    await publishing.end(second)
