"""Hostile input, generated: property tests (hypothesis) of the parsers that read what clients send,
in process and against a real ``--demo`` node.

Every property runs a fixed number of examples from a derandomized generator with no example
database, so a run is repeatable and CI sees the same inputs each time. A failure prints the
smallest input hypothesis shrank it to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

from edge.errors import BadRequest, Forbidden, Unauthorized
from edge.names import validate_rendition_name, validate_stream_name
from edge.tokens import Claims, Scope, TokenSettings, TokenVerifier, issue_token
from ingest.container import (PROBE_HEAD_BYTES, ContainerFormat, UnsupportedMedia,
                              probe_container)
from ingest.webrtc import OfferRejected, OfferSummary, inspect_offer
from tests.nodes import TEST_SECRET, RunningNode, running_node
from tests.test_webrtc import FFMPEG_OFFER

pytestmark = pytest.mark.timeout(240)

# Derandomized (the same examples every run) and no database (nothing read or written between runs).
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# -- SDP offers ---------------------------------------------------------------------------------------

# What a browser sends: BUNDLE, audio and video, candidates, several codecs per section.
BROWSER_OFFER = "\r\n".join([
    "v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
    "a=extmap-allow-mixed", "a=msid-semantic: WMS stream",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host generation 0",
    "a=ice-ufrag:Zx3d", "a=ice-pwd:8b1d0c5f6a7e9d2c4b3a1f0e", "a=ice-options:trickle",
    "a=fingerprint:sha-256 " + ":".join(["A1"] * 32), "a=setup:actpass", "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "a=sendonly", "a=msid:stream a",
    "a=rtcp-mux", "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1", "a=rtpmap:0 PCMU/8000", "a=ssrc:1001 cname:x",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:Zx3d", "a=ice-pwd:8b1d0c5f6a7e9d2c4b3a1f0e", "a=ice-options:trickle",
    "a=fingerprint:sha-256 " + ":".join(["A1"] * 32), "a=setup:actpass", "a=mid:1",
    "a=sendonly", "a=msid:stream v", "a=rtcp-mux", "a=rtcp-rsize", "a=rtpmap:96 VP8/90000",
    "a=rtcp-fb:96 nack", "a=rtcp-fb:96 nack pli", "a=rtpmap:97 rtx/90000", "a=fmtp:97 apt=96",
    "a=rtpmap:102 H264/90000",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
    "a=rtpmap:103 rtx/90000", "a=fmtp:103 apt=102", "a=ssrc-group:FID 2001 2002",
    "a=ssrc:2001 cname:x", "a=ssrc:2002 cname:x", ""])
SEED_OFFERS = (FFMPEG_OFFER, BROWSER_OFFER)
assert all(isinstance(inspect_offer(offer), OfferSummary) for offer in SEED_OFFERS)

_small_text = st.text(st.characters(codec="utf-8"), max_size=24)
_number_text = st.one_of(st.integers(-10, 2**70).map(str), st.sampled_from(
    ["", "-1", "0", "65536", "4294967296", "1e9", "0x10", "NaN", "+5", " 7", "١٢"]))
_sdp_lines = st.one_of(
    st.builds("a=rtpmap:{} {}/{}".format, _number_text, st.sampled_from(
        ["opus", "H264", "VP8", "VP9", "AV1", "rtx", "red", "PCMU", "", "opus/48000"]), _number_text),
    st.builds("a=fmtp:{} {}".format, _number_text, _small_text),
    st.builds("a=fmtp:{} packetization-mode={};profile-level-id={}".format, _number_text,
              _number_text, st.text("0123456789abcdefxyz", max_size=8)),
    st.builds("m={} {} {} {}".format, st.sampled_from(["audio", "video", "application", "", "x"]),
              _number_text, st.sampled_from(["UDP/TLS/RTP/SAVPF", "RTP/AVP", "UDP/DTLS/SCTP", ""]),
              st.lists(_number_text, max_size=4).map(" ".join)),
    st.builds("a=candidate:{} {} {} {} {} {} typ {}".format, _number_text, _number_text,
              st.sampled_from(["udp", "tcp", "UDP", ""]), _number_text, _small_text, _number_text,
              st.sampled_from(["host", "srflx", "relay", "prflx", "", "x"])),
    st.builds("a=setup:{}".format, st.sampled_from(["actpass", "active", "passive", "holdconn",
                                                    "", "x"])),
    st.builds("a=fingerprint:{} {}".format, st.sampled_from(["sha-256", "sha-1", "md5", ""]),
              _small_text),
    st.builds("a=ssrc:{} {}".format, _number_text, _small_text),
    st.builds("a=ssrc-group:{} {}".format, _small_text, _small_text),
    st.builds("a=extmap:{} {}".format, _number_text, _small_text),
    st.builds("a=rtcp-fb:{} {}".format, _number_text, _small_text),
    st.builds("a=ice-{}:{}".format, st.sampled_from(["ufrag", "pwd", "options", "lite"]),
              _small_text),
    st.builds("c=IN {} {}".format, st.sampled_from(["IP4", "IP6", ""]), _small_text),
    st.builds("a=rtcp:{} IN IP4 {}".format, _number_text, _small_text),
    st.builds("a={}".format, st.sampled_from(["sendonly", "recvonly", "sendrecv", "inactive",
                                              "rtcp-mux", "rtcp-rsize", "mid:", "msid:",
                                              "group:BUNDLE", "group:BUNDLE 0 1 2"])),
    _small_text,
)


@st.composite
def mutated_offers(draw) -> str:
    """A seed offer with lines deleted, duplicated, replaced, inserted, swapped or cut short."""
    lines = draw(st.sampled_from(SEED_OFFERS)).split("\r\n")
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["delete", "duplicate", "replace", "insert", "swap",
                                          "truncate"]))
        index = draw(st.integers(0, max(0, len(lines) - 1)))
        if operation == "delete" and lines:
            del lines[index]
        elif operation == "duplicate" and lines:
            lines.insert(index, lines[index])
        elif operation == "replace" and lines:
            lines[index] = draw(_sdp_lines)
        elif operation == "insert":
            lines.insert(index, draw(_sdp_lines))
        elif operation == "swap" and lines:
            other = draw(st.integers(0, len(lines) - 1))
            lines[index], lines[other] = lines[other], lines[index]
        elif operation == "truncate" and lines:
            lines[index] = lines[index][:draw(st.integers(0, len(lines[index])))]
    return draw(st.sampled_from(["\r\n", "\n", "\r", " "])).join(lines)


offer_texts = st.one_of(
    mutated_offers(),
    st.text(max_size=400),
    st.text(max_size=400).map(lambda text: "v=0\r\n" + text),
    st.lists(_sdp_lines, max_size=30).map(lambda lines: "v=0\r\n" + "\r\n".join(lines)),
)


@settings(FUZZ, max_examples=500)
@given(offer_texts)
@example("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 H264/90000\r\n")
@example("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF x\r\n")
def test_inspect_offer_accepts_or_rejects_with_a_reason(text):
    try:
        summary = inspect_offer(text)
    except OfferRejected as error:
        assert str(error)  # a message for the publisher
        return
    assert set(summary.kinds) <= {"audio", "video"} and len(set(summary.kinds)) == len(summary.kinds)
    assert len(summary.codecs) == len(summary.kinds) and all(summary.codecs)
    assert summary.setup in ("actpass", "active", "passive")
    assert summary.candidates >= 0


# -- container probing -------------------------------------------------------------------------------

_container_heads = st.one_of(
    st.binary(max_size=2 * PROBE_HEAD_BYTES),
    st.binary(max_size=8).map(lambda tail: b"\x1a\x45\xdf\xa3"[:len(tail) % 5] + tail),
    st.tuples(st.integers(0, 4), st.binary(max_size=200)).map(  # MPEG-TS, sync bytes kept or not
        lambda parts: b"".join(b"\x47" + parts[1][:187].ljust(187, b"\0")
                               for _ in range(parts[0]))),
    st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(
        [b"ftyp", b"moof", b"moov", b"styp", b"free", b"mdat", b"FTYP", b"\0\0\0\0"]),
        st.binary(max_size=64)).map(lambda box: box[0].to_bytes(4, "big") + box[1] + box[2]),
)


@settings(FUZZ, max_examples=500)
@given(_container_heads)
def test_probe_container_names_a_format_asks_for_more_or_refuses(head):
    try:
        found = probe_container(head)
    except UnsupportedMedia as error:
        assert str(error)
        return
    assert found is None or isinstance(found, ContainerFormat)
    if len(head) >= PROBE_HEAD_BYTES:
        assert found is not None, "more bytes asked for than PROBE_HEAD_BYTES"


# -- JWT parsing -------------------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.text(max_size=20), st.integers(-2**70, 2**70),
                          st.sampled_from([10**400, -10**400, 2**63, 1e308, -1.5]))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
_CLAIM_NAMES = ["exp", "nbf", "iat", "aud", "iss", "scope", "stream", "sub", "takeover"]
_HEADER_NAMES = ["alg", "kid", "typ", "crit", "jku", "x5u", "jwk", "b64", "cty"]


def _claim_values(name: str) -> st.SearchStrategy:
    plausible = {
        # An offset drawn, the clock added after: the strategy itself must not change with time.
        "exp": st.integers(-100, 10**6).map(lambda offset: int(time.time()) + offset),
        "scope": st.sampled_from(["admin", "play", "publish", "play publish", ["admin"], "ADMIN"]),
        "stream": st.sampled_from(["*", "demo", "cam-*", "[!a]*", "", "**"]),
        "alg": st.sampled_from(["HS256", "RS256", "ES256", "EdDSA", "none", "HS512", "", "hs256"]),
        "kid": st.sampled_from(["k2", "../../etc/passwd", "", "k2\x00"]),
    }.get(name)
    return st.one_of(plausible, _json_values) if plausible is not None else _json_values


@st.composite
def json_objects(draw, names: list[str]) -> dict:
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    document = {name: draw(_claim_values(name)) for name in chosen}
    document.update(draw(st.dictionaries(st.text(max_size=6), _json_values, max_size=3)))
    return document


@st.composite
def tokens(draw) -> str:
    """Anything from raw text to well-formed tokens whose claims are odd; some are signed with the
    verifier's secret, so that the claims are read and not just the signature checked."""
    kind = draw(st.sampled_from(["text", "parts", "structured", "signed"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "parts":
        return ".".join(draw(st.lists(st.one_of(
            st.text(string.ascii_letters + string.digits + "-_=", max_size=60),
            st.binary(max_size=40).map(_b64url)), min_size=1, max_size=5)))
    header = draw(json_objects(_HEADER_NAMES))
    payload = draw(st.one_of(json_objects(_CLAIM_NAMES), _json_values))
    if kind == "signed":
        header["alg"] = "HS256"
    encoded = (_b64url(json.dumps(header).encode()) + "." +
               _b64url(json.dumps(payload).encode()))
    signature = hmac.new(TEST_SECRET.encode(), encoded.encode(), hashlib.sha256).digest() \
        if kind == "signed" else draw(st.binary(max_size=64))
    return encoded + "." + _b64url(signature)


VERIFIERS = {
    "secret": TokenVerifier(TokenSettings(secret=TEST_SECRET)),
    "secret, aud and iss": TokenVerifier(TokenSettings(secret=TEST_SECRET, audience="a",
                                                       issuer="i")),
}


@settings(FUZZ, max_examples=500)
@given(tokens(), st.sampled_from(list(Scope)), st.one_of(st.none(), st.text(max_size=20)),
       st.sampled_from(list(VERIFIERS)))
@example(issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 600, "x") + "x", Scope.ADMIN, None,
         "secret")
def test_token_verification_grants_or_refuses_with_401_or_403(token, scope, stream, verifier):
    try:
        claims = VERIFIERS[verifier].verify(token, scope, stream)
    except (Unauthorized, Forbidden) as error:
        assert error.message
        return
    assert isinstance(claims, Claims) and claims.allows(scope, stream)


@pytest.mark.parametrize("exp", [10**400, -10**400, 2**1024], ids=["1e400", "-1e400", "2^1024"])
def test_a_signed_token_with_an_absurd_expiry_is_refused(exp):
    """Found by the property above: a number JSON allows but no float holds."""
    token = _b64url(b'{"alg":"HS256"}') + "." + _b64url(json.dumps(
        {"exp": exp, "scope": "admin"}).encode())
    token += "." + _b64url(hmac.new(TEST_SECRET.encode(), token.encode(), hashlib.sha256).digest())
    with pytest.raises(Unauthorized):
        VERIFIERS["secret"].verify(token, Scope.ADMIN, None)


# -- a real node ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory) -> RunningNode:
    # Limits off: thousands of requests come from one address here (test_limits.py covers them).
    with running_node(tmp_path_factory.mktemp("fuzz"), "--demo", WEBRTC_HOSTS="127.0.0.1",
                      DRAIN_SECONDS="1",
                      PUBLISH_RATE="100000", PUBLISH_BURST="100000",
                      AUTH_FAILURE_LIMIT="1000000", MAX_REQUESTS_PER_ADDRESS="0") as running:
        yield running


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names lowercased
    body: bytes

    @property
    def refused_by_parser(self) -> bool:
        """aiohttp's HTTP parser answered (a malformed or oversized request line or header) before
        any handler: a plain-text 400, where every answer of the node's own is JSON."""
        return self.status == 400 and self.headers.get("content-type", "").startswith("text/plain")

    def json_message(self) -> str:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)["message"]


def http(node: RunningNode, method: str, target: bytes, headers: dict[str, str] | None = None,
         body: bytes | None = None, chunked: bool = False, timeout: float = 15) -> Reply:
    """One request on its own connection, bytes exactly as given (no client-side normalization of
    the target), read until the server closes."""
    host, port = node.url.removeprefix("http://").split(":")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode(),
             b"Connection: close"]
    lines += [f"{name}: {value}".encode() for name, value in (headers or {}).items()]
    if body is not None and chunked:
        lines.append(b"Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece)
                        for piece in (body[i:i + 4096] for i in range(0, len(body), 4096))) \
            + b"0\r\n\r\n"
    elif body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        try:
            connection.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the body was read: the answer is still there
        data = bytearray()
        while chunk := connection.recv(65536):
            data += chunk
    head, _, content = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    reply_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        reply_headers[name.strip().lower()] = value.strip()
    if reply_headers.get("transfer-encoding") == "chunked":
        content = _unchunk(content)
    return Reply(int(status_line.split()[1]), reply_headers, content)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


