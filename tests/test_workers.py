"""HTTP workers (edge/workers.py): a node with HTTP_WORKERS=2 is two processes on one port, both
serving its streams, the worker proxying everything else to the main process; workers are
restarted when they die and end with their main process; one scrape of /metrics covers them all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from bench.load import child_pids, worker_answers
from edge.metrics import MERGED_REUSE_SECONDS
from edge.peer_api import FLEET_HEADER, FleetCredential
from edge.tokens import Scope, issue_token
from tests.nodes import TEST_SECRET, RunningNode, running_node, scrape
from tests.redis_server import redis_server
from tests.test_deploy import tool
from tests.test_fastlane import HINT, Http, newest_part, play_parts, wait_for_demo
from tests.test_fleet import fleet

ADMIN = issue_token(TEST_SECRET, "HS256", Scope.ADMIN, None, 86400, "ops")


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> RunningNode:
    with running_node(tmp_path_factory.mktemp("workers"), "--demo", HTTP_WORKERS="2",
                      MAX_CONNECTIONS_PER_ADDRESS="0", MAX_REQUESTS_PER_ADDRESS="0") as running:
        wait_for_demo(running.url)
        until(lambda: worker_answers(running.url), 20, "no worker answers")
        yield running


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)


def connections_by_process(url: str, wanted: int = 2, tries: int = 64) -> dict[bool, Http]:
    """One open connection to the main process (False) and one to a worker (True): the kernel
    spreads connections, a worker marks what it proxies with Via."""
    found: dict[bool, Http] = {}
    for _ in range(tries):
        http = Http(url)
        status, headers, _ = http.get("/healthz")
        assert status == 200
        on_worker = headers.get("via") == "1.1 livedge-worker"
        if on_worker in found:
            http.close()
        else:
            found[on_worker] = http
        if len(found) == wanted:
            return found
    raise AssertionError(f"connections reached {len(found)} process(es) only")


def test_both_processes_serve_the_same_playlists_and_blocking_reloads(node):
    # Each process makes request ids with its own prefix: collect a lane connection to each.
    by_prefix: dict[str, Http] = {}
    for _ in range(64):
        http = Http(node.url)
        status, headers, _ = http.get("/hls/demo/180p/index.m3u8")
        assert status == 200
        prefix = headers["x-request-id"][:8]
        # A worker's first request for a stream waits, through aiohttp, for its replica to load.
        if prefix in by_prefix or headers["server"] != "livedge":
            http.close()
        else:
            by_prefix[prefix] = http
        if len(by_prefix) == 2:
            break
    try:
        assert len(by_prefix) == 2, "connections reached one process only"
        newest = []
        for http in by_prefix.values():
            _, _, body = http.get("/hls/demo/180p/index.m3u8")
            msn, part = (int(v) for v in HINT.search(body.decode()).groups())
            http.send(f"/hls/demo/180p/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
        for http in by_prefix.values():
            status, headers, body = http.answer()
            assert status == 200 and headers["server"] == "livedge"  # each process's own lane
            newest.append(newest_part(body))
            assert http.get("/hls/demo/180p/init.mp4")[2][4:8] == b"ftyp"
    finally:
        for http in by_prefix.values():
            http.close()
    assert abs(newest[0][0] - newest[1][0]) <= 1  # the same stream, at the same point


def test_a_worker_proxies_the_api_with_bodies_and_status_codes(node):
    by_process = connections_by_process(node.url)
    worker = by_process[True]
    try:
        status, headers, body = worker.get("/api/streams",
                                           headers=f"Authorization: Bearer {ADMIN}\r\n")
        assert status == 200 and headers["via"] == "1.1 livedge-worker"
        assert "demo" in body.decode()
        refused = worker.get("/api/streams")
        assert refused[0] == 401 and "message" in json.loads(refused[2])
        # A POST with a body reaches the main process whole (and is refused there: bad JSON).
        payload = b'{"name": "x"'
        worker.sock.sendall(
            b"POST /api/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Length: "
            + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        status, _, body = worker.answer()
        assert status == 400 and "message" in json.loads(body)
    finally:
        for http in by_process.values():
            http.close()


def test_a_worker_forwards_the_path_as_the_client_encoded_it(node):
    # Decoded, %3F became a query and %2F a path step: the main process routed another request.
    by_process = connections_by_process(node.url)
    try:
        answers = {on_worker: http.get("/api/streams%3Fx=1",
                                       headers=f"Authorization: Bearer {ADMIN}\r\n")[0]
                   for on_worker, http in by_process.items()}
    finally:
        for http in by_process.values():
            http.close()
    assert answers == {False: 404, True: 404}


def test_a_forged_client_address_header_is_never_trusted(node):
    for _ in range(16):  # both processes, whichever the kernel picks
        http = Http(node.url)
        try:
            status, headers, _ = http.get("/healthz", headers="X-Livedge-Client: 203.0.113.9\r\n")
        finally:
            http.close()
        # The main process wants the workers' credential with it; a worker replaces it.
        assert status == 401 or headers.get("via") == "1.1 livedge-worker"


def test_the_peer_api_wants_a_fleet_credential_whichever_process_answers(node):
    # A worker proxies what it does not serve; it once did so with its own fleet credential, so
    # anyone reached the peer API (and the media of token-protected streams) through it.
    statuses = set()
    for _ in range(16):  # both processes, whichever the kernel picks
        http = Http(node.url)
        try:
            for path in ("/fleet/streams", "/fleet/objects/demo/180p/init.mp4"):
                status, headers, body = http.get(path)
                statuses.add((status, headers.get("via")))
                assert status == 401 and "message" in json.loads(body), (path, status)
            forged = http.get("/fleet/streams", headers="X-Livedge-Worker: forged\r\n"
                                                         "X-Livedge-Client: 203.0.113.9\r\n")
            assert forged[0] == 401
        finally:
            http.close()
    assert (401, "1.1 livedge-worker") in statuses  # the worker's proxy was tried too


def test_a_fleet_peer_reaches_the_peer_api_through_either_process(tmp_path):
    """The peer's own credential goes through a worker's proxy as it came."""
    secret = "fleet-secret-" + "f" * 32
    peer = FleetCredential(secret.encode(), "edge-9")
    with fleet(tmp_path, 1, HTTP_WORKERS="2", FLEET_SECRET=secret,
               MAX_CONNECTIONS_PER_ADDRESS="0") as (edge,):
        wait_for_demo(edge.url)
        until(lambda: worker_answers(edge.url), 20, "no worker answers")
        vias = set()
        for _ in range(16):
            http = Http(edge.url)
            try:
                status, headers, body = http.get(
                    "/fleet/objects/demo/180p/init.mp4",
                    headers=f"{FLEET_HEADER}: {peer.token()}\r\n")
                assert status == 200 and body[4:8] == b"ftyp", status
                vias.add(headers.get("via"))
            finally:
                http.close()
        assert vias == {None, "1.1 livedge-worker"}  # the main process, and through the worker


def test_peer_api_follows_do_not_count_against_the_per_address_request_limit(tmp_path):
    """A worker follows each stream it serves with one long answer from 127.0.0.1; counted, it
    took the loopback address's request slots (and a fleet peer's) for as long as it followed."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with running_node(tmp_path, "--demo", HTTP_WORKERS="2", MAX_REQUESTS_PER_ADDRESS="1",
                      MAX_CONNECTIONS_PER_ADDRESS="0") as running:
        wait_for_demo(running.url)
        until(lambda: worker_answers(running.url), 20, "no worker answers")
        main_prefix = own_prefix(running.url)
        answered_by_worker = False
        for _ in range(64):  # until the worker's lane answers: it follows the stream by then
            http = Http(running.url)
            try:
                status, headers, _ = http.get("/hls/demo/180p/index.m3u8")
                answered_by_worker = status == 200 and headers["server"] == "livedge" \
                    and headers["x-request-id"][:8] != main_prefix
            finally:
                http.close()
            if answered_by_worker:
                break
        assert answered_by_worker
        for _ in range(8):
            request = urllib.request.Request(running.url + "/api/streams", headers=admin)
            with urllib.request.urlopen(request, timeout=5) as answer:
                assert answer.status == 200


