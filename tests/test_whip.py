"""WHIP end to end: real nodes (``livedge serve``), real WebRTC publishers (aiortc in this process, and
FFmpeg's whip muxer through PyAV), LL-HLS fetched and decoded; every error answer checked."""

from __future__ import annotations

import asyncio
import datetime
import errno
import json
import re
import time
from pathlib import Path

import aiohttp
import av
import av.logging
import jwt
import numpy as np
import pytest
from aiortc import RTCSessionDescription
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.config import load_settings
from edge.tokens import DEFAULT_AUDIENCE, Scope, issue_token
from edge.whip import HANDSHAKE_TIMEOUT_ENV, WhipRoutes, ice_server_link
from ingest.webrtc import (ACCEPTED_CODECS, IceServer, WebRtcSettings, answer_candidates,
                           negotiated_codecs)
from tests.nodes import TEST_SECRET, RunningNode, running_node
from tests.test_e2e_node import decode, get, wait_for_segments
from tests.test_webrtc import _offer, _section, AV1, PCMU, VP9, open_client, wait_until

pytestmark = pytest.mark.timeout(120)

HANDSHAKE_TIMEOUT = 2  # seconds, for the test nodes (LIVEDGE_WHIP_HANDSHAKE_TIMEOUT)
GRACE = 1  # seconds, PUBLISH_GRACE of the test nodes


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("whip"), WEBRTC_HOSTS="127.0.0.1",
                      PUBLISH_GRACE=str(GRACE),
                      LIVEDGE_WHIP_HANDSHAKE_TIMEOUT=str(HANDSHAKE_TIMEOUT)) as running:
        yield running


@pytest.fixture(scope="module")
def full_node(tmp_path_factory):
    """A node whose one publisher slot is taken by a pull that never connects, with STUN and TURN
    servers configured (never contacted: every POST here is refused before gathering)."""
    with running_node(tmp_path_factory.mktemp("whip-full"), WEBRTC_HOSTS="127.0.0.1",
                      MAX_PUBLISHERS="1", PULL_STREAMS="idle=file:/nonexistent/idle.mp4",
                      ICE_SERVERS="stun:stun.example.com:3478,"
                                  "turn:turn.example.com:3478?transport=udp") as running:
        yield running


def publish_token(stream: str | None, scope: Scope = Scope.PUBLISH, ttl: float = 86400) -> str:
    return issue_token(TEST_SECRET, "HS256", scope, stream, ttl, "tester")


async def post_offer(http: aiohttp.ClientSession, node: RunningNode, stream: str, offer: str | bytes,
                     token: str | None = "", content_type: str = "application/sdp"):
    """POST an offer; returns (status, headers, body text)."""
    token = publish_token(stream) if token == "" else token
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(f"{node.url}/whip/{stream}", data=offer, headers=headers) as response:
        return response.status, response.headers, await response.text()


async def delete_session(http: aiohttp.ClientSession, node: RunningNode, location: str,
                         stream: str) -> int:
    headers = {"Authorization": f"Bearer {publish_token(stream)}"}
    async with http.delete(node.url + location, headers=headers) as response:
        return response.status


async def session_status(http: aiohttp.ClientSession, node: RunningNode, location: str) -> int:
    async with http.get(node.url + location) as response:
        return response.status


async def renditions(http: aiohttp.ClientSession, node: RunningNode, stream: str) -> list[str]:
    status, body = await get(http, f"{node.url}/hls/{stream}/index.m3u8")
    assert status == 200
    text = body.decode()
    return re.findall(r"^(\w+)/index\.m3u8$", text, re.M) + re.findall(r'URI="(\w+)/index', text)


async def wait_for_endlist(http: aiohttp.ClientSession, playlist_url: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status, body = await get(http, playlist_url)
        if status == 200 and "#EXT-X-ENDLIST" in body.decode():
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"no EXT-X-ENDLIST at {playlist_url} within {timeout} s")


