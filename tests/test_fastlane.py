"""The fast lane (edge/fastlane.py) against a real node: raw HTTP/1.1 over 127.0.0.1 sockets, so
that every byte of the lane's answers, and of aiohttp's after a hand-over, is seen."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request
from typing import Callable

import pytest
from websockets.asyncio.client import connect

from bench.soak import encode_ts, publish_ws
from edge.burst import bursts_possible
from edge.tokens import Scope, issue_token
from edge.fastlane import BURST_FROM, _KEEP_ALIVE, _ObjectRequest, _Reload
from tests.nodes import TEST_SECRET, RunningNode, running_node

HINT = re.compile(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"')
PART = re.compile(r'#EXT-X-PART:.*URI="part(\d+)\.(\d+)\.m4s"')


def newest_part(body: bytes) -> tuple[int, int]:
    """The newest part a playlist lists. A reload for (msn, part) is satisfied by that part or,
    when the segment ended before it, by the first part of the next segment."""
    return max((int(msn), int(part)) for msn, part in PART.findall(body.decode()))


def play_parts(http: "Http", playlist: bytes, count: int) -> list[tuple[dict[str, str], bytes]]:
    """As a player does, ``count`` times on ``http``: a blocking reload for the part ``playlist``
    hints, then the newest part listed. Every answer must be 200 from the lane (Server:
    livedge); the parts' (headers, bytes) are returned."""
    parts = []
    for _ in range(count):
        msn, part = (int(v) for v in HINT.search(playlist.decode()).groups())
        status, headers, playlist = http.get(
            f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
        assert status == 200 and headers["server"] == "livedge"
        msn, part = newest_part(playlist)
        status, headers, data = http.get(f"/hls/demo/180p/part{msn}.{part}.m4s")
        assert status == 200 and headers["server"] == "livedge", headers
        parts.append((headers, data))
    return parts


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> RunningNode:
    with running_node(tmp_path_factory.mktemp("lane"), "--demo", HTTP_READ_TIMEOUT="1",
                      MAX_CONNECTIONS_PER_ADDRESS="0", MAX_REQUESTS_PER_ADDRESS="0") as running:
        wait_for_demo(running.url)
        yield running


def wait_for_demo(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/hls/demo/180p/index.m3u8", timeout=2) as answer:
                if HINT.search(answer.read().decode()):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("the demo stream did not start")


class Http:
    """One raw keep-alive connection: send heads, read whole answers."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""

    def send(self, *paths: str, headers: str = "", version: str = "1.1") -> None:
        self.sock.sendall(b"".join(
            f"GET {path} HTTP/{version}\r\nHost: x\r\n{headers}\r\n".encode() for path in paths))

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def get(self, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
        self.send(path, headers=headers)
        return self.answer()

    def closed_by_peer(self, wait: float) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


def next_part(http: Http) -> tuple[int, int]:
    _, _, body = http.get("/hls/demo/180p/index.m3u8")
    msn, part = HINT.search(body.decode()).groups()
    return int(msn), int(part)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_the_lane_answers_hot_requests_as_aiohttp_would(node):
    http = Http(node.url)
    try:
        lane = http.get("/hls/demo/180p/init.mp4")
        # A conditional header sends the request (and the connection) to aiohttp.
        framework = http.get("/hls/demo/180p/init.mp4", headers="If-None-Match: \"x\"\r\n")
    finally:
        http.close()
    assert lane[0] == framework[0] == 200
    assert lane[2] == framework[2] and lane[2][4:8] == b"ftyp"
    assert lane[1]["server"] == "livedge" and "aiohttp" in framework[1]["server"]
    for header in ("content-type", "cache-control", "access-control-allow-origin",
                   "access-control-expose-headers"):
        assert lane[1][header] == framework[1][header], header
    assert re.fullmatch(r"[0-9a-f]{16}", lane[1]["x-request-id"])
    assert metric(node.url, "livedge_fast_lane_answers_total") >= 1
    assert metric(node.url, "livedge_fast_lane_handovers_total") >= 1


def test_a_tame_request_id_is_echoed(node):
    http = Http(node.url)
    try:
        _, headers, _ = http.get("/hls/demo/index.m3u8", headers="X-Request-Id: abc.123\r\n")
    finally:
        http.close()
    assert headers["x-request-id"] == "abc.123"


@pytest.mark.parametrize("count", [50, BURST_FROM + 100])
def test_parked_reloads_are_all_answered_with_the_part_they_wait_for(node, count):
    # From BURST_FROM on, a wake is a burst: answered holding the GIL, without collections.
    bursts = metric(node.url, "livedge_fast_lane_bursts_total")
    sent_by_burst = metric(node.url, "livedge_fast_lane_burst_answers_total")
    probe = Http(node.url)
    msn, part = next_part(probe)
    probe.close()
    waiters = [Http(node.url) for _ in range(count)]
    try:
        for http in waiters:
            http.send(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
        answers = [http.answer() for http in waiters]
        # Each connection stays usable: the next reload parks again and is answered too.
        for http in waiters[:5]:
            http.send(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part + 1}"
                      if part < 3 else f"/hls/demo/180p/index.m3u8?_HLS_msn={msn + 1}&_HLS_part=0")
        again = [http.answer() for http in waiters[:5]]
    finally:
        for http in waiters:
            http.close()
    assert {status for status, _, _ in answers + again} == {200}
    assert all(newest_part(body) >= (msn, part) for _, _, body in answers)
    assert len({body for _, _, body in answers}) == 1  # one render shared by every waiter
    assert (metric(node.url, "livedge_fast_lane_bursts_total") > bursts) == \
        (count >= BURST_FROM)
    # Where two cores are usable, a burst's answers went through the burst sender (edge/burst.py).
    assert (metric(node.url, "livedge_fast_lane_burst_answers_total") > sent_by_burst) == \
        (count >= BURST_FROM and bursts_possible())


def test_a_players_repeated_reloads_are_matched_not_parsed_and_answered_alike(node):
    http = Http(node.url)
    before = metric(node.url, "livedge_fast_lane_repeated_reloads_total")
    try:
        _, _, playlist = http.get("/hls/demo/180p/index.m3u8")
        # The first reload is parsed and becomes the template; the next three match it.
        parts = play_parts(http, playlist, 4)
        msn, part = next_part(http)
        status, _, body = http.get(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
    finally:
        http.close()
    assert len(parts) == 4 and status == 200 and newest_part(body) >= (msn, part)
    assert metric(node.url, "livedge_fast_lane_repeated_reloads_total") - before == 4


def test_a_players_part_requests_are_matched_not_parsed_and_answered_alike(node):
    http = Http(node.url)
    before = metric(node.url, "livedge_fast_lane_repeated_objects_total")
    try:
        deadline = time.monotonic() + 10
        while True:  # until the window lists four parts
            _, _, playlist = http.get("/hls/demo/180p/index.m3u8")
            listed = sorted({tuple(map(int, found)) for found in PART.findall(playlist.decode())})
            if len(listed) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        names = ["init.mp4"] + [f"part{msn}.{part}.m4s" for msn, part in listed[-4:]]
        # The first request is parsed and becomes the template; the next four match it.
        matched = [http.get(f"/hls/demo/180p/{name}") for name in names]
        # Each answered as on a connection that parses it (one connection per request).
        parsed = []
        for name in names:
            fresh = Http(node.url)
            try:
                parsed.append(fresh.get(f"/hls/demo/180p/{name}"))
            finally:
                fresh.close()
        missing = http.get("/hls/demo/180p/part0.999.m4s")
    finally:
        http.close()
    assert len(names) == 5
    assert metric(node.url, "livedge_fast_lane_repeated_objects_total") - before == 5
    for (status, headers, body), (status2, headers2, body2) in zip(matched, parsed):
        assert status == status2 == 200 and body == body2 and headers["server"] == "livedge"
        assert headers["content-type"] == headers2["content-type"]
        assert headers["cache-control"] == headers2["cache-control"]
    assert missing[0] == 404 and json.loads(missing[2]) == {"message": "no such object"}


def test_a_repeated_reload_that_cannot_be_answered_is_refused_in_the_lane(node):
    http = Http(node.url)
    try:
        msn, part = next_part(http)
        first = http.get(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
        too_far = http.get(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn + 1000}&_HLS_part=0")
        nonsense = http.get(f"/hls/demo/180p/index.m3u8?_HLS_msn={2**60}&_HLS_part=0")
        msn, part = newest_part(first[2])
        again = http.get(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part + 1}")
    finally:
        http.close()
    assert first[0] == 200 and first[1]["server"] == "livedge"
    assert too_far[0] == 400 and "too far" in json.loads(too_far[2])["message"]
    assert nonsense[0] == 400 and "non-negative integer" in json.loads(nonsense[2])["message"]
    assert too_far[1]["server"] == nonsense[1]["server"] == "livedge"
    assert again[0] == 200 and again[1]["server"] == "livedge"


def test_a_preload_hinted_part_is_held_then_sent_whole(node):
    http = Http(node.url)
    try:
        msn, part = next_part(http)
        status, headers, body = http.get(f"/hls/demo/180p/part{msn}.{part}.m4s")
    finally:
        http.close()
    assert status == 200 and headers["content-type"] == "video/mp4"
    assert int(headers["content-length"]) == len(body) and b"moof" in body[:64]


def test_pipelined_requests_are_answered_in_order(node):
    http = Http(node.url)
    try:
        msn, part = next_part(http)
        http.send(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}",
                  "/hls/demo/180p/init.mp4", "/healthz", "/hls/demo/index.m3u8")
        answers = [http.answer() for _ in range(4)]
    finally:
        http.close()
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]
    assert newest_part(answers[0][2]) >= (msn, part)
    assert answers[1][2][4:8] == b"ftyp"
    assert json.loads(answers[2][2])["status"] == "ok"  # /healthz: aiohttp took over
    assert answers[3][2].startswith(b"#EXTM3U")  # and serves the rest of the connection


ERRORS_OF_HLS_ROUTES = [
    ("/hls/demo/180p/nope.m4s", 404, "no such object"),
    ("/hls/demo/180p/init-nope.mp4", 404, "no such object"),
    ("/hls/gone/180p/index.m3u8", 404, "stream gone is not live here"),
    ("/hls/gone/180p/part1.0.m4s", 404, "stream gone is not live here"),
    ("/hls/demo/999p/index.m3u8", 404, "stream demo has no rendition 999p"),
    ("/hls/demo/180p/index.m3u8?_HLS_msn=999999", 400,
     "_HLS_msn/_HLS_part is too far beyond the live edge"),
    ("/hls/demo/180p/index.m3u8?_HLS_part=1", 400, "_HLS_part needs _HLS_msn"),
    ("/hls/bad..name/180p/index.m3u8", 400, None),
]


def test_errors_of_hls_routes_are_answered_in_the_lane_as_aiohttp_answers_them(node):
    """A player told 404 (its stream restarting) or 400 goes on asking on the same connection: the
    lane answers the error itself, with aiohttp's status and JSON, and keeps the connection."""
    lane, aiohttp = Http(node.url), Http(node.url)
    try:
        for path, status, message in ERRORS_OF_HLS_ROUTES:
            ours = lane.get(path, headers="X-Request-Id: player-1\r\n")
            # A conditional request is aiohttp's: the same error, as it answers it.
            theirs = aiohttp.get(path, headers='If-None-Match: "x"\r\n')
            assert (ours[0], ours[1]["server"]) == (status, "livedge"), (path, ours)
            assert theirs[0] == status and theirs[1]["server"] != "livedge", (path, theirs)
            assert json.loads(ours[2]) == json.loads(theirs[2]), path
            if message is not None:
                assert json.loads(ours[2]) == {"message": message}, path
            assert ours[1]["content-type"] == theirs[1]["content-type"] == \
                "application/json; charset=utf-8"
            assert ours[1]["x-request-id"] == "player-1"
            assert ours[1]["access-control-allow-origin"] == \
                theirs[1]["access-control-allow-origin"]
        status, headers, body = lane.get("/hls/demo/180p/index.m3u8")
    finally:
        lane.close()
        aiohttp.close()
    assert status == 200 and headers["server"] == "livedge" and body.startswith(b"#EXTM3U")


@pytest.mark.parametrize("path", [
    "/hls/demo/garbage?token=bad", "/hls/demo/180p/", "/hls//index.m3u8", "/hls/demo//init.mp4",
    "/hls/demo/180p/x/part1.0.m4s", "/hls/demo",
])
def test_a_path_no_hls_route_matches_is_aiohttps_404(node, path):
    # The lane located the stream (and checked the token) before the path's shape: these got its
    # 401 or 404 "no such object" where aiohttp's router says 404 "Not Found".
    http = Http(node.url)
    try:
        status, headers, _ = http.get(path)
    finally:
        http.close()
    assert status == 404 and headers["server"] != "livedge"


def test_a_head_larger_than_aiohttp_allows_is_refused_even_when_it_arrives_whole(node):
    # The lane checked the size only while a head was incomplete; a whole 20 KB one was served
    # (and its User-Agent kept by the viewer count), where aiohttp answers 400.
    http = Http(node.url)
    try:
        status, headers, _ = http.get("/hls/demo/180p/index.m3u8",
                                      headers=f"User-Agent: {'x' * 20000}\r\n")
    finally:
        http.close()
    assert status == 400 and headers.get("server") != "livedge"


def test_an_init_segment_no_listed_segment_needs_is_not_found(node):
    http = Http(node.url)
    try:
        assert http.get("/hls/demo/180p/init.mp4")[0] == 200
        status, _, body = http.get("/hls/demo/180p/init-7.mp4")
    finally:
        http.close()
    assert status == 404 and json.loads(body) == {"message": "no such object"}


def test_http_1_0_without_keep_alive_is_answered_then_closed(node):
    http = Http(node.url)
    try:
        http.send("/hls/demo/index.m3u8", version="1.0")
        status, headers, _ = http.answer()
        assert status == 200 and headers["connection"] == "close"
        assert http.closed_by_peer(5)
    finally:
        http.close()


def test_connection_close_is_answered_then_closed(node):
    for path in ("/hls/demo/index.m3u8", "/hls/demo/180p/index.m3u8", "/hls/demo/180p/init.mp4"):
        http = Http(node.url)
        try:
            http.send(path, headers="Connection: close\r\n")
            status, headers, _ = http.answer()
            assert status == 200 and headers["connection"] == "close", path
            assert http.closed_by_peer(5), path
        finally:
            http.close()


def test_a_closed_waiter_is_forgotten(node):
    http = Http(node.url)
    msn, part = next_part(http)
    http.send(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn + 1}&_HLS_part={part}")
    time.sleep(0.1)
    http.close()
    time.sleep(2.5)  # past the next segment: the wake skips it
    assert metric(node.url, "livedge_blocked_requests") == 0


def test_a_slow_client_is_closed_after_the_read_timeout(node):
    http = Http(node.url)
    try:
        http.sock.sendall(b"GET /hls/demo/index.m3u8 HTTP/1.1\r\nHost: x\r\n")  # never ends
        started = time.monotonic()
        assert http.closed_by_peer(5)
        assert time.monotonic() - started < 4
    finally:
        http.close()
    idle = Http(node.url)  # an idle keep-alive connection too, after its answer
    try:
        assert idle.get("/hls/demo/index.m3u8")[0] == 200
        assert idle.closed_by_peer(5)
    finally:
        idle.close()


def test_connections_past_the_per_address_cap_get_429_and_a_close(tmp_path):
    with running_node(tmp_path, MAX_CONNECTIONS_PER_ADDRESS="3") as capped:
        held = [Http(capped.url) for _ in range(3)]
        try:
            for http in held:
                assert http.get("/healthz")[0] == 200
            refused = Http(capped.url)
            refused.send("/healthz")
            status, headers, body = refused.answer()
            assert status == 429 and headers["retry-after"] == "1"
            assert "too many connections" in json.loads(body)["message"]
            assert refused.closed_by_peer(5)
            refused.close()
            held.pop().close()
            time.sleep(0.2)
            again = Http(capped.url)
            assert again.get("/healthz")[0] == 200
            again.close()
            assert metric(capped.url, "livedge_http_connections_refused_total") == 1
        finally:
            for http in held:
                http.close()


def test_with_the_lane_off_aiohttp_answers_everything_and_the_connection_cap_holds(tmp_path):
    with running_node(tmp_path, "--demo", FAST_LANE="false",
                      MAX_CONNECTIONS_PER_ADDRESS="2") as plain:
        wait_for_demo(plain.url)
        held = [Http(plain.url) for _ in range(2)]
        try:
            status, headers, _ = held[0].get("/hls/demo/index.m3u8")
            assert held[1].get("/healthz")[0] == 200
            refused = Http(plain.url)
            refused.send("/healthz")
            refused_status = refused.answer()[0]
            refused.close()
        finally:
            for http in held:
                http.close()
    assert status == 200 and "aiohttp" in headers["server"]
    assert refused_status == 429


async def test_a_reload_parked_on_a_stream_that_stops_gets_503(tmp_path):
    with running_node(tmp_path, PUBLISH_GRACE="20") as quiet:
        data = await asyncio.to_thread(encode_ts, 3.0)
        token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "short", 3600, "lane")
        assert await publish_ws(quiet.ws_url, "short", data, 3.0, token=token) == "ok"
        # The publisher left; within the grace period the stream is live but makes nothing
        # once the node has packaged what it was sent.
        await asyncio.sleep(2)
        http = Http(quiet.url)
        try:
            msn, part = next_part_of(http, "/hls/short/180p/index.m3u8")
            started = time.monotonic()
            status, headers, body = await asyncio.to_thread(
                http.get, f"/hls/short/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
            waited = time.monotonic() - started
        finally:
            http.close()
        assert status == 503, (status, body, waited)
        assert metric(quiet.url, "livedge_blocked_request_timeouts_total") >= 1
    assert status == 503 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"message": "the requested part did not arrive in time"}
    assert 2.5 < waited < 6  # three target durations (1 s), swept every quarter second


async def ask_while_publishing(node: RunningNode, http: Http, stream: str, path: str,
                               pause: float, done: Callable[[int, bytes], bool]
                               ) -> list[tuple[int, dict[str, str], bytes]]:
    """Publish 4 s of media as ``stream`` while asking for ``path`` on ``http`` every ``pause``
    seconds until ``done(status, body)`` (20 s at most); the answers."""
    data = await asyncio.to_thread(encode_ts, 4.0)
    token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, stream, 3600, "lane")
    publishing = asyncio.create_task(publish_ws(node.ws_url, stream, data, 4.0, token=token))
    deadline = time.monotonic() + 20
    answers = []
    while time.monotonic() < deadline:
        answers.append(await asyncio.to_thread(http.get, path))
        if done(answers[-1][0], answers[-1][2]):
            break
        await asyncio.sleep(pause)
    assert await publishing == "ok"
    return answers


