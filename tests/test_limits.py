"""Per-address limits (edge/limits.py): the pure core with a settable clock, then a real node.

Each node test talks to 127.0.0.1 from an address of its own in 127.0.0.0/8 (the kernel routes the
whole range over loopback), so the per-address state of one test never leaks into another.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from edge.config import load_settings
from edge.limits import (AddressLimits, LimitSettings, Refusal, client_key, presents_credential,
                         server_handler_args)
from edge.tokens import Scope, issue_token
from tests.conftest import Clock
from tests.nodes import TEST_SECRET, RunningNode, running_node
from tests.test_fastlane import Http

pytestmark = pytest.mark.timeout(120)

READ_TIMEOUT = 2.0  # HTTP_READ_TIMEOUT of the test node, seconds
LOCKOUT = 2.0  # AUTH_LOCKOUT of the test node, seconds
MAX_REQUESTS = 8  # MAX_REQUESTS_PER_ADDRESS of the test node


# -- the core ---------------------------------------------------------------------------------------

def test_publish_bucket_allows_the_burst_then_the_rate():
    clock = Clock()
    limits = AddressLimits(LimitSettings(publish_rate=10, publish_burst=20), clock)
    assert [limits.admit_publish("a") for _ in range(20)] == [None] * 20
    refusal = limits.admit_publish("a")
    assert isinstance(refusal, Refusal) and refusal.retry_after == pytest.approx(0.1)
    assert refusal.retry_after_header == "1"  # whole seconds, never 0
    assert limits.admit_publish("b") is None  # another address has its own bucket
    clock.now += 0.1  # one token back
    assert limits.admit_publish("a") is None
    assert limits.admit_publish("a") is not None
    clock.now += 60  # refills to the burst, not beyond
    assert sum(limits.admit_publish("a") is None for _ in range(30)) == 20
    assert limits.stats().publish_refused == 12


def test_failures_within_the_window_lock_out_and_the_lockout_ends():
    clock = Clock()
    limits = AddressLimits(LimitSettings(auth_failure_limit=5, auth_failure_window=10,
                                         auth_lockout=60), clock)
    for _ in range(4):
        limits.auth_failed("a")
        clock.now += 1
    assert limits.check_auth("a") is None
    limits.auth_failed("a")  # the fifth within 10 s
    refusal = limits.check_auth("a")
    assert refusal is not None and refusal.retry_after == pytest.approx(60)
    assert "failed authentications" in refusal.message
    assert limits.check_auth("b") is None
    assert limits.refuse_publish("a", credential=True).message == refusal.message
    assert limits.refuse_publish("a", credential=False) is None  # nothing to guess with
    clock.now += 59
    assert limits.check_auth("a").retry_after_header == "1"
    clock.now += 1
    assert limits.check_auth("a") is None
    assert limits.stats().lockouts == 1


def test_failures_spread_beyond_the_window_never_lock_out():
    clock = Clock()
    limits = AddressLimits(LimitSettings(auth_failure_limit=5, auth_failure_window=10), clock)
    for _ in range(50):
        limits.auth_failed("a")
        clock.now += 2.6  # five failures span 10.4 s
        assert limits.check_auth("a") is None
    assert limits.stats().lockouts == 0


def test_concurrent_requests_are_capped_per_address_and_released():
    limits = AddressLimits(LimitSettings(max_requests_per_address=3))
    assert [limits.enter("a") for _ in range(3)] == [None] * 3
    assert limits.enter("a") is not None
    assert limits.enter("b") is None
    limits.leave("a")
    assert limits.enter("a") is None
    for _ in range(3):
        limits.leave("a")
    assert limits.in_flight("a") == 0
    unlimited = AddressLimits(LimitSettings(max_requests_per_address=0))
    assert all(unlimited.enter("a") is None for _ in range(10_000))


def test_memory_is_bounded_when_addresses_are_sprayed():
    clock = Clock()
    limits = AddressLimits(LimitSettings(max_tracked_addresses=100, auth_failure_limit=2), clock)
    for number in range(10_000):
        limits.admit_publish(f"10.0.{number // 256}.{number % 256}")
        limits.auth_failed(f"10.0.{number // 256}.{number % 256}")
    assert len(limits._buckets) == 100 and len(limits._failures) == 100


@pytest.mark.parametrize("headers, query, presented", [
    ({"Authorization": "Bearer x"}, {}, True),
    ({}, {"token": "x"}, True),
    ({"X-Livedge-Fleet": "x"}, {}, True),  # a peer's: a bad one counts as a failure too
    ({"Accept": "*/*"}, {"msn": "1"}, False),
])
def test_what_counts_as_presenting_a_credential(headers, query, presented):
    assert presents_credential(headers, query) is presented


@pytest.mark.parametrize("address, key", [
    ("127.0.0.1", "127.0.0.1"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    (None, "-"),
    ("/run/livedge.sock", "/run/livedge.sock"),
])
def test_client_keys_group_ipv6_by_64(address, key):
    assert client_key(address) == key


def test_settings_reach_the_limits_and_the_server():
    settings = load_settings({"PUBLISH_RATE": "2.5", "PUBLISH_BURST": "4", "AUTH_FAILURE_LIMIT": "7",
                              "AUTH_LOCKOUT": "30", "MAX_REQUESTS_PER_ADDRESS": "0",
                              "HTTP_READ_TIMEOUT": "3"})
    assert LimitSettings.from_settings(settings) == LimitSettings(
        publish_rate=2.5, publish_burst=4, auth_failure_limit=7, auth_lockout=30,
        max_requests_per_address=0)
    assert server_handler_args(settings) == {"keepalive_timeout": 3.0}
    # Each of three serving processes allows its share of the node's failed authentications.
    workers = load_settings({"AUTH_FAILURE_LIMIT": "7", "HTTP_WORKERS": "3"})
    assert LimitSettings.from_settings(workers).auth_failure_limit == 3


# -- a real node --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("limits"), PUBLISH_RATE="10", PUBLISH_BURST="20",
                      AUTH_FAILURE_LIMIT="20", AUTH_LOCKOUT=str(LOCKOUT),
                      MAX_REQUESTS_PER_ADDRESS=str(MAX_REQUESTS),
                      HTTP_READ_TIMEOUT=str(READ_TIMEOUT)) as running:
        yield running
        assert "unhandled error" not in running.log()


def client(source: str) -> aiohttp.ClientSession:
    """A session whose connections come from ``source`` (an address in 127.0.0.0/8)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), limit=200))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer(issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 86400, "ops"))