async def check_renditions_play(http: aiohttp.ClientSession, node: RunningNode, stream: str) -> None:
    """Every rendition of the stream: its init segment and latest full segment decode."""
    base = f"{node.url}/hls/{stream}"
    await wait_for_segments(http, f"{base}/audio/index.m3u8", 2, timeout=30)
    names = await renditions(http, node, stream)
    assert sorted(names) == ["180p", "audio"]  # a 320x180 source: the 360p rung is not made
    for name in names:
        playlist = await wait_for_segments(http, f"{base}/{name}/index.m3u8", 2, timeout=30)
        msn = re.findall(r"^seg(\d+)\.m4s$", playlist, re.M)[-1]
        _, init = await get(http, f"{base}/{name}/init.mp4")
        status, segment = await get(http, f"{base}/{name}/seg{msn}.m4s")
        assert status == 200, name
        frames = decode(init, segment)
        if name == "audio":
            assert frames and frames[0].sample_rate == 48_000
            assert len(frames[0].layout.channels) == 2
            assert len(frames) >= 30  # about a second of 1024-sample AAC frames
        else:
            assert (frames[0].width, frames[0].height) == (320, 180)
            assert frames[0].key_frame
            assert len(frames) >= 20
            first, last = (frame.to_ndarray(format="gray").astype(int)
                           for frame in (frames[0], frames[-1]))
            assert np.abs(first - last).mean() > 5  # a moving picture, not a frozen one


# -- publishing with aiortc -----------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["H264", "VP8"])
async def test_aiortc_publish_plays_over_ll_hls_and_delete_ends_it(node, codec):
    stream = f"cam-{codec.lower()}"
    client = await open_client(codec, audio=True)
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, answer = await post_offer(http, node, stream,
                                                       client.localDescription.sdp)
            assert status == 201, answer
            assert headers["Content-Type"] == "application/sdp"
            location = headers["Location"]
            assert re.fullmatch(rf"/whip/{stream}/[A-Za-z0-9_-]+", location)
            assert re.fullmatch(r'"[A-Za-z0-9_-]+"', headers["ETag"])  # a strong entity-tag
            assert headers["Access-Control-Expose-Headers"].count("Location")
            assert negotiated_codecs(answer) == {"audio": "opus", "video": codec}
            assert {address for address, _, _ in answer_candidates(answer)} == {"127.0.0.1"}
            assert "a=setup:active" in answer  # aiortc offered actpass; we take the client role
            await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

            await check_renditions_play(http, node, stream)
            assert await session_status(http, node, location) == 204
            # RTCP publisher statistics reach the operator API and the metrics.
            admin = {"Authorization": "Bearer " + publish_token("*", Scope.ADMIN)}
            async with http.get(f"{node.url}/api/streams", headers=admin) as response:
                listed = {s["name"]: s for s in (await response.json())["streams"]}
            publisher = listed[stream]["publisher"]
            assert publisher["bytes_received"] > 0
            assert {track["kind"] for track in publisher["tracks"]} == {"audio", "video"}
            _, metrics = await get(http, f"{node.url}/metrics")
            assert f'livedge_publisher_bitrate_bits_per_second{{stream="{stream}"}}' \
                in metrics.decode()

            assert await delete_session(http, node, location, stream) == 200
            assert await session_status(http, node, location) == 404
            assert await delete_session(http, node, location, stream) == 404
            waited = await wait_for_endlist(http, f"{node.url}/hls/{stream}/180p/index.m3u8",
                                            GRACE + 10)
            assert waited >= GRACE - 0.5  # the grace period ran first
            await wait_until(lambda: client.connectionState in ("closed", "failed"), 15,
                             "the publisher to notice the end")
    finally:
        await client.close()


async def test_audio_only_publish_makes_an_audio_rendition(node):
    stream = "radio"
    client = await open_client(None, audio=True)
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, answer = await post_offer(http, node, stream,
                                                       client.localDescription.sdp)
            assert status == 201, answer
            await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            playlist = await wait_for_segments(http, f"{node.url}/hls/{stream}/audio/index.m3u8",
                                               2, timeout=30)
            msn = re.findall(r"^seg(\d+)\.m4s$", playlist, re.M)[-1]
            _, init = await get(http, f"{node.url}/hls/{stream}/audio/init.mp4")
            _, segment = await get(http, f"{node.url}/hls/{stream}/audio/seg{msn}.m4s")
            assert len(decode(init, segment)) >= 30
            assert await delete_session(http, node, headers["Location"], stream) == 200
    finally:
        await client.close()


