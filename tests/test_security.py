"""Attacks on real nodes: forged and misused JWTs, oversized credentials, cross-stream playback, and
the fleet's peer API from outside.

The token node trusts only public keys (an RSA PEM and a JWKS holding one P-256 key with a ``kid``),
checks ``aud`` and ``iss``, and needs play tokens for playback; it runs the demo stream and pulls a
second stream, so a token for one can be tried on the other's playlists, parts and segments.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import av
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bench.ports import free_port
from edge.errors import Unauthorized
from edge.fleet import FLEET_HEADER, FleetCredential, fleet_secret
from edge.tokens import Scope, TokenSettings, TokenVerifier, issue_token
from tests.test_fastlane import Http
from tests.nodes import TEST_SECRET, RunningNode, running_node

pytestmark = [pytest.mark.timeout(180),
              # Forgeries below use short HMAC keys on purpose.
              pytest.mark.filterwarnings("ignore:The HMAC key is")]

AUDIENCE = "livedge-test"
ISSUER = "https://issuer.test"
# The limits have tests of their own (test_limits.py); here hundreds of refusals come from one address.
NO_LIMITS = dict(AUTH_FAILURE_LIMIT="1000000", PUBLISH_RATE="100000", PUBLISH_BURST="100000",
                 MAX_REQUESTS_PER_ADDRESS="0")

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def public_jwk(key, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig"}


JWKS = {"keys": [public_jwk(EC_KEY, "k2")]}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any],
          sign: Callable[[bytes], bytes] = lambda _: b"") -> str:
    """A token with exactly this header and payload, signed by ``sign(signing input)``."""
    signing_input = (b64url(json.dumps(header).encode()) + "." +
                     b64url(json.dumps(payload).encode())).encode()
    return signing_input.decode() + "." + b64url(sign(signing_input))


def hs256_with(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda signing_input: hmac.new(secret, signing_input, hashlib.sha256).digest()


def rs256_with(key) -> Callable[[bytes], bytes]:
    return lambda signing_input: key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())


def claims(scope: str | list | dict | None = "admin", stream: Any = "*", **changes: Any) -> dict:
    """A valid payload for the token node; ``changes`` set claims, ``None`` removes one."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "tester", "iat": now, "exp": now + 600, "aud": AUDIENCE,
                               "iss": ISSUER, "scope": scope, "stream": stream}
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not None}


def rs256(payload: dict, key=RSA_KEY, **headers: Any) -> str:
    return jwt.encode(payload, private_pem(key), algorithm="RS256", headers=headers or None)


def es256(payload: dict, key=EC_KEY, kid: str | None = "k2", **headers: Any) -> str:
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload, private_pem(key), algorithm="ES256", headers=headers or None)


def play_token(stream: str) -> str:
    return rs256(claims("play", stream))


@pytest.fixture(scope="module")
def small_media(tmp_path_factory) -> Path:
    """6 s of 320x180 H.264 and AAC: the second stream's source (the pull loops over it)."""
    path = tmp_path_factory.mktemp("media") / "cam-a.mp4"
    with av.open("testsrc2=size=320x180:rate=30[out0];sine=frequency=330:sample_rate=48000[out1]",
                 format="lavfi") as source, av.open(str(path), "w") as target:
        video = target.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        audio = target.add_stream("aac", rate=48_000)
        finished = set()
        for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
            stream = video if isinstance(frame, av.VideoFrame) else audio
            if frame.time >= 6:
                finished.add(stream.type)
                if len(finished) == 2:
                    break
                continue
            target.mux(stream.encode(frame))
        target.mux(video.encode(None))
        target.mux(audio.encode(None))
    return path


@pytest.fixture(scope="module")
def token_node(tmp_path_factory, small_media) -> RunningNode:
    directory = tmp_path_factory.mktemp("token-node")
    (directory / "public.pem").write_bytes(public_pem(RSA_KEY))
    (directory / "jwks.json").write_text(json.dumps(JWKS))
    with running_node(directory, "--demo", JWT_SECRET="",
                      JWT_PUBLIC_KEY=str(directory / "public.pem"),
                      JWKS_FILE=str(directory / "jwks.json"), JWT_AUDIENCE=AUDIENCE,
                      JWT_ISSUER=ISSUER, PLAYBACK_AUTH="token",
                      PULL_STREAMS=f"cam-a=file:{small_media}", **NO_LIMITS) as node:
        yield node
        assert "unhandled error" not in node.log()