def process_up(url: str, process: str) -> float | None:
    """``livedge_process_up`` of ``process``; None when the scrape's connection was reset (it
    reached a worker's listener as the worker died)."""
    try:
        return scrape(url)[1][("livedge_process_up", (("process", process),))]
    except ConnectionError:
        return None


def test_one_scrape_counts_every_process_of_the_node(node, tmp_path):
    lane_answers = ("livedge_fast_lane_answers_total", (("process", "worker-1"),))
    before = scrape(node.url)[1].get(lane_answers, 0)
    answered_by_worker = 0
    for _ in range(64):  # new connections: the kernel spreads them over both processes
        http = Http(node.url)
        try:
            status, headers, _ = http.get("/hls/demo/180p/index.m3u8")
            assert status == 200
            answered_by_worker += headers["x-request-id"][:8] != own_prefix(node.url)
        finally:
            http.close()
    assert answered_by_worker  # the worker's lane answered some
    time.sleep(MERGED_REUSE_SECONDS)  # a scrape within a second is answered the same
    text, samples = scrape(node.url)
    assert samples[("livedge_process_up", (("process", "main"),))] == 1
    assert samples[("livedge_process_up", (("process", "worker-1"),))] == 1
    assert samples[lane_answers] >= before + answered_by_worker
    assert samples[("livedge_streams_live", (("process", "main"),))] == 1
    (tmp_path / "metrics.txt").write_text(text)
    # Prometheus parses the merged text (promtool exits 1 on what it cannot parse, 3 on lint);
    # the one lint it reports is our choice of bits for media bitrates.
    lint = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in lint.stderr.splitlines()
                if line and 'use base unit "bytes" instead of "bits"' not in line]
    assert lint.returncode in (0, 3) and not problems, lint.stderr
    # A worker's own exposition is for its main process only.
    for _ in range(8):
        try:
            urllib.request.urlopen(node.url + "/fleet/metrics", timeout=5)
            raise AssertionError("/fleet/metrics answered without a credential")
        except urllib.error.HTTPError as error:
            assert error.code in (401, 404)