async def test_a_second_publisher_gets_409_until_the_first_is_deleted(node):
    stream = "busy"
    first, second = await open_client("VP8"), await open_client("VP8")
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, _ = await post_offer(http, node, stream, first.localDescription.sdp)
            assert status == 201
            status, _, body = await post_offer(http, node, stream, second.localDescription.sdp)
            assert status == 409 and "already being published" in body
            assert await delete_session(http, node, headers["Location"], stream) == 200
            status, headers, _ = await post_offer(http, node, stream, second.localDescription.sdp)
            assert status == 201
            assert await delete_session(http, node, headers["Location"], stream) == 200
    finally:
        await first.close()
        await second.close()


async def test_a_takeover_token_evicts_the_live_publisher(node):
    stream = "handover"
    first, second = await open_client("VP8"), await open_client("VP8")
    takeover = jwt.encode({"scope": "publish", "stream": stream, "sub": "tester",
                           "aud": DEFAULT_AUDIENCE,
                           "exp": int(time.time()) + 60, "takeover": True}, TEST_SECRET, "HS256")
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, answer = await post_offer(http, node, stream,
                                                       first.localDescription.sdp)
            assert status == 201
            first_location = headers["Location"]
            await first.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_for_segments(http, f"{node.url}/hls/{stream}/180p/index.m3u8", 1, timeout=30)
            status, headers, _ = await post_offer(http, node, stream,
                                                  second.localDescription.sdp, token=takeover)
            assert status == 201
            assert await session_status(http, node, first_location) == 404
            assert await session_status(http, node, headers["Location"]) == 204
            await wait_until(lambda: first.connectionState in ("closed", "failed"), 15,
                             "the evicted publisher to be disconnected")
            assert await delete_session(http, node, headers["Location"], stream) == 200
    finally:
        await first.close()
        await second.close()


async def test_a_publisher_that_never_completes_ice_is_reaped(node):
    stream = "silent"
    client = await open_client("VP8")  # the answer is never applied: no ICE checks, no DTLS
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, _ = await post_offer(http, node, stream, client.localDescription.sdp)
            assert status == 201
            started = time.monotonic()
            while await session_status(http, node, headers["Location"]) == 204:
                assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 5, "not reaped"
                await asyncio.sleep(0.2)
            assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.5
            # The publication was ended too: the stream takes a new publisher.
            retry = await open_client("VP8")
            try:
                status, headers, _ = await post_offer(http, node, stream,
                                                      retry.localDescription.sdp)
                assert status == 201
                assert await delete_session(http, node, headers["Location"], stream) == 200
            finally:
                await retry.close()
        assert "ICE/DTLS did not complete within 2 s" in node.log()
    finally:
        await client.close()


# -- errors ---------------------------------------------------------------------------------------------

UNSUPPORTED = _offer(_section("audio", [PCMU]), _section("video", [VP9, AV1]))


@pytest.mark.parametrize("offer, content_type, status, message", [
    ("hello, not sdp", "application/sdp", 400, "not an SDP offer"),
    ("v=0\r\nm=video\r\n", "application/sdp", 400, "cannot be parsed"),
    (_offer(), "application/sdp", 400, "no audio or video section"),
    (UNSUPPORTED, "application/sdp", 400, ACCEPTED_CODECS),
    (b"v=0\r\n\xff\xfe", "application/sdp", 400, "not UTF-8"),
    ("v=0\r\n" + "a=x:" + "y" * 70_000 + "\r\n", "application/sdp", 413, "larger than 65536"),
    ("v=0\r\n", "application/json", 415, "Content-Type: application/sdp"),
    ("v=0\r\n", "text/plain", 415, "Content-Type: application/sdp"),
])
async def test_bad_offers_get_json_errors(node, offer, content_type, status, message):
    async with aiohttp.ClientSession() as http:
        got, headers, body = await post_offer(http, node, "errors", offer,
                                              content_type=content_type)
        assert got == status, body
        assert message in _json_message(body)
        assert headers["Access-Control-Allow-Origin"] == "*"
        # Nothing was left behind: the stream is not live.
        status, _ = await get(http, f"{node.url}/hls/errors/index.m3u8")
        assert status == 404