async def fetch(url: str, headers: dict[str, str] | None = None,
                method: str = "GET", data: bytes | None = None) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers or {}, data=data) as response:
            return response.status, await response.read(), response.content_type


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- forged and misused tokens against the admin API ------------------------------------------------

NOW = time.time
ATTACKS: list[tuple[str, Callable[[], str], int]] = [
    # Controls: what the node does accept, so that each refusal below is the attack's doing.
    ("rs256 admin", lambda: rs256(claims()), 200),
    ("es256 admin, kid of the jwks key", lambda: es256(claims()), 200),
    ("aud list holding ours", lambda: rs256(claims(aud=["other", AUDIENCE])), 200),
    # alg: none in its spellings, with and without a signature part.
    ("alg none", lambda: forge({"alg": "none", "typ": "JWT"}, claims()), 401),
    ("alg None", lambda: forge({"alg": "None"}, claims()), 401),
    ("alg NONE", lambda: forge({"alg": "NONE"}, claims()), 401),
    ("alg none, signed", lambda: forge({"alg": "none"}, claims(), hs256_with(b"x")), 401),
    ("alg none, two parts", lambda: forge({"alg": "none"}, claims()).rsplit(".", 1)[0], 401),
    ("alg missing", lambda: forge({"typ": "JWT"}, claims()), 401),
    # HS/RS confusion: HMAC keyed with what the node trusts publicly.
    ("hs256 keyed with the rsa public pem",
     lambda: forge({"alg": "HS256"}, claims(), hs256_with(public_pem(RSA_KEY))), 401),
    ("hs256 keyed with the rsa public der",
     lambda: forge({"alg": "HS256"}, claims(), hs256_with(RSA_KEY.public_key().public_bytes(
         serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))), 401),
    ("hs256 keyed with the jwks document",
     lambda: forge({"alg": "HS256"}, claims(), hs256_with(json.dumps(JWKS).encode())), 401),
    ("hs256, kid k2, keyed with the ec public pem",
     lambda: forge({"alg": "HS256", "kid": "k2"}, claims(), hs256_with(public_pem(EC_KEY))), 401),
    ("hs512 keyed with the rsa public pem",
     lambda: forge({"alg": "HS512"}, claims(), hs256_with(public_pem(RSA_KEY))), 401),
    # Other keys, other algorithms.
    ("rs256 by an attacker's key", lambda: rs256(claims(), key=ATTACKER_RSA), 401),
    ("es256 by an attacker's key, kid k2", lambda: es256(claims(), key=ATTACKER_EC), 401),
    ("rs256 by our key, kid naming the ec key", lambda: rs256(claims(), kid="k2"), 401),
    ("ps256 by our key", lambda: jwt.encode(claims(), private_pem(RSA_KEY), algorithm="PS256"), 401),
    # kid injection: a kid is a dictionary key, never a path, query or URL.
    ("kid path traversal", lambda: rs256(claims(), kid="../../../../../../dev/null"), 401),
    ("kid sql", lambda: rs256(claims(), kid="' OR '1'='1"), 401),
    ("kid url", lambda: rs256(claims(), kid="http://127.0.0.1:1/jwks.json"), 401),
    ("kid with nul", lambda: rs256(claims(), kid="k2\x00"), 401),
    ("kid of 3000 characters", lambda: rs256(claims(), kid="k" * 3000), 401),
    ("kid a number",
     lambda: forge({"alg": "RS256", "kid": 2}, claims(), rs256_with(RSA_KEY)), 401),
    ("kid a list",
     lambda: forge({"alg": "RS256", "kid": ["k2"]}, claims(), rs256_with(RSA_KEY)), 401),
    ("kid an object",
     lambda: forge({"alg": "RS256", "kid": {"$ne": ""}}, claims(), rs256_with(RSA_KEY)), 401),
    ("embedded jwk of the attacker",
     lambda: es256(claims(), key=ATTACKER_EC, kid=None,
                   jwk=public_jwk(ATTACKER_EC, "evil")), 401),
    ("jku and x5u pointing home",
     lambda: rs256(claims(), key=ATTACKER_RSA, jku="http://127.0.0.1:1/jwks",
                   x5u="http://127.0.0.1:1/cert"), 401),
    # Time.
    ("expired", lambda: rs256(claims(exp=int(NOW()) - 60)), 401),
    ("not yet valid", lambda: rs256(claims(nbf=int(NOW()) + 60)), 401),
    ("issued in the future", lambda: rs256(claims(iat=int(NOW()) + 60)), 401),
    ("no exp", lambda: rs256(claims(exp=None)), 401),
    ("exp a string", lambda: rs256(claims(exp="tomorrow")), 401),
    # Audience and issuer.
    ("wrong aud", lambda: rs256(claims(aud="someone-else")), 401),
    ("no aud", lambda: rs256(claims(aud=None)), 401),
    ("aud list without ours", lambda: rs256(claims(aud=["a", "b"])), 401),
    ("wrong iss", lambda: rs256(claims(iss="https://evil.test")), 401),
    ("no iss", lambda: rs256(claims(iss=None)), 401),
    # Scope escalation: valid tokens that do not grant admin.
    ("play token", lambda: rs256(claims("play")), 403),
    ("publish token", lambda: rs256(claims("publish")), 403),
    ("play and publish", lambda: rs256(claims("play publish")), 403),
    ("scope ADMIN", lambda: rs256(claims("ADMIN")), 403),
    ("scope 'admin,'", lambda: rs256(claims("admin,")), 403),
    ("admin in a scopes claim", lambda: rs256(claims(None, scopes="admin")), 403),
    ("role admin", lambda: rs256(claims("play", role="admin", admin=True)), 403),
    ("scope an object", lambda: rs256(claims({"admin": True})), 401),
    # Not a token.
    ("garbage", lambda: "not-a-token", 401),
    ("three empty parts", lambda: "..", 401),
    ("8183 bytes (the most a header carries)", lambda: "a" * 8183, 401),
]