PUBLISH = {"Authorization": "Bearer " + issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "*",
                                                    86400, "fuzz")}
ADMIN = {"Authorization": "Bearer " + issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 86400,
                                                  "fuzz")}
MAX_OFFER_BYTES = 64 * 1024

_content_types = st.one_of(
    st.just("application/sdp"), st.just("application/sdp"), st.just("application/sdp"),
    st.sampled_from(["application/sdp; charset=utf-8", "APPLICATION/SDP", "text/plain",
                     "application/json", "multipart/form-data; boundary=x", "", "application/sdp;;",
                     "application/sdp\tx"]),
    st.text(string.printable.strip() + " ", max_size=40))
_offer_bodies = st.one_of(
    offer_texts.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=2000),
    st.binary(max_size=200).map(lambda tail: b"v=0\r\n" + tail),
    st.integers(MAX_OFFER_BYTES - 10, MAX_OFFER_BYTES + 5000).map(  # around the size limit
        lambda size: (b"v=0\r\n" + b"a=x:" + b"y" * size)[:size]),
)


def _acceptable_offer(body: bytes) -> bool:
    try:
        return isinstance(inspect_offer(body.decode("utf-8")), OfferSummary)
    except (UnicodeDecodeError, OfferRejected):
        return False


@settings(FUZZ, max_examples=300)
@given(_offer_bodies, _content_types, st.booleans())
def test_whip_answers_fuzzed_offers_with_400_413_or_415(node, body, content_type, chunked):
    # An offer we can answer starts a real publish (test_whip.py covers that path); whatever the
    # Content-Type says (aiohttp reads "application/sdp; charset=utf-8" as SDP too), skip those.
    assume(not _acceptable_offer(body))
    headers = {**PUBLISH, **({"Content-Type": content_type} if content_type else {})}
    reply = http(node, "POST", b"/whip/fuzz", headers, body, chunked=chunked)
    note(f"{reply.status} {reply.body[:200]!r}")
    assert reply.status in (400, 413, 415)
    if content_type == "application/sdp":
        assert reply.status == (413 if len(body) > MAX_OFFER_BYTES else 400)
    assert reply.json_message()