async def test_a_huge_chunked_offer_is_cut_off_at_the_limit(node):
    async def chunks():
        yield b"v=0\r\n"
        for _ in range(40):
            yield b"a=x:" + b"y" * 4096 + b"\r\n"

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{node.url}/whip/errors", data=chunks(),
                             headers={"Content-Type": "application/sdp",
                                      "Authorization": f"Bearer {publish_token('errors')}"}) as response:
            assert response.status == 413


@pytest.mark.parametrize("token, status", [
    (None, 401),
    ("not-a-jwt", 401),
    (issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "errors", -60, "tester"), 401),  # expired
    # Issued at collection time: long-lived, so the suite's run time cannot expire them.
    (issue_token("another-secret-" + "y" * 32, "HS256", Scope.PUBLISH, "errors", 86400, "x"), 401),
    (issue_token(TEST_SECRET, "HS256", Scope.PLAY, "errors", 86400, "tester"), 403),
    (issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "someone-else", 86400, "tester"), 403),
])
async def test_bad_tokens_are_refused_before_the_offer_is_read(node, token, status):
    async with aiohttp.ClientSession() as http:
        got, _, body = await post_offer(http, node, "errors", UNSUPPORTED, token=token)
        assert got == status, body
        assert _json_message(body)


async def test_session_resources_need_a_token_and_refuse_patch(node):
    stream = "patchy"
    client = await open_client("VP8")
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, _ = await post_offer(http, node, stream, client.localDescription.sdp)
            assert status == 201
            location = headers["Location"]
            async with http.delete(node.url + location) as response:
                assert response.status == 401
            other = publish_token("someone-else")
            async with http.delete(node.url + location,
                                   headers={"Authorization": f"Bearer {other}"}) as response:
                assert response.status == 403
            # RFC 9725: no trickle ICE and no ICE restart -> the resource does not allow PATCH.
            async with http.patch(node.url + location, data="a=end-of-candidates\r\n",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                           "If-Match": headers["ETag"]}) as response:
                assert response.status == 405
                assert "PATCH" not in response.headers["Allow"]
                assert "DELETE" in response.headers["Allow"]
            async with http.options(node.url + location) as response:
                assert response.status == 200 and "DELETE" in response.headers["Allow"]
            async with http.get(f"{node.url}/whip/{stream}/no-such-session") as response:
                assert response.status == 404
            assert await delete_session(http, node, location, stream) == 200
    finally:
        await client.close()