@pytest.mark.parametrize("token_of, status", [pytest.param(make, status, id=name)
                                              for name, make, status in ATTACKS])
async def test_forged_and_misused_tokens_get_nothing(token_node, token_of, status):
    got, body, content_type = await fetch(f"{token_node.url}/api/streams", bearer(token_of()))
    assert got == status, body
    assert content_type == "application/json"
    if status != 200:
        assert set(json.loads(body)) == {"message"}
    else:
        assert {stream["name"] for stream in json.loads(body)["streams"]} >= {"demo", "cam-a"}


async def test_tokens_over_aiohttps_header_limit_get_400_and_the_node_lives(token_node):
    """aiohttp refuses a header value over 8190 bytes before any handler, so a token over the
    verifier's own 8 KiB limit never reaches it over HTTP (the verifier's 401 is checked below)."""
    for size in (8200, 9000, 70_000):
        got, _, _ = await fetch(f"{token_node.url}/api/streams", bearer("a" * size))
        assert got == 400, size
    got, _, _ = await fetch(f"{token_node.url}/healthz", {"X-Filler": "f" * 70_000})
    assert got == 400
    got, _, _ = await fetch(f"{token_node.url}/hls/demo/index.m3u8?token=" + "a" * 70_000)
    assert got == 400
    got, _, _ = await fetch(f"{token_node.url}/healthz", {f"X-H{n}": "v" for n in range(200)})
    assert got == 400  # aiohttp's max_headers (128)
    assert (await fetch(f"{token_node.url}/healthz"))[0] == 200
    assert token_node.process.poll() is None


def test_the_verifier_refuses_tokens_over_8_kib_before_parsing():
    verifier = TokenVerifier(TokenSettings(secret=TEST_SECRET))
    valid = issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 600, "x" * 8000)
    assert len(valid) > 8192
    with pytest.raises(Unauthorized, match="too large"):
        verifier.verify(valid, Scope.ADMIN, None)


# -- scope and stream on publishing and playback -------------------------------------------------------