def own_prefix(url: str) -> str:
    """The request-id prefix of the main process: what it answers itself (the API)."""
    for _ in range(32):
        with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
            if answer.headers.get("Via") is None:
                return answer.headers["X-Request-Id"][:8]
    raise AssertionError("the main process answered no connection")


def test_a_worker_answers_new_parts_in_its_lane_reading_them_from_the_main_process(node):
    """A worker's events carry no bytes: each new part is read from the main process on its
    first request, with the viewer's connection held in the worker's lane (once, it was handed to
    aiohttp for good, and the worker's lane answered nothing more)."""
    main_prefix = own_prefix(node.url)
    viewer = None
    for _ in range(64):
        http = Http(node.url)
        status, headers, body = http.get("/hls/demo/180p/index.m3u8")
        if status == 200 and headers["server"] == "livedge" \
                and headers["x-request-id"][:8] != main_prefix:
            viewer = http
            break
        http.close()
    assert viewer is not None, "no connection reached the worker's lane"
    read_through = ("livedge_fast_lane_read_through_total", (("process", "worker-1"),))
    before = scrape(node.url)[1][read_through]
    try:
        for headers, _ in play_parts(viewer, body, 4):
            assert headers["x-request-id"][:8] != main_prefix
    finally:
        viewer.close()
    time.sleep(MERGED_REUSE_SECONDS)  # a scrape within a second is answered the same
    assert scrape(node.url)[1][read_through] > before


def test_a_dead_worker_is_restarted_and_the_node_keeps_serving(node):
    [worker] = child_pids(node.process.pid)
    time.sleep(MERGED_REUSE_SECONDS)  # the next scrape is a fresh one
    os.kill(worker, signal.SIGKILL)
    # Scrapes go on meanwhile, reporting the worker down (for about a second: it restarts). A
    # scrape that reaches its listener before the node has seen the death waits there, and the
    # restarted worker answers it: give the node a moment to see it first.
    time.sleep(0.2)
    until(lambda: process_up(node.url, "worker-1") == 0, 10, "the dead worker was scraped as up")
    until(lambda: child_pids(node.process.pid) not in ([], [worker]), 20,
          "the worker was not restarted")
    until(lambda: worker_answers(node.url), 20, "the new worker does not answer")
    # Its listener for the main process is the same one, handed over again.
    until(lambda: process_up(node.url, "worker-1") == 1, 10, "the new worker is not scraped")
    # However short the outage, the restart is counted.
    restarts = ("livedge_http_worker_restarts_total", (("process", "main"),))
    assert scrape(node.url)[1][restarts] == 1
    for _ in range(8):
        with urllib.request.urlopen(node.url + "/hls/demo/index.m3u8", timeout=5) as answer:
            assert answer.status == 200