PUBLISH = bearer(issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "*", 86400, "cam"))
BAD = bearer("not.a.token")


async def status_of(response: aiohttp.ClientResponse) -> tuple[int, dict, str | None]:
    body = await response.read()
    message = json.loads(body).get("message") if response.content_type == "application/json" \
        else None
    return response.status, dict(response.headers), message


async def test_whip_posts_beyond_the_burst_get_429_with_retry_after(node: RunningNode):
    async def post(session: aiohttp.ClientSession) -> tuple[int, dict, str | None]:
        async with session.post(f"{node.url}/whip/cam", data=b"v=0\r\n",
                                headers={"Content-Type": "application/sdp"}) as response:
            return await status_of(response)

    async with client("127.0.0.2") as session, client("127.0.0.3") as other:
        started = time.monotonic()
        answers = await asyncio.gather(*(post(session) for _ in range(40)))
        elapsed = time.monotonic() - started
        statuses = [status for status, _, _ in answers]
        # 20 from the burst plus what 10/s refilled meanwhile; no token, so 401 (not a failure:
        # no credential was presented).
        assert 20 <= statuses.count(401) <= 20 + 10 * elapsed + 1, (statuses, elapsed)
        assert statuses.count(429) == 40 - statuses.count(401)
        refused = [(headers, message) for status, headers, message in answers if status == 429]
        for headers, message in refused:
            assert headers["Retry-After"] == "1"
            assert "publish attempts" in message
            assert headers["Access-Control-Allow-Origin"] == "*"  # the usual headers too
        assert (await post(other))[0] == 401  # another address is not limited
        await asyncio.sleep(0.25)  # two tokens back
        assert (await post(session))[0] == 401