async def test_publishing_needs_a_publish_token_for_that_stream(token_node):
    url = f"{token_node.url}/whip/cam-z"
    sdp = {"Content-Type": "application/sdp"}
    cases = [
        (rs256(claims("play")), 403),
        (rs256(claims("publish", "cam-y")), 403),
        (rs256(claims("publish", "cam-z", aud="other")), 401),
        (rs256(claims("publish", "cam-z")), 400),  # allowed: the offer is what is wrong
        (rs256(claims("admin", None)), 400),  # admin implies publish on every stream
    ]
    for token, status in cases:
        got, body, _ = await fetch(url, {**bearer(token), **sdp}, "POST", b"v=0\r\n")
        assert got == status, (token, body)
    # The WebSocket ingest checks the same way before the upgrade.
    for token, status in ((rs256(claims("play")), 403), (rs256(claims("publish", "cam-y")), 403)):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{token_node.ws_url}/ingest/cam-z?token={token}", proxy=None,
                               open_timeout=5):
                pass
        assert refused.value.response.status_code == status


async def test_playback_and_admin_scopes_do_not_mix(token_node):
    publish = rs256(claims("publish", "demo"))
    play = play_token("*")
    assert (await fetch(f"{token_node.url}/hls/demo/index.m3u8?token={publish}"))[0] == 403
    assert (await fetch(f"{token_node.url}/api/reload", bearer(play), "POST"))[0] == 403
    assert (await fetch(f"{token_node.url}/api/streams/demo", bearer(play), "DELETE"))[0] == 403
    assert (await fetch(f"{token_node.url}/api/streams/demo", bearer(publish), "DELETE"))[0] == 403
    assert (await fetch(f"{token_node.url}/hls/demo/index.m3u8?token={play}"))[0] == 200


@pytest.mark.parametrize("pattern, status", [
    ("demo", 200), ("d*", 200), ("*", 200),
    ("cam-a", 403), ("demo?", 403), ("DEMO", 403), ("dem", 403), ("demo/..", 403), ("demo ", 403),
    ("[!d]*", 403),
])
async def test_a_play_token_covers_only_its_streams(token_node, pattern, status):
    got, _, _ = await fetch(f"{token_node.url}/hls/demo/index.m3u8?token={play_token(pattern)}")
    assert got == status


async def test_a_viewer_of_one_stream_cannot_read_another(token_node):
    """A's token on B's playlists, init segments, parts and segments is 403; B's token gets them."""
    token_a, token_b = play_token("cam-a"), play_token("demo")
    base = f"{token_node.url}/hls"
    assert (await fetch(f"{base}/cam-a/index.m3u8?token={token_a}"))[0] == 200
    deadline = time.monotonic() + 30
    while True:
        status, body, _ = await fetch(f"{base}/demo/360p/index.m3u8?token={token_b}")
        text = body.decode()
        if status == 200 and re.search(r"^seg\d+\.m4s", text, re.M):
            break
        assert time.monotonic() < deadline, "the demo stream made no segment"
    segment = re.findall(r"^(seg\d+\.m4s)", text, re.M)[-1]
    part = re.findall(r'#EXT-X-PART:.*URI="(part[\d.]+\.m4s)', text)[-1]
    objects = ["index.m3u8", "360p/index.m3u8", "audio/index.m3u8", "360p/init.mp4",
               "audio/init.mp4", f"360p/{part}", f"360p/{segment}"]
    for name in objects:
        got, body, _ = await fetch(f"{base}/demo/{name}?token={token_b}")
        assert got == 200, name
        got, body, content_type = await fetch(f"{base}/demo/{name}?token={token_a}")
        assert got == 403 and content_type == "application/json", name
        assert b"mp4" not in body and b"#EXT" not in body
    # The token rides in the query; a header is not read for playback, so it grants nothing.
    assert (await fetch(f"{base}/demo/360p/{segment}", bearer(token_b)))[0] == 401
    # A's own objects: its token works there.
    status, body, _ = await fetch(f"{base}/cam-a/180p/index.m3u8?token={token_a}")
    assert status == 200 and b"#EXTM3U" in body