async def test_a_player_told_404_before_its_stream_is_live_is_served_by_the_lane_once_it_is(
        tmp_path):
    # A stream that is away (its publisher reconnecting) is answered 404 to every player asking:
    # handed to aiohttp for that, their connections would stay there once the stream is back.
    with running_node(tmp_path) as quiet:
        http = Http(quiet.url)
        try:
            away = await asyncio.to_thread(http.get, "/hls/back/180p/index.m3u8")
            answers = await ask_while_publishing(
                quiet, http, "back", "/hls/back/180p/index.m3u8", 0.1,
                lambda status, body: status == 200 and PART.search(body.decode()) is not None)
        finally:
            http.close()
    assert away[0] == 404 and away[1]["server"] == "livedge"
    assert answers[-1][0] == 200, answers[-1]
    assert {headers["server"] for _, headers, _ in answers} == {"livedge"}


async def test_a_starting_streams_multivariant_playlist_is_held_in_the_lane_until_its_parts(
        tmp_path):
    # Viewers waiting for a show to start ask for it again and again: the one that asks as the
    # publish starts is held for the first parts (as aiohttp would hold it), in the lane.
    with running_node(tmp_path) as quiet:
        held_before = metric(quiet.url, "livedge_blocked_requests_total")
        http = Http(quiet.url)
        try:
            answers = await ask_while_publishing(quiet, http, "show", "/hls/show/index.m3u8",
                                                 0.02, lambda status, body: status == 200)
        finally:
            http.close()
        held = metric(quiet.url, "livedge_blocked_requests_total") - held_before
    assert answers[-1][0] == 200 and b"#EXT-X-STREAM-INF" in answers[-1][2]
    assert {status for status, _, _ in answers} <= {404, 200}
    assert {headers["server"] for _, headers, _ in answers} == {"livedge"}
    assert held >= 1