# -- _HLS_ query parameters -----------------------------------------------------------------------------

_hls_values = st.one_of(
    st.integers(0, 40).map(str),  # around the live edge of a young stream
    st.integers().map(str),
    st.integers(2**53 - 2, 2**64).map(str),
    st.sampled_from(["", "YES", "v2", "NO", "yes", "-0", "+1", "1.0", "1e3", "0x1", " 1", "١", "²",
                     "9" * 17, "0" * 30 + "1", "true"]),
    st.text(max_size=30),
)
_hls_names = st.one_of(st.sampled_from(["_HLS_msn", "_HLS_part", "_HLS_skip", "token"]),
                       st.text(max_size=10))


@st.composite
def hls_queries(draw) -> bytes:
    pairs = draw(st.lists(st.tuples(_hls_names, _hls_values), max_size=4))
    if draw(st.booleans()):  # percent-encoded, as a player sends it
        return "&".join(f"{quote(name, safe='')}={quote(value, safe='')}"
                        for name, value in pairs).encode()
    # Raw bytes as a hostile client may: only what would end the request line is escaped.
    raw = "&".join(f"{name}={value}" for name, value in pairs).encode("utf-8", "surrogatepass")
    return re.sub(rb"[\x00-\x20\x7f#]", lambda m: b"%%%02X" % m.group()[0], raw)