def test_a_players_repeated_reloads_stop_when_its_token_expires(token_node):
    # A player's reloads on one connection are matched against the first (edge/fastlane.py), not
    # parsed again: the token in them must still be checked each time.
    hint = re.compile(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s\?token=')
    expires = int(time.time()) + 1
    token = rs256(claims("play", "demo", exp=expires))
    playlist = f"/hls/demo/360p/index.m3u8?token={token}"
    http = Http(token_node.url)
    try:
        status, _, body = http.get(playlist)
        assert status == 200
        msn, part = (int(v) for v in hint.search(body.decode()).groups())
        first = http.get(f"{playlist}&_HLS_msn={msn}&_HLS_part={part}")
        time.sleep(max(0.0, expires + TokenSettings.leeway_seconds + 1.0 - time.time()))
        msn, part = (int(v) for v in hint.search(first[2].decode()).groups())
        expired = http.get(f"{playlist}&_HLS_msn={msn}&_HLS_part={part}")
    finally:
        http.close()
    assert first[0] == 200 and first[1]["server"] == "livedge"
    assert expired[0] == 401 and b"#EXT" not in expired[2]


def test_a_players_repeated_part_requests_stop_when_its_token_expires(token_node):
    # A player's part requests on one connection are matched against the first, not parsed again
    # (edge/fastlane.py): the token in them must still be checked each time.
    part = re.compile(r'URI="(part\d+\.\d+\.m4s)\?token=')
    expires = int(time.time()) + 1
    token = rs256(claims("play", "demo", exp=expires))
    http = Http(token_node.url)
    try:
        names: list[str] = []
        while len(names) < 2:  # a stream just started lists no part yet
            status, _, body = http.get(f"/hls/demo/360p/index.m3u8?token={token}")
            assert status == 200
            names = part.findall(body.decode())
            time.sleep(0.0 if len(names) >= 2 else 0.2)
        first = http.get(f"/hls/demo/360p/{names[-1]}?token={token}")
        time.sleep(max(0.0, expires + TokenSettings.leeway_seconds + 1.0 - time.time()))
        expired = http.get(f"/hls/demo/360p/{names[-2]}?token={token}")
    finally:
        http.close()
    assert first[0] == 200 and first[1]["server"] == "livedge" and b"moof" in first[2][:64]
    assert expired[0] == 401 and b"moof" not in expired[2]


# -- the fleet's peer API -------------------------------------------------------------------------------

GOSSIP_KEY = os.urandom(32)


@pytest.fixture(scope="module")
def fleet_node(tmp_path_factory) -> RunningNode:
    with running_node(tmp_path_factory.mktemp("fleet-node"), NODE_NAME="sec-edge",
                      GOSSIP_KEYS=base64.b64encode(GOSSIP_KEY).decode(),
                      GOSSIP_BIND=f"127.0.0.1:{free_port()}", **NO_LIMITS) as node:
        yield node
        assert "unhandled error" not in node.log()


PEER_PATHS = ["/fleet/streams", "/fleet/streams/demo/history", "/fleet/streams/demo/events",
              "/fleet/objects/demo/360p/init.mp4"]
SECRET = fleet_secret((GOSSIP_KEY,))


def fleet_jwt(secret: bytes, **changes: Any) -> str:
    payload = {"sub": "intruder", "aud": "livedge-fleet", "exp": int(time.time()) + 60, **changes}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


FORGED_CREDENTIALS: list[tuple[str, Callable[[], str | None]]] = [
    ("none", lambda: None),
    ("empty", lambda: ""),
    ("garbage", lambda: "x" * 40),
    ("signed with another secret", lambda: fleet_jwt(os.urandom(32))),
    ("signed with the raw gossip key", lambda: fleet_jwt(GOSSIP_KEY)),
    ("signed with the node's JWT secret", lambda: fleet_jwt(TEST_SECRET.encode())),
    ("an admin token of the node", lambda: issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 60,
                                                       "ops")),
    ("alg none", lambda: forge({"alg": "none"}, {"sub": "x", "aud": "livedge-fleet",
                                                 "exp": int(time.time()) + 60})),
    ("right secret, wrong audience", lambda: fleet_jwt(SECRET, aud="livedge")),
    ("right secret, no audience", lambda: fleet_jwt(SECRET, aud=None)),
    ("right secret, expired", lambda: fleet_jwt(SECRET, exp=int(time.time()) - 60)),
    ("right secret, no expiry", lambda: fleet_jwt(SECRET, exp=None)),
    ("right secret, a worker's audience", lambda: fleet_jwt(SECRET, aud="livedge-worker")),
    ("right secret, hs512", lambda: jwt.encode({"aud": "livedge-fleet",
                                                "exp": int(time.time()) + 60}, SECRET,
                                               algorithm="HS512")),
]