async def test_a_multivariant_playlist_held_for_parts_that_never_come_gets_503(tmp_path):
    with running_node(tmp_path) as quiet:
        token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "silent", 3600, "lane")
        # A publisher that connects and sends nothing: the stream exists, without media.
        async with connect(f"{quiet.ws_url}/ingest/silent", open_timeout=5,
                           additional_headers={"Authorization": f"Bearer {token}"}):
            http = Http(quiet.url)
            try:
                started = time.monotonic()
                status, headers, body = await asyncio.to_thread(http.get,
                                                                "/hls/silent/index.m3u8")
                waited = time.monotonic() - started
            finally:
                http.close()
    assert (status, headers["server"]) == (503, "livedge")
    assert json.loads(body) == {"message": "stream silent has no media yet"}
    assert 2.5 < waited < 6  # two segments and a second (SEGMENT_DURATION=1), swept each 0.25 s


def next_part_of(http: Http, path: str) -> tuple[int, int]:
    _, _, body = http.get(path)
    msn, part = HINT.search(body.decode()).groups()
    return int(msn), int(part)


# -- reload templates (pure) -----------------------------------------------------------------------
RELOAD_HEAD = (b"GET /hls/cam/360p/index.m3u8?token=t&_HLS_msn=12&_HLS_part=3&_HLS_skip=YES "
               b"HTTP/1.1\r\nHost: x\r\nUser-Agent: ua\r\n\r\n")