_HLS_TARGETS = [b"/hls/demo/360p/index.m3u8", b"/hls/demo/audio/index.m3u8",
                b"/hls/demo/index.m3u8", b"/hls/demo/180p/index.m3u8"]


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(_HLS_TARGETS), hls_queries())
def test_hls_query_parameters_never_cause_a_server_error(node, target, query):
    started = time.monotonic()
    reply = http(node, "GET", target + b"?" + query)
    note(f"{reply.status} after {time.monotonic() - started:.2f} s: {reply.body[:200]!r}")
    assert reply.status in (200, 400, 404, 503)
    if reply.status == 200:
        assert reply.body.startswith(b"#EXTM3U\n")
        assert reply.headers["content-type"].startswith("application/vnd.apple.mpegurl")
    elif not reply.refused_by_parser:  # e.g. raw non-ASCII bytes in the query
        assert reply.json_message()


# -- stream names on every route family --------------------------------------------------------------

_TRAVERSALS = ["..", ".", "../", "..%2f", "%2e%2e", "%2e%2e%2f", "..\\", "%00", "\x00", "/", "//",
               "....//", "%252e%252e", "..;/", "~", "etc/passwd", "%c0%ae%c0%ae", "\u2025",
               "\uff0e\uff0e", "app.py", "..%5c", "%ff", "\r\n", "?x=", "#", " ", "%", "demo"]