@pytest.mark.parametrize("credential_of", [pytest.param(make, id=name)
                                           for name, make in FORGED_CREDENTIALS])
async def test_the_peer_api_refuses_outsiders(fleet_node, credential_of):
    credential = credential_of()
    headers = {FLEET_HEADER: credential} if credential is not None else {}
    for path in PEER_PATHS:
        status, body, content_type = await fetch(f"{fleet_node.url}{path}", headers)
        assert status == 401, (path, body)
        assert content_type == "application/json" and "credential" in json.loads(body)["message"]


async def test_the_peer_api_answers_a_fleet_member(fleet_node):
    credential = FleetCredential(SECRET, "edge-1").token()
    status, body, _ = await fetch(f"{fleet_node.url}/fleet/streams", {FLEET_HEADER: credential})
    assert status == 200 and json.loads(body)["node"] == "sec-edge"
    # Past the credential, names are still validated.
    status, _, _ = await fetch(f"{fleet_node.url}/fleet/objects/..%2F..%2Fetc/360p/passwd",
                               {FLEET_HEADER: credential})
    assert status == 400
    status, _, _ = await fetch(f"{fleet_node.url}/api/cluster")  # the operator view needs admin
    assert status == 401


# -- the audience every token must name -------------------------------------------------------

async def test_a_node_without_jwt_audience_still_wants_tokens_for_livedge(fleet_node):
    """The right secret is not enough: a token signed with it for another service (a secret shared
    with an identity provider), or for no service, is refused by a node with default settings."""
    minted = subprocess.run([sys.executable, "-m", "edge.cli", "token", "--scope", "admin",
                             "--stream", "*", "--ttl", "60"], capture_output=True, text=True,
                            check=True, env={**os.environ, "JWT_SECRET": TEST_SECRET}).stdout
    assert jwt.decode(minted.strip(), options={"verify_signature": False})["aud"] == "livedge"
    assert (await fetch(f"{fleet_node.url}/api/streams", bearer(minted.strip())))[0] == 200
    now = int(time.time())
    for audience, reason in [(None, "lacks the aud claim"), ("grafana", "audience not accepted"),
                             (["grafana", "vault"], "audience not accepted")]:
        payload = {"scope": "admin", "stream": "*", "sub": "ops", "exp": now + 60, "aud": audience}
        token = jwt.encode({k: v for k, v in payload.items() if v is not None}, TEST_SECRET,
                           algorithm="HS256")
        status, body, _ = await fetch(f"{fleet_node.url}/api/streams", bearer(token))
        assert status == 401 and reason in json.loads(body)["message"], (audience, body)


# -- /metrics names every stream -------------------------------------------------------------------

async def test_metrics_auth_admin_keeps_the_metrics_to_admin_tokens(tmp_path):
    admin = issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 60, "prometheus")
    play = issue_token(TEST_SECRET, "HS256", Scope.PLAY, "*", 60, "viewer")
    with running_node(tmp_path, "--demo", METRICS_AUTH="admin", PLAYBACK_AUTH="token",
                      **NO_LIMITS) as node:
        status, body, content_type = await fetch(f"{node.url}/metrics")
        assert status == 401 and content_type == "application/json"
        assert b"demo" not in body
        assert (await fetch(f"{node.url}/metrics", bearer(play)))[0] == 403
        status, body, _ = await fetch(f"{node.url}/metrics", bearer(admin))
        assert status == 200 and b"livedge_streams_live" in body
        assert (await fetch(f"{node.url}/healthz"))[0] == 200  # probes stay open
