"""``livedge publish`` is a WHIP client: a real CLI process publishes a lavfi source to a real node."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import aiohttp
import pytest

from edge.tokens import Scope, issue_token
from tests.nodes import TEST_SECRET, node_environment, running_node
from tests.test_e2e_node import decode, get, wait_for_segments

pytestmark = pytest.mark.timeout(120)

SOURCE = "testsrc2=size=320x180:rate=30[out0];sine=frequency=440:sample_rate=48000[out1]"


@pytest.mark.parametrize("codec", ["H264", "VP8"])
async def test_livedge_publish_sends_a_source_over_whip(tmp_path, codec):
    token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "cli", 300, "cli")
    with running_node(tmp_path, WEBRTC_HOSTS="127.0.0.1", PUBLISH_GRACE="1") as node:
        publisher = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "publish", SOURCE, "--format", "lavfi",
             "--stream", "cli", "--url", node.url, "--token", token, "--video-codec", codec,
             "--ice-host", "127.0.0.1"],
            env=node_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            async with aiohttp.ClientSession() as session:
                base = f"{node.url}/hls/cli"
                playlist = await wait_for_segments(session, f"{base}/180p/index.m3u8", 2, 45)
                msn = playlist.split("seg")[-1].split(".m4s")[0]
                _, init = await get(session, f"{base}/180p/init.mp4")
                _, segment = await get(session, f"{base}/180p/seg{msn}.m4s")
                frames = decode(init, segment)
                assert (frames[0].width, frames[0].height) == (320, 180)
                assert (await get(session, f"{base}/audio/index.m3u8"))[0] == 200
        finally:
            publisher.send_signal(signal.SIGINT)
            output = publisher.communicate(timeout=20)[0].decode(errors="replace")
        async with aiohttp.ClientSession() as session:
            # The client DELETEd its session: after the grace period the playlists end.
            for _ in range(60):
                text = (await get(session, f"{node.url}/hls/cli/180p/index.m3u8"))[1].decode()
                if "#EXT-X-ENDLIST" in text:
                    break
                await asyncio.sleep(0.25)
            assert "#EXT-X-ENDLIST" in text, output


async def test_livedge_publish_reports_a_refusal(tmp_path):
    with running_node(tmp_path) as node:
        result = subprocess.run(
            [sys.executable, "-m", "edge.cli", "publish", SOURCE, "--format", "lavfi",
             "--stream", "cli", "--url", node.url, "--token", "garbage", "--ice-host", "127.0.0.1"],
            env=node_environment(), capture_output=True, timeout=60)
    assert result.returncode == 1
    assert b"401" in result.stderr