stream_names = st.one_of(
    st.text(max_size=80),
    st.lists(st.one_of(st.sampled_from(_TRAVERSALS),
                       st.text(string.ascii_letters + string.digits + "_.-", max_size=10)),
             max_size=8).map("".join),
    st.integers(60, 70).map(lambda size: "a" * size),  # around the 64-character limit
    st.integers(1000, 12_000).map(lambda size: "n" * size),  # past aiohttp's 8190-byte line
    st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,40}", fullmatch=True),
)
LIVE = {"demo"}
# Bytes that, if ever served, would mean a name reached outside what it may address.
OUTSIDE = [b"root:x:0:", b"[build-system]", b"def build_app", b"TEST_SECRET", b"BEGIN PRIVATE KEY"]


def _valid(check, name: str) -> bool:
    try:
        check(name)
        return True
    except BadRequest:
        return False


def _encodings(name: str) -> list[tuple[str, bytes]]:
    """The name as one percent-encoded path segment, and raw (only line breakers escaped)."""
    encoded = quote(name, safe="", errors="surrogatepass").encode()
    raw = re.sub(rb"[\x00-\x20\x7f#?]", lambda m: b"%%%02X" % m.group()[0],
                 name.encode("utf-8", "surrogatepass"))
    return [("encoded", encoded), ("raw", raw)]


