"""A fleet of real edge processes on 127.0.0.1: gossip, peer fill, one upstream fetch per object."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import time

import aiohttp
import pytest

from bench.ports import free_port
from edge.tokens import Scope, issue_token
from tests.nodes import TEST_SECRET, running_node
from tests.test_e2e_node import decode, get, wait_for_segments
from tests.test_fastlane import newest_part

pytestmark = pytest.mark.timeout(180)
ADMIN = {"Authorization": "Bearer " + issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 86400,
                                                  "ops")}


@contextlib.contextmanager
def fleet(tmp_path, count: int, first_args=("--demo",), with_origin: bool = False, key=None,
          **env):
    """``count`` edges (edge-0 gets ``first_args``), plus the origin last when ``with_origin``."""
    key = key or base64.b64encode(os.urandom(32)).decode()
    total = count + (1 if with_origin else 0)
    gossip_ports = [free_port() for _ in range(total)]
    http_ports = [free_port() for _ in range(total)]
    with contextlib.ExitStack() as stack:
        nodes = []
        for i in range(total):
            is_origin = i == count
            name = "origin" if is_origin else f"edge-{i}"
            (tmp_path / name).mkdir(exist_ok=True)
            node_env = dict(NODE_NAME=name, GOSSIP_BIND=f"127.0.0.1:{gossip_ports[i]}",
                            SEEDS=f"127.0.0.1:{gossip_ports[0]}", GOSSIP_KEYS=key,
                            ADVERTISE_URL=f"http://127.0.0.1:{http_ports[i]}", **env)
            args = first_args if i == 0 else ()
            nodes.append(stack.enter_context(
                running_node(tmp_path / name, *args, port=http_ports[i],
                             command="origin" if is_origin else "serve", **node_env)))
        yield nodes


async def cluster(session, node) -> dict:
    async with session.get(f"{node.url}/api/cluster", headers=ADMIN) as response:
        assert response.status == 200
        return await response.json()


async def upstream_fetches(session, nodes) -> int:
    return sum([(await cluster(session, node))["upstream_fetches"] for node in nodes])


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_viewers_on_any_edge_play_a_stream_ingested_on_another(tmp_path):
    with fleet(tmp_path, 3) as nodes:
        async with aiohttp.ClientSession() as session:
            async def converged():
                views = [await cluster(session, node) for node in nodes]
                return all(len(v["members"]) == 3 and v["streams"].get("demo") == "edge-0"
                           for v in views)
            await until(converged, 20, "the fleet did not converge")
            for node in nodes[1:]:
                base = f"{node.url}/hls/demo"
                status, body = await get(session, f"{base}/index.m3u8")
                assert status == 200, body
                playlist = await wait_for_segments(session, f"{base}/360p/index.m3u8", 2)
                msn = re.findall(r"^seg(\d+)\.m4s$", playlist, re.M)[-1]
                _, init = await get(session, f"{base}/360p/init.mp4")
                status, segment = await get(session, f"{base}/360p/seg{msn}.m4s")
                assert status == 200
                frames = decode(init, segment)
                assert frames and (frames[0].width, frames[0].height) == (640, 360)
                # A blocking reload on a non-ingesting edge is answered when the part exists (or
                # the next segment's first, when the segment ended before it).
                hint = re.search(r'PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"', playlist)
                started = time.monotonic()
                status, body = await get(
                    session, f"{base}/360p/index.m3u8?_HLS_msn={hint[1]}&_HLS_part={hint[2]}")
                assert status == 200
                assert newest_part(body) >= (int(hint[1]), int(hint[2])), body.decode()
                assert time.monotonic() - started < 2.0

            # Many viewers on edges 1 and 2 asking for the same objects: each object crosses to
            # the ingesting edge about once (the owner fetches, the other edge asks the owner).
            fetched_before = await upstream_fetches(session, nodes)
            served_before = (await cluster(session, nodes[0]))["served_to_peers"]
            playlist = await wait_for_segments(session, f"{nodes[1].url}/hls/demo/180p/index.m3u8",
                                               3)
            names = re.findall(r"^(seg\d+\.m4s)$", playlist, re.M)[-2:]
            urls = [f"{node.url}/hls/demo/180p/{name}" for node in nodes[1:] for name in names]
            answers = await asyncio.gather(*(get(session, url) for url in urls * 10))
            assert all(status == 200 for status, _ in answers)
            served = (await cluster(session, nodes[0]))["served_to_peers"] - served_before
            assert served <= len(names)  # not once per viewer, not once per edge
            fetched = await upstream_fetches(session, nodes) - fetched_before
            assert fetched <= 2 * len(names)


async def test_a_killed_edge_is_noticed_and_its_peers_keep_serving(tmp_path):
    with fleet(tmp_path, 3, first_args=()) as nodes:
        async with aiohttp.ClientSession() as session:
            async def converged():
                return all([len((await cluster(session, n))["members"]) == 3 for n in nodes])
            await until(converged, 20, "the fleet did not converge")
            nodes[2].process.kill()  # kill -9: no leave message
            killed_at = time.monotonic()

            async def noticed():
                return all([len((await cluster(session, n))["members"]) == 2 for n in nodes[:2]])
            await until(noticed, 15, "the dead edge was not noticed")
            assert time.monotonic() - killed_at < 8.0
            for node in nodes[:2]:
                assert (await get(session, f"{node.url}/healthz"))[0] == 200


async def test_the_peer_api_refuses_outsiders(tmp_path):
    with fleet(tmp_path, 1) as nodes:
        async with aiohttp.ClientSession() as session:
            for path in ("/fleet/streams", "/fleet/streams/demo/history",
                         "/fleet/objects/demo/360p/init.mp4"):
                status, _ = await get(session, nodes[0].url + path)
                assert status == 401
                async with session.get(nodes[0].url + path,
                                       headers={"X-Livedge-Fleet": "forged"}) as response:
                    assert response.status == 401


async def test_the_origin_directs_and_shields_but_never_ingests_or_owns(tmp_path):
    from edge.fleet import FLEET_HEADER, FleetCredential, fleet_secret
    from edge.membership import decode_key
    key = base64.b64encode(os.urandom(32)).decode()
    with fleet(tmp_path, 2, with_origin=True, key=key) as nodes:
        origin = nodes[-1]
        async with aiohttp.ClientSession() as session:
            async def converged():
                view = await cluster(session, origin)
                return len(view["members"]) == 3 and view["streams"].get("demo") == "edge-0"
            await until(converged, 20, "the origin did not learn the fleet")
            view = await cluster(session, origin)
            assert [m["name"] for m in view["members"] if m.get("origin")] == ["origin"]
            # Nothing is published on the origin.
            status, _ = await get(session, f"{origin.url}/whip/x")
            assert status in (404, 405)
            # Its shield answers edges (with the fleet credential) from the ingesting edge.
            credential = FleetCredential(fleet_secret((decode_key(key),)), "edge-1").token()
            await wait_for_segments(session, f"{nodes[0].url}/hls/demo/360p/index.m3u8", 1)
            async with session.get(f"{origin.url}/fleet/objects/demo/360p/init.mp4",
                                   headers={FLEET_HEADER: credential}) as response:
                assert response.status == 200
                assert (await response.read())[4:8] == b"ftyp"


async def test_a_followed_event_log_is_one_answer_with_a_line_per_batch_of_events(tmp_path):
    from edge.fleet import FLEET_HEADER, FleetCredential, fleet_secret
    from edge.membership import decode_key
    from edge.peer_api import EVENT_LINES_TYPE, decode_events_document
    from origin.packager import PartReady
    key = base64.b64encode(os.urandom(32)).decode()
    with fleet(tmp_path, 1, key=key) as nodes:
        credential = FleetCredential(fleet_secret((decode_key(key),)), "edge-1").token()
        headers = {FLEET_HEADER: credential}
        async with aiohttp.ClientSession() as session:
            await wait_for_segments(session, f"{nodes[0].url}/hls/demo/360p/index.m3u8", 1)
            base = f"{nodes[0].url}/fleet/streams"
            async with session.get(f"{base}/nope/events?follow=1", headers=headers) as response:
                assert response.status == 404
            async with session.get(f"{base}/demo/events?after=0&wait=0.5&follow=1",
                                   headers=headers) as response:
                assert response.status == 200
                assert response.content_type == EVENT_LINES_TYPE
                positions, parts = [], 0
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    line = await asyncio.wait_for(response.content.readline(), 2)
                    last, events = decode_events_document(json.loads(line))
                    positions.append(int(last))
                    parts += sum(isinstance(event, PartReady) for event in events)
                # The first line holds the log so far, later ones what came since.
                assert positions == sorted(positions) and positions[-1] > positions[0]
                assert len(positions) > 3 and parts > 3


async def test_a_node_shutting_down_ends_the_logs_its_peers_follow(tmp_path):
    """aiohttp's shutdown waits for answers in flight: a followed log must end with the node."""
    from edge.fleet import FLEET_HEADER, FleetCredential, fleet_secret
    from edge.membership import decode_key
    key = base64.b64encode(os.urandom(32)).decode()
    with fleet(tmp_path, 1, key=key, DRAIN_SECONDS="1") as nodes:
        credential = FleetCredential(fleet_secret((decode_key(key),)), "edge-1").token()
        async with aiohttp.ClientSession() as session:
            await wait_for_segments(session, f"{nodes[0].url}/hls/demo/360p/index.m3u8", 1)
            async with session.get(f"{nodes[0].url}/fleet/streams/demo/events?wait=5&follow=1",
                                   headers={FLEET_HEADER: credential}) as response:
                assert response.status == 200
                await response.content.readline()
                stopping = time.monotonic()
                nodes[0].process.send_signal(signal.SIGTERM)
                with contextlib.suppress(aiohttp.ClientError):
                    while await asyncio.wait_for(response.content.readline(), 15):
                        pass
                ended = time.monotonic() - stopping
        assert await asyncio.to_thread(nodes[0].process.wait, 20) == 0
        exited = time.monotonic() - stopping
        assert ended < 8 and exited < 12, (ended, exited)