async def test_websocket_handshakes_take_from_the_same_bucket(node: RunningNode):
    async def handshake() -> tuple[int, Headers, bytes]:
        try:
            async with connect(f"{node.ws_url}/ingest/cam", local_addr=("127.0.0.4", 0),
                               proxy=None, open_timeout=5):
                pass
        except InvalidStatus as refused:
            return (refused.response.status_code, refused.response.headers,
                    refused.response.body)
        raise AssertionError("a handshake without a token was accepted")

    answers = [await handshake() for _ in range(25)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:20] == [401] * 20
    assert 429 in statuses[20:]
    status, headers, body = next(answer for answer in answers if answer[0] == 429)
    assert headers["Retry-After"] == "1"
    assert json.loads(body)["message"].startswith("too many publish attempts")


async def test_failed_authentications_lock_the_address_out(node: RunningNode):
    async with client("127.0.0.5") as session, client("127.0.0.6") as other:
        async def get(path: str, headers: dict | None = None,
                      http: aiohttp.ClientSession = session) -> tuple[int, dict, str | None]:
            async with http.get(f"{node.url}{path}", headers=headers or {}) as response:
                return await status_of(response)

        for _ in range(20):
            assert (await get("/api/streams", BAD))[0] == 401
        started = time.monotonic()
        status, headers, message = await get("/api/streams", BAD)
        assert status == 429 and "failed authentications" in message
        assert 1 <= int(headers["Retry-After"]) <= LOCKOUT
        assert (await get("/api/streams", ADMIN))[0] == 429  # locked out: not even checked
        assert (await get("/hls/x/index.m3u8?token=abc"))[0] == 429
        assert (await get("/api/streams"))[0] == 401  # no credential: answered as usual
        assert (await get("/hls/x/index.m3u8"))[0] == 404  # open playback carries on
        assert (await get("/healthz"))[0] == 200
        assert (await get("/api/streams", ADMIN, other))[0] == 200  # per address
        while time.monotonic() - started < LOCKOUT + 0.2:
            await asyncio.sleep(0.1)
        assert (await get("/api/streams", ADMIN))[0] == 200


def test_failed_playback_authentications_answered_by_the_fast_lane_lock_the_address_out(
        tmp_path):
    with running_node(tmp_path, PLAYBACK_AUTH="token", AUTH_FAILURE_LIMIT="5",
                      AUTH_LOCKOUT="60") as locking:
        http = Http(locking.url)
        try:
            refused = [http.get("/hls/cam/180p/index.m3u8?token=bad") for _ in range(5)]
            locked = http.get("/hls/cam/180p/index.m3u8?token=bad")
        finally:
            http.close()
    assert [(status, headers["server"]) for status, headers, _ in refused] == \
        [(401, "livedge")] * 5
    assert locked[0] == 429 and "failed authentications" in json.loads(locked[2])["message"]


def test_a_bad_token_on_a_path_no_route_matches_is_not_a_failed_authentication(tmp_path):
    with running_node(tmp_path, PLAYBACK_AUTH="token", AUTH_FAILURE_LIMIT="2",
                      AUTH_LOCKOUT="60") as locking:
        strays = [Http(locking.url) for _ in range(3)]  # aiohttp keeps each such connection
        try:
            answers = [http.get("/hls/cam/garbage?token=bad") for http in strays]
            checked = Http(locking.url)
            try:
                token_checked = checked.get("/hls/cam/180p/index.m3u8?token=bad")
            finally:
                checked.close()
        finally:
            for http in strays:
                http.close()
    assert [status for status, _, _ in answers] == [404] * 3
    assert token_checked[0] == 401


async def test_failed_websocket_authentications_count_for_http_too(node: RunningNode):
    async def handshake(token: str) -> int:
        try:
            async with connect(f"{node.ws_url}/ingest/cam?token={token}",
                               local_addr=("127.0.0.7", 0), proxy=None, open_timeout=5):
                pass
        except InvalidStatus as refused:
            return refused.response.status_code
        raise AssertionError("a bad token was accepted")

    # 20 handshakes is the whole publish burst: pace them under the rate.
    statuses = []
    for _ in range(20):
        statuses.append(await handshake("bad"))
        await asyncio.sleep(0.05)
    assert statuses == [401] * 20
    async with client("127.0.0.7") as session:
        async with session.get(f"{node.url}/api/streams", headers=ADMIN) as response:
            status, _, message = await status_of(response)
    assert status == 429 and "failed authentications" in message