@settings(FUZZ, max_examples=300)
@given(stream_names)
def test_stream_names_never_cause_a_server_error_or_escape(node, name):
    valid = _valid(validate_stream_name, name)
    valid_rendition = _valid(validate_rendition_name, name)
    assume(name not in LIVE)  # DELETE /api/streams/{name} must not stop the demo
    for how, segment in _encodings(name):
        routes = [
            # (method, target, headers, body, statuses when the name is valid)
            ("GET", b"/hls/%s/index.m3u8" % segment, {}, None, {404}),
            ("GET", b"/hls/%s/360p/index.m3u8" % segment, {}, None, {404}),
            ("GET", b"/hls/demo/%s/index.m3u8" % segment, {}, None, None),
            ("GET", b"/hls/demo/360p/%s" % segment, {}, None, None),
            ("POST", b"/whip/%s" % segment, {**PUBLISH, "Content-Type": "text/plain"}, b"v=0",
             {415}),
            ("GET", b"/whip/%s" % segment, {}, None, {204}),
            ("DELETE", b"/whip/%s/%s" % (segment, segment), PUBLISH, None, {404}),
            ("DELETE", b"/api/streams/%s" % segment, ADMIN, None, {404}),
            ("GET", b"/watch/%s" % segment, {}, None, {200}),
            ("GET", b"/static/%s" % segment, {}, None, None),
        ]
        for method, target, headers, body, when_valid in routes:
            reply = http(node, method, target, headers, body)
            where = f"{method} {target[:120]!r} ({how})"
            assert reply.status < 500, where
            assert not any(marker in reply.body for marker in OUTSIDE), where
            if len(target) > 8190:
                assert reply.status == 400, where  # aiohttp's request-line limit
            elif how == "encoded" and when_valid is not None:
                assert reply.status in (when_valid if valid else {400, 404}), where
                if reply.status != 200 and reply.status != 204:
                    assert reply.json_message(), where
        if how == "encoded" and len(segment) < 8000:
            # A rendition name is checked like a stream name.
            reply = http(node, "GET", b"/hls/demo/%s/index.m3u8" % segment)
            expected = {404} if valid_rendition else {400, 404}
            assert reply.status in expected or name in ("360p", "180p", "audio")
    # Creating a pull validates the name too (only invalid names: a valid one would start a pull).
    if not valid:
        reply = http(node, "POST", b"/api/streams", {**ADMIN, "Content-Type": "application/json"},
                     json.dumps({"name": name, "url": "file:/nonexistent/fuzz.mp4"}).encode())
        assert reply.status == 400 and reply.json_message()


@settings(FUZZ, max_examples=200)
@given(stream_names)
def test_websocket_ingest_refuses_bad_names_before_the_upgrade(node, name):
    # A token for a stream no fuzzed name is: valid names get 403, invalid ones 400.
    token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "never-matched-x", 600, "fuzz")
    segment = quote(name, safe="", errors="surrogatepass")
    assume(len(segment) < 8000)  # the websockets library's own line limit answers the rest
    try:
        with connect(f"{node.ws_url}/ingest/{segment}?token={token}", open_timeout=5,
                     proxy=None):
            pass
    except InvalidStatus as refused:
        status = refused.response.status_code
    except InvalidHandshake as error:
        raise AssertionError(f"handshake failed without a status: {error}") from None
    else:
        raise AssertionError("the upgrade was accepted")
    assert status == (403 if _valid(validate_stream_name, name) else 400)


def test_the_node_survived_the_fuzzing(node):
    """After the node tests above: the demo stream is still served, and no request ended in the
    node's catch-all (every one was answered by a deliberate status)."""
    assert node.process.poll() is None, "the node died"
    reply = http(node, "GET", b"/hls/demo/360p/index.m3u8")
    assert reply.status == 200 and b"#EXT-X-PART:" in reply.body
    assert http(node, "GET", b"/healthz").status == 200
    unhandled = [line for line in node.log().splitlines() if '"unhandled error"' in line]
    assert not unhandled, unhandled[0][:2000]