def reload_template(head: bytes = RELOAD_HEAD) -> _Reload | None:
    url = head.split(b" ")[1]
    return _Reload.of(head, url, stream_name="cam", rendition="360p", token="t", skip=True,
                      request_id=None, client="127.0.0.1|ua", reply=_KEEP_ALIVE)


def test_a_reload_template_reads_the_numbers_of_its_repeats():
    template = reload_template()
    assert template is not None
    assert template.numbers(RELOAD_HEAD) == (12, 3)
    assert template.numbers(RELOAD_HEAD.replace(b"msn=12&_HLS_part=3", b"msn=1234&_HLS_part=0")) \
        == (1234, 0)


@pytest.mark.parametrize("change", [
    (b"User-Agent: ua", b"User-Agent: other"),  # another header: parsed anew
    (b"Host: x\r\n", b"Host: x\r\nRange: bytes=0-1\r\n"),  # one the lane hands over
    (b"token=t", b"token=u"),  # another token: checked anew
    (b"_HLS_skip=YES", b"_HLS_skip=v2"),
    (b"msn=12", b"msn=1x"),
    (b"msn=12", b"msn="),
    (b"msn=12", b"msn=" + b"1" * 17),  # longer than edge.hls reads
    (b"msn=12", b"msn=%d" % (2**53 + 1)),  # past the largest number edge.hls takes
    (b"_HLS_part=3", b"_HLS_part=3&_HLS_part=4"),
    (b"HTTP/1.1", b"HTTP/1.0"),
])
def test_a_reload_template_matches_nothing_but_other_numbers(change):
    template = reload_template()
    assert template is not None and template.numbers(RELOAD_HEAD.replace(*change)) is None