def test_workers_end_with_their_main_process(tmp_path):
    for stop in (signal.SIGTERM, signal.SIGKILL):
        with running_node(tmp_path, HTTP_WORKERS="3") as running:
            until(lambda: len(child_pids(running.process.pid)) == 2, 20, "no workers started")
            workers = child_pids(running.process.pid)
            running.process.send_signal(stop)
            code = running.process.wait(timeout=20)
            until(lambda: not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid)
                                  for pid in workers), 15, f"workers outlived {stop!r}")
        if stop is signal.SIGTERM:
            assert code == 0
            assert re.search(r"http worker started", running.log())


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_of_a_reading_node_serve_the_streams_it_replicates(tmp_path):
    """Node B ingests nothing: it replicates node A's demo through Redis, and its worker follows
    B's replica (B's event log logs what it replicates)."""
    with redis_server(tmp_path / "redis") as redis, \
            running_node(tmp_path, "--demo", REDIS_URL=redis.url) as ingesting, \
            running_node(tmp_path, REDIS_URL=redis.url, HTTP_WORKERS="2",
                         MAX_CONNECTIONS_PER_ADDRESS="0") as reading:
        wait_for_demo(ingesting.url)
        wait_for_demo(reading.url)
        until(lambda: worker_answers(reading.url), 20, "no worker answers")
        answered: dict[str, tuple[int, int]] = {}
        deadline = time.monotonic() + 20
        while len(answered) < 2 and time.monotonic() < deadline:
            http = Http(reading.url)
            try:
                status, headers, body = http.get("/hls/demo/180p/index.m3u8")
                if status == 200 and headers["server"] == "livedge":
                    answered[headers["x-request-id"][:8]] = newest_part(body)
                    part = http.get(f"/hls/demo/180p/part{newest_part(body)[0]}."
                                    f"{newest_part(body)[1]}.m4s")
                    assert part[0] == 200 and b"moof" in part[2][:64]
            finally:
                http.close()
    assert len(answered) == 2, answered  # the node and its worker
    (first, second) = answered.values()
    assert abs(first[0] - second[0]) <= 1


OLD_SECRET = "old-secret-" + "o" * 32
NEW_SECRET = "new-secret-" + "n" * 32


def play_status(url: str, token: str | None) -> tuple[int, bool]:
    """(status, answered by a worker's own lane) of a media playlist request with ``token``."""
    target = url + "/hls/demo/180p/index.m3u8" + (f"?token={token}" if token else "")
    try:
        with urllib.request.urlopen(target, timeout=5) as answer:
            return answer.status, answer.headers.get("X-Request-Id", "")[:8]
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("X-Request-Id", "")[:8]


def test_every_process_checks_play_tokens_and_reloads_keys_with_the_node(tmp_path):
    config = tmp_path / "livedge.toml"
    config.write_text(f'jwt_secret = "{OLD_SECRET}"\nplayback_auth = "token"\n')
    old = issue_token(OLD_SECRET, "HS256", Scope.PLAY, "demo", 3600, "viewer")
    new = issue_token(NEW_SECRET, "HS256", Scope.PLAY, "demo", 3600, "viewer")
    # JWT_SECRET from the environment would win over the file: clear it for this node.
    with running_node(tmp_path, "--demo", "--config", str(config), JWT_SECRET="",
                      HTTP_WORKERS="2", MAX_CONNECTIONS_PER_ADDRESS="0",
                      AUTH_FAILURE_LIMIT="1000000") as node:
        until(lambda: play_status(node.url, old)[0] == 200, 30, "the stream did not start")
        until(lambda: worker_answers(node.url), 20, "no worker answers")

        def processes_answering(token: str | None, status: int) -> set[str]:
            seen = set()
            for _ in range(40):
                answer_status, process = play_status(node.url, token)
                assert answer_status == status, (token, answer_status)
                seen.add(process)
            return seen

        assert len(processes_answering(old, 200)) == 2
        assert len(processes_answering(None, 401)) == 2
        config.write_text(f'jwt_secret = "{NEW_SECRET}"\nplayback_auth = "token"\n')
        node.process.send_signal(signal.SIGHUP)  # the node forwards it to its workers

        def reloaded_everywhere() -> bool:
            return all(play_status(node.url, new)[0] == 200 for _ in range(20))
        until(reloaded_everywhere, 15, "a process kept the old key")
        assert len(processes_answering(new, 200)) == 2
        assert len(processes_answering(old, 401)) == 2


def test_the_processes_share_one_budget_of_failed_authentications(tmp_path):
    """The kernel spreads a guesser's connections over both processes and each counts its own
    refusals: each allows half of AUTH_FAILURE_LIMIT, so the node refuses about that many guesses
    in all before every process answers 429, not twice as many."""
    with running_node(tmp_path, HTTP_WORKERS="2", PLAYBACK_AUTH="token", AUTH_FAILURE_LIMIT="4",
                      AUTH_LOCKOUT="60", MAX_CONNECTIONS_PER_ADDRESS="0") as node:
        until(lambda: worker_answers(node.url), 20, "no worker answers")
        refused_by: dict[str, int] = {}
        statuses = []
        for guess in range(40):  # each on a new connection
            status, process = play_status(node.url, f"guess-{guess}")
            statuses.append(status)
            if status == 401:
                refused_by[process] = refused_by.get(process, 0) + 1
        assert set(statuses) == {401, 429}
        assert sorted(refused_by.values()) == [2, 2], refused_by  # 4 in all, 2 per process
        assert statuses[-8:] == [429] * 8  # both locked out