# -- coverage-guided (atheris, libFuzzer) -------------------------------------------------------------
#
# ``python -m tests.test_fuzz TARGET [libFuzzer flags] [CORPUS_DIR]`` fuzzes one parser with the
# modules it is made of instrumented for coverage; the tests below run each target for a fixed
# number of inputs from a fixed seed in a child process (libFuzzer exits the process when done).

ATHERIS_MODULES = {
    "sdp": ("aiortc.sdp", "ingest.webrtc"),
    "container": ("ingest.container",),
    "token": ("jwt", "edge.tokens"),
    "claims": ("jwt", "edge.tokens"),
}
ATHERIS_RUNS = {"sdp": 20_000, "container": 50_000, "token": 20_000, "claims": 20_000}


def atheris_seeds(target: str) -> list[bytes]:
    if target == "sdp":
        return [offer.encode() for offer in SEED_OFFERS]
    if target == "container":
        return [b"\x1a\x45\xdf\xa3\x01\x00\x00\x00", b"\x00\x00\x00\x18ftypisom",
                (b"\x47" + bytes(187)) * 3]
    if target == "token":
        return [issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 600, "seed").encode(),
                issue_token(TEST_SECRET, "HS256", [Scope.PLAY, Scope.PUBLISH], "cam-*", 600,
                            None, "a", "i").encode()]
    return [json.dumps({"exp": int(time.time()) + 600, "scope": "admin play", "stream": "cam-*",
                        "sub": "x", "aud": ["a"], "iss": "i", "nbf": 0, "iat": 1}).encode()]


def _atheris_target(target: str):
    """The one-input function for ``target``, built from freshly imported, instrumented modules;
    it raises only when the parser breaks its contract."""
    import importlib

    import atheris

    modules = ATHERIS_MODULES[target]
    for name in list(sys.modules):
        if any(name == module or name.startswith(module + ".") for module in modules):
            del sys.modules[name]
    with atheris.instrument_imports(include=list(modules)):
        loaded = {module: importlib.import_module(module) for module in modules}
    if target == "sdp":
        webrtc = loaded["ingest.webrtc"]

        def one_input(data: bytes) -> None:
            try:
                webrtc.inspect_offer(data.decode("utf-8", "replace"))
            except webrtc.OfferRejected:
                pass
        return one_input
    if target == "container":
        container = loaded["ingest.container"]

        def one_input(data: bytes) -> None:
            try:
                found = container.probe_container(data)
            except container.UnsupportedMedia:
                return
            if found is None and len(data) >= container.PROBE_HEAD_BYTES:
                raise AssertionError("more bytes asked for than PROBE_HEAD_BYTES")
        return one_input
    tokens_module = loaded["edge.tokens"]
    verifier = tokens_module.TokenVerifier(tokens_module.TokenSettings(
        secret=TEST_SECRET, audience="a", issuer="i"))
    header = _b64url(b'{"alg":"HS256","typ":"JWT"}')

    def one_input(data: bytes) -> None:
        if target == "token":
            token = data.decode("utf-8", "replace")
        else:  # a signed token around the fuzzed payload: the claims are what is read
            signing_input = header + "." + _b64url(data)
            token = signing_input + "." + _b64url(hmac.new(
                TEST_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())
        try:
            verifier.verify(token, tokens_module.Scope.ADMIN, "cam-1")
        except (Unauthorized, Forbidden):
            pass
    return one_input


def _atheris_main(argv: list[str]) -> None:
    import atheris

    target = argv[1]
    atheris.Setup([argv[0], *argv[2:]], _atheris_target(target))
    atheris.Fuzz()


# "claims": the payload of a correctly signed token, so that the claims, not the signature, are read.
@pytest.mark.parametrize("target", ["sdp", "container", "token", "claims"])
def test_coverage_guided_fuzzing_finds_no_contract_break(tmp_path, target):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number, seed in enumerate(atheris_seeds(target)):
        (corpus / f"seed-{number}").write_bytes(seed)
    runs = ATHERIS_RUNS[target]
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_fuzz", target, f"-runs={runs}", "-seed=1",
         "-max_len=4096", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    report = result.stderr[-3000:]
    assert result.returncode == 0, report
    assert f"Done {runs} runs" in result.stderr, report
    assert not list(tmp_path.glob("crash-*")), report


if __name__ == "__main__":
    _atheris_main(sys.argv)