async def test_concurrent_requests_of_one_address_are_capped(node: RunningNode):
    """Offers that never finish arriving hold requests in the handler; past the cap the address
    gets 429, other addresses and the probes do not; the offer read deadline frees the slots."""
    host, port = node.url.removeprefix("http://").split(":")
    head = (f"POST /whip/cam HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/sdp\r\n"
            f"Authorization: {PUBLISH['Authorization']}\r\nContent-Length: 1000\r\n\r\nv=0\r\n")
    slow = []
    started = time.monotonic()
    for _ in range(MAX_REQUESTS):
        reader, writer = await asyncio.open_connection(host, int(port),
                                                       local_addr=("127.0.0.8", 0))
        writer.write(head.encode())
        await writer.drain()
        slow.append((reader, writer))
    async with client("127.0.0.8") as session, client("127.0.0.9") as other:
        deadline = time.monotonic() + 2
        while True:  # the held requests reach the handler within a few milliseconds
            async with session.get(f"{node.url}/hls/x/index.m3u8") as response:
                status, headers, message = await status_of(response)
            if status == 429 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert status == 429 and "concurrent requests" in message
        assert headers["Retry-After"] == "1"
        async with session.get(f"{node.url}/healthz") as response:
            assert response.status == 200  # probes are not counted
        async with other.get(f"{node.url}/hls/x/index.m3u8") as response:
            assert response.status == 404
        # The offers' read deadline answers 408 and frees the slots.
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(4096), READ_TIMEOUT + 3)
                                         for reader, _ in slow))
        held_for = time.monotonic() - started
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers[0]
        assert b"did not arrive within" in answers[0]
        assert READ_TIMEOUT - 0.1 <= held_for <= READ_TIMEOUT + 2
        for _, writer in slow:
            writer.close()
        async with session.get(f"{node.url}/hls/x/index.m3u8") as response:
            assert response.status == 404


SLOW_SOCKETS = 200
SILENT_SOCKETS = 20


async def test_slowloris_sockets_are_closed_and_others_are_still_served(node: RunningNode):
    """200 sockets send a request's headers one byte a second and 20 send nothing: each is closed
    at the read deadline, and a normal client is answered quickly the whole time."""
    host, port = node.url.removeprefix("http://").split(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slow\r\n\r\n".encode()
    horizon = READ_TIMEOUT + 3  # seconds: every loop below ends by then

    async def slow_client(index: int, trickle: bool) -> float | None:
        """Seconds from connect until the server closed the socket; None if it never did."""
        reader, writer = await asyncio.open_connection(host, int(port),
                                                       local_addr=("127.0.0.10", 0))
        opened = time.monotonic()
        try:
            for position in range(int(horizon)):
                if trickle:
                    writer.write(request[position:position + 1])
                try:
                    data = await asyncio.wait_for(reader.read(100), 1.0)
                except TimeoutError:
                    continue
                assert data == b"", f"socket {index} got an answer to a partial request: {data!r}"
                return time.monotonic() - opened
            return None
        except ConnectionError:
            return time.monotonic() - opened
        finally:
            writer.close()

    async def normal_client() -> list[float]:
        latencies = []
        async with aiohttp.ClientSession() as session:
            for _ in range(int(horizon / 0.25)):
                started = time.monotonic()
                async with session.get(f"{node.url}/healthz") as response:
                    assert response.status == 200
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.25)
        return latencies

    slow = [asyncio.create_task(slow_client(index, trickle=index < SLOW_SOCKETS))
            for index in range(SLOW_SOCKETS + SILENT_SOCKETS)]
    latencies = await normal_client()
    closed_after = await asyncio.gather(*slow)
    assert None not in closed_after, f"{closed_after.count(None)} slow sockets stayed open"
    assert max(closed_after) <= READ_TIMEOUT + 1.5, max(closed_after)
    assert min(closed_after) >= READ_TIMEOUT - 0.5  # held to the deadline, not cut at once
    assert max(latencies) < 0.5, latencies