@pytest.mark.parametrize("query", [
    b"_HLS_part=3&_HLS_msn=12",  # the other order
    b"_HLS_msn=12&x=1&_HLS_part=3",  # not adjacent
    b"_HLS_part=1&_HLS_msn=12&_HLS_part=3",  # the first _HLS_part is not the one after
    b"_HLS_msn=12",
])
def test_only_a_query_with_adjacent_msn_then_part_makes_a_template(query):
    head = b"GET /hls/cam/360p/index.m3u8?" + query + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert reload_template(head) is None


# -- object request templates (pure) ---------------------------------------------------------------
OBJECT_HEAD = (b"GET /hls/cam/360p/part12.3.m4s?token=t HTTP/1.1\r\nHost: x\r\n"
               b"User-Agent: ua\r\n\r\n")


def object_template(head: bytes = OBJECT_HEAD) -> _ObjectRequest | None:
    url = head.split(b" ")[1]
    return _ObjectRequest.of(head, url, stream_name="cam", rendition="360p", token="t",
                             request_id=None, reply=_KEEP_ALIVE)


def test_an_object_template_reads_the_names_of_its_repeats():
    template = object_template()
    assert template is not None
    assert template.name(OBJECT_HEAD) == "part12.3.m4s"
    assert template.name(OBJECT_HEAD.replace(b"part12.3.m4s", b"seg13.m4s")) == "seg13.m4s"
    assert template.name(OBJECT_HEAD.replace(b"part12.3.m4s", b"init-2.mp4")) == "init-2.mp4"
    longest = "p" * 60 + ".m4s"  # edge.hls.OBJECT_NAME_MAX
    assert template.name(OBJECT_HEAD.replace(b"part12.3.m4s", longest.encode())) == longest


@pytest.mark.parametrize("change", [
    (b"part12.3.m4s", b"index.m3u8"),  # a playlist: another route
    (b"part12.3.m4s", b"x/part12.3.m4s"),  # another depth of path
    (b"part12.3.m4s", b"part%31.m4s"),  # an escape aiohttp would decode
    (b"part12.3.m4s", b".m4s"),
    (b"part12.3.m4s", b"p" * 61 + b".m4s"),  # longer than an object name may be
    (b"360p/", b"180p/"),  # another rendition
    (b"token=t", b"token=u"),  # another token: checked anew
    (b"User-Agent: ua", b"User-Agent: other"),
    (b"Host: x\r\n", b"Host: x\r\nRange: bytes=0-1\r\n"),  # one the lane hands over
    (b"GET ", b"HEAD "),
])
def test_an_object_template_matches_nothing_but_other_object_names(change):
    template = object_template()
    assert template is not None and template.name(OBJECT_HEAD.replace(*change)) is None


@pytest.mark.parametrize("name", [b"index.m3u8", b"nope", b"a%20b.m4s"])
def test_only_an_object_the_packager_could_name_makes_a_template(name):
    assert object_template(OBJECT_HEAD.replace(b"part12.3.m4s", name)) is None