async def test_options_and_publisher_limit(full_node):
    async with aiohttp.ClientSession() as http:
        # A WHIP client's OPTIONS: CORS, Accept-Post and the ICE servers (RFC 9725 4.6).
        async with http.options(f"{full_node.url}/whip/cam") as response:
            assert response.status == 200
            assert response.headers["Accept-Post"] == "application/sdp"
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers.getall("Link") == [
                '<stun:stun.example.com:3478>; rel="ice-server"',
                '<turn:turn.example.com:3478?transport=udp>; rel="ice-server"']
        # A browser's CORS preflight: no ICE servers (RFC 9725 4.6 SHOULD NOT).
        async with http.options(f"{full_node.url}/whip/cam", headers={
                "Origin": "https://studio.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}) as response:
            assert response.status == 200
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
            assert "Link" not in response.headers
        async with http.get(f"{full_node.url}/whip/cam") as response:
            assert response.status == 204

        client = await open_client("VP8")
        try:
            offer = client.localDescription.sdp
            status, _, body = await post_offer(http, full_node, "cam", offer)
            assert status == 503 and "limit" in body
            status, _, body = await post_offer(http, full_node, "idle", offer)
            assert status == 409 and "pulled" in body
        finally:
            await client.close()


def _json_message(body: str) -> str:
    return json.loads(body)["message"]


def test_ice_server_links_carry_quoted_credentials():
    assert ice_server_link(IceServer("stun:stun.example.net")) == \
        '<stun:stun.example.net>; rel="ice-server"'
    assert ice_server_link(IceServer("turns:turn.example.net?transport=tcp", "user", 'p"w\\')) == (
        '<turns:turn.example.net?transport=tcp>; rel="ice-server"; username="user"; '
        'credential="p\\"w\\\\"; credential-type="password"')


@pytest.mark.parametrize("environ, timeout", [({}, 15.0), ({HANDSHAKE_TIMEOUT_ENV: "2.5"}, 2.5)])
def test_handshake_timeout_comes_from_the_environment(environ, timeout):
    settings = load_settings({"WEBRTC_HOSTS": "127.0.0.1", "ICE_SERVERS": "stun:s.example:3478"})
    routes = WhipRoutes.from_settings(settings, publishing=None, authorize=None, environ=environ)
    assert routes._webrtc == WebRtcSettings(hosts=("127.0.0.1",),
                                            ice_servers=(IceServer("stun:s.example:3478"),),
                                            handshake_timeout=timeout)


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_handshake_timeout_is_refused(value):
    with pytest.raises(ValueError, match=HANDSHAKE_TIMEOUT_ENV):
        WhipRoutes.from_settings(load_settings({}), publishing=None, authorize=None,
                                 environ={HANDSHAKE_TIMEOUT_ENV: value})


# -- publishing with FFmpeg's whip muxer (PyAV) ----------------------------------------------------------

@pytest.fixture(scope="module")
def p256_certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and key (PEM files) for FFmpeg's DTLS."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ffmpeg-whip")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("dtls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def ffmpeg_publish(url: str, token: str, seconds: float, certificate: tuple[Path, Path] | None):
    """Publish ``seconds`` of a 320x180 test picture (libx264 baseline) and a tone (libopus) with
    FFmpeg's whip muxer, in real time. Blocking: run it in a thread."""
    options = {"authorization": token}
    if certificate:
        options.update(cert_file=str(certificate[0]), key_file=str(certificate[1]))
    graph = "testsrc2=size=320x180:rate=30[out0];sine=frequency=440:sample_rate=48000[out1]"
    with av.open(graph, format="lavfi") as source:
        output = av.open(url, "w", format="whip", options=options)
        try:
            video = output.add_stream("libx264", rate=30, options={
                "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline"})
            video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
            audio = output.add_stream("libopus", rate=48_000)
            audio.layout = "stereo"
            started = time.monotonic()
            for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
                if frame.time >= seconds:
                    break
                stream = video if isinstance(frame, av.VideoFrame) else audio
                for packet in stream.encode(frame):
                    output.mux(packet)
                ahead = frame.time - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            output.close()


async def test_ffmpeg_whip_muxer_publishes_with_a_p256_certificate(node, p256_certificate):
    assert "whip" in av.formats_available
    stream = "ffmpeg"
    url = f"{node.url}/whip/{stream}"
    publishing = asyncio.create_task(asyncio.to_thread(
        ffmpeg_publish, url, publish_token(stream), 6.0, p256_certificate))
    try:
        async with aiohttp.ClientSession() as http:
            await check_renditions_play(http, node, stream)
            await publishing  # the muxer's close sends DELETE to the Location
            await wait_for_endlist(http, f"{node.url}/hls/{stream}/180p/index.m3u8", GRACE + 10)
    finally:
        await asyncio.gather(publishing, return_exceptions=True)
    assert "the publisher deleted the session" in node.log()


async def test_ffmpeg_whip_muxer_own_p224_certificate_fails_dtls(node):
    """Known failure, stamped: FFmpeg linked with GnuTLS (as in PyAV's wheels) self-signs a P-224
    certificate, which OpenSSL under aiortc rejects (illegal_parameter alert). The publisher sees
    "DTLS session failed"; the node ends the session and the stream stays free."""
    stream = "ffmpeg-p224"
    previous_level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # PyAV forwards FFmpeg's log only when asked to
    try:
        with av.logging.Capture(local=False) as logs, \
                pytest.raises(av.error.OSError) as raised:
            await asyncio.to_thread(ffmpeg_publish, f"{node.url}/whip/{stream}",
                                    publish_token(stream), 2.0, None)
    finally:
        av.logging.set_level(previous_level)
    assert raised.value.errno == errno.EIO
    assert ("WHIP muxer", "DTLS session failed") in [(name, text.strip())
                                                     for _, name, text in logs]
    await wait_until(lambda: "DTLS handshake failed" in node.log(), 10, "the node's diagnosis")
    client = await open_client("VP8")
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while True:
                status, headers, _ = await post_offer(http, node, stream,
                                                      client.localDescription.sdp)
                if status == 201 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert status == 201
            assert await delete_session(http, node, headers["Location"], stream) == 200
    finally:
        await client.close()
