"""The fast lane: hot LL-HLS requests answered without aiohttp's per-request machinery.

Every HTTP connection of a node starts here. A request the lane can answer from memory (a playlist,
an init segment, part or segment in the memory tier, or a blocking reload, preload-hinted part or
starting stream's multivariant playlist parked until it exists) is answered by writing ready bytes
to the transport, and so are the errors of those routes (a stream not live, an object gone, a
reload too far ahead: the JSON aiohttp would send), so that a player told 404 while its stream
restarts stays in the lane. Anything else (other routes, other methods, ranges, conditional
requests, percent-escapes, a lane refusal, a replica still loading) hands the connection to
aiohttp, with the bytes of that request, for the rest of its life: aiohttp answers it exactly as it
would have without the lane.

Why: aiohttp spends about 180 us of CPU on each answer (request object, middleware, response object)
and a task and a timer on each blocked request; that held one node to about 2,000 blocking waiters
and a quarter of nginx's rate for 30 KB parts (bench/README.md). Here a parked request is a small
object in a deque: one wake per (stream, rendition) change answers every request it satisfies, and
one sweep a quarter second answers the timed-out ones with 503. A connection's repeated blocking
reloads, which differ only in ``_HLS_msn`` and ``_HLS_part``, and its repeated object requests,
which differ only in the name, are matched against its last one of the kind rather than parsed
again (``_Template``).

The lane applies what aiohttp's middleware applies to the same requests: per-address limits,
request ids, CORS headers, request metrics, and the slow-client deadline (``read_timeout``: the time
allowed for a request's headers and between requests, never re-armed by a partial request). It also
owns the per-address cap on open connections, which aiohttp does not have.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable

import httptools

from edge import burst as bursts
from edge.errors import LivedgeError, Unauthorized
from edge.hls import (HLS_NUMBER_MAX, OBJECT_NAME_MAX, PLAYLIST_CACHE_CONTROL, PLAYLIST_TYPE,
                      HlsRoutes, ReloadQuery, first_media_timeout, no_media_yet, no_such_object,
                      object_name, part_late, too_far)
from edge.limits import AddressLimits, Refusal, client_key
from edge.logs import request_id_for
from origin.live import ANY_RENDITION, LiveStream
from origin.rendition import Readiness, is_init_name

MAX_HEAD_BYTES = 8190  # aiohttp's limit for a request line and headers; past it aiohttp says why
MAX_BUFFERED_BYTES = 65536  # read no more while this much of later requests waits
VIEWER_NOTE_SECONDS = 1.0  # a connection's repeated reloads note its viewer at most this often
SWEEP_SECONDS = 0.25  # how often timed-out parked requests are answered
BURST_FROM = 500  # parked requests a wake answers as a burst (fewer take under 5 ms)
BURST_SWITCH_INTERVAL = 0.25  # seconds: longer than any wake (10,000 answers: about 0.1 s)
PLAYLIST_CONTENT_TYPE = f"{PLAYLIST_TYPE}; charset=utf-8"
# A request carrying one of these needs aiohttp's full semantics.
_HANDED_OVER_HEADERS = frozenset({
    b"range", b"if-range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"transfer-encoding", b"upgrade", b"expect", b"authorization",
})
_ROUTE_MULTIVARIANT = "/hls/{stream}/index.m3u8"
_ROUTE_PLAYLIST = "/hls/{stream}/{rendition}/index.m3u8"
_ROUTE_OBJECT = "/hls/{stream}/{rendition}/{name}"


@dataclass(frozen=True)
class LaneSettings:
    read_timeout: float  # seconds for a request's headers, and idle between requests
    max_connections_per_address: int  # 0: no cap
    cors_headers: dict[str, str]
    enabled: bool = True  # False: every connection goes straight to aiohttp


@dataclass
class LaneStats:
    connections: int = 0  # open, including those handed to aiohttp
    answered: int = 0  # requests the lane answered itself
    handed_over: int = 0  # connections handed to aiohttp
    parked: int = 0  # requests parked now
    connections_refused: int = 0  # over the per-address connection cap
    read_through: int = 0  # objects the lane read through the lower tiers (not in memory)
    repeated_reloads: int = 0  # reloads matched against their connection's last, not parsed
    repeated_objects: int = 0  # object requests matched the same way
    bursts: int = 0  # wakes of at least BURST_FROM parked requests: GIL held, no GC
    burst_answers: int = 0  # answers the burst sender sent straight to their sockets
    burst_short_sends: int = 0  # of those, the ones the kernel did not take whole at once


@dataclass(frozen=True, slots=True)
class _Reply:
    """How to answer one request: keep the connection or not (one of three, shared)."""

    keep_alive: bool
    connection_header: str  # "", or a whole "Connection: ...\r\n" line


_CLOSE = _Reply(False, "Connection: close\r\n")
_KEEP_ALIVE_1_0 = _Reply(True, "Connection: keep-alive\r\n")
_KEEP_ALIVE = _Reply(True, "")


class _Request:
    """The request head being parsed on one connection (the callbacks are httptools' protocol).

    One parser and one of these serve a connection's requests in turn: a parser per request would
    make a reference cycle per request for the garbage collector."""

    __slots__ = ("url", "plain", "request_id", "user_agent", "parser", "method", "keep_alive",
                 "version")

    def __init__(self) -> None:
        self.parser: Any = httptools.HttpRequestParser(self)
        self.reset()

    def reset(self) -> None:
        self.method = b""
        self.keep_alive = False
        self.version = "1.1"
        self.url = b""
        self.plain = True  # no header that needs aiohttp
        self.request_id: str | None = None
        self.user_agent = ""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _HANDED_OVER_HEADERS or (name == b"content-length" and value.strip() != b"0"):
            self.plain = False
        elif name == b"x-request-id":
            self.request_id = value.decode("latin-1")
        elif name == b"user-agent":
            self.user_agent = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # httptools answers these only while the message is being parsed, not after.
        self.method = self.parser.get_method()
        self.keep_alive = self.parser.should_keep_alive()
        self.version = self.parser.get_http_version()


_MSN_KEY, _PART_KEY = b"_HLS_msn=", b"&_HLS_part="
_NUMBER_DIGITS = 16  # as edge.hls reads them


@dataclass(frozen=True, slots=True)
class _Template:
    """A connection's last request of one kind, as a template. A player asks the same head again
    and again with only a few bytes changed (the numbers of a blocking reload, the name of a
    part): the next one is matched against this one (about 2 µs) instead of parsed, checked and
    routed again (15-20 µs for a browser's head; bench/README.md: a third less node CPU per
    blocking reload)."""

    before: bytes  # the head up to the bytes that change
    after: bytes  # the head from their end on
    stream_name: str
    rendition: str
    token: str | None
    request_id: str | None  # the client's X-Request-Id
    reply: _Reply

    def middle(self, head: bytes) -> bytes | None:
        """What ``head`` has between ``before`` and ``after``, if it has both."""
        before, after = self.before, self.after
        end = len(head) - len(after)
        if end <= len(before) or not head.startswith(before) or not head.endswith(after):
            return None
        return head[len(before):end]


@dataclass(frozen=True, slots=True)
class _Reload(_Template):
    """A blocking playlist reload: ``_HLS_msn`` and ``_HLS_part`` values change."""

    skip: bool = False
    client: str = ""  # "address|user agent", for the viewer count

    @classmethod
    def of(cls, head: bytes, url: bytes, **route: Any) -> _Reload | None:
        """The template of ``head`` (whose request target is ``url``), if its query has
        ``_HLS_msn`` and then ``_HLS_part`` as adjacent pairs, the first of their names."""
        path, _, query = url.partition(b"?")
        pairs = query.split(b"&")
        keys = [pair.partition(b"=")[0] for pair in pairs]
        if b"_HLS_msn" not in keys:
            return None
        index = keys.index(b"_HLS_msn")
        if index + 1 >= len(keys) or keys[index + 1] != b"_HLS_part" \
                or b"_HLS_part" in keys[:index]:
            return None
        # The request line is "GET <url> HTTP/...": the target starts after the first space.
        start = head.index(b" ") + 1 + len(path) + 1 + sum(len(p) + 1 for p in pairs[:index]) \
            + len(_MSN_KEY)
        msn, part = pairs[index][len(_MSN_KEY):], pairs[index + 1][len(_PART_KEY) - 1:]
        end = start + len(msn) + len(_PART_KEY) + len(part)
        if head[start - len(_MSN_KEY):end] != _MSN_KEY + msn + _PART_KEY + part:
            return None
        return cls(head[:start], head[end:], **route)

    def numbers(self, head: bytes) -> tuple[int, int] | None:
        """(msn, part) if ``head`` is this reload with other numbers, else None."""
        middle = self.middle(head)
        if middle is None:
            return None
        msn, sep, part = middle.partition(_PART_KEY)
        if not (sep and msn.isdigit() and part.isdigit() and len(msn) <= _NUMBER_DIGITS
                and len(part) <= _NUMBER_DIGITS):
            return None
        numbers = int(msn), int(part)
        return numbers if max(numbers) <= HLS_NUMBER_MAX else None


# The object names a template matches: those the packager makes (parts, segments, init segments),
# no longer than ``object_name`` allows.
_TEMPLATE_OBJECT_NAME = re.compile(
    rb"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,%d}\.(?:m4s|mp4)" % (OBJECT_NAME_MAX - 5))


@dataclass(frozen=True, slots=True)
class _ObjectRequest(_Template):
    """A request for an object of a rendition: the name changes."""

    @classmethod
    def of(cls, head: bytes, url: bytes, **route: Any) -> _ObjectRequest | None:
        """The template of ``head`` (whose request target is ``url``), if it names an object as
        the packager names them."""
        path = url.partition(b"?")[0]
        target = head.index(b" ") + 1  # "GET <url> HTTP/...": the target starts after a space
        start, end = target + path.rindex(b"/") + 1, target + len(path)
        if not _TEMPLATE_OBJECT_NAME.fullmatch(head, start, end):
            return None
        return cls(head[:start], head[end:], **route)

    def name(self, head: bytes) -> str | None:
        """The object ``head`` asks for if it is this request with another name, else None."""
        middle = self.middle(head)
        if middle is None or not _TEMPLATE_OBJECT_NAME.fullmatch(middle):
            return None
        return middle.decode("ascii")


@dataclass(eq=False, slots=True)
class _Parked:
    """A request held until its playlist or object exists, or its deadline passes."""

    connection: FastConnection
    stream: LiveStream
    rendition: str  # ANY_RENDITION: a multivariant playlist, held until the stream is ready
    deadline: float  # loop time
    request_id: bytes
    reply: _Reply
    head: bytes  # the request's, replayed to aiohttp if the lane gives the request up
    msn: int = -1  # a blocking playlist reload (msn >= 0) ...
    part: int | None = None
    skip: bool = False
    query: str = ""
    name: str = ""  # ... or a preload-hinted part or segment

    def readiness(self) -> Readiness:
        if self.rendition == ANY_RENDITION:  # a multivariant playlist: the stream's first parts
            try:
                return Readiness.READY if self.stream.is_ready() else Readiness.WAIT
            except LivedgeError:
                return Readiness.GONE
        if self.name:
            return self.stream.object_state(self.rendition, self.name)
        return self.stream.readiness(self.rendition, self.msn, self.part)


@dataclass(eq=False)
class _Group:
    """The requests parked on one rendition of one stream, in arrival (so deadline) order."""

    stream: LiveStream
    rendition: str
    parked: deque[_Parked] = field(default_factory=deque)
    armed: bool = False  # a wake is registered with the stream


class FastLane:
    """The lane's state shared by every connection of one node."""

    def __init__(self, hls: HlsRoutes, limits: AddressLimits, settings: LaneSettings,
                 hand_over: Callable[[], asyncio.Protocol],
                 count: Callable[[str, int, int], None], stats: LaneStats | None = None
                 ) -> None:
        self.hls = hls
        self.limits = limits
        self.settings = settings
        self._make_handler = hand_over  # aiohttp's protocol factory (web.Server)
        self._count = count  # (route, status, requests): the request metric
        self._uncounted: dict[tuple[str, int], int] = {}  # answers not yet added to it
        self._loop = asyncio.get_running_loop()
        self._groups: dict[tuple[int, str], _Group] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._connections: set[FastConnection] = set()
        self._per_address: dict[str, int] = {}
        self._date_second = 0
        self._date = ""
        self._heads: dict[tuple, tuple[bytes, bytes]] = {}
        self._cors = "".join(f"{k}: {v}\r\n" for k, v in settings.cors_headers.items())
        self.stats = stats if stats is not None else LaneStats()
        self._bursts_possible = bursts.bursts_possible()

    def __call__(self) -> asyncio.Protocol:
        """A protocol for one new connection (``loop.create_server``'s factory). With the lane
        off it still counts the connection against the per-address cap, then hands it over."""
        return FastConnection(self)

    def _tally(self, route: str, status: int, answers: int) -> None:
        key = (route, status)
        self._uncounted[key] = self._uncounted.get(key, 0) + answers

    def flush_counts(self) -> None:
        """Add the answers counted since the last flush to the request metric (before a scrape)."""
        uncounted, self._uncounted = self._uncounted, {}
        for (route, status), answers in uncounted.items():
            self._count(route, status, answers)

    def close(self) -> None:
        """Close every connection the lane still holds (those handed over are aiohttp's)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self._connections):
            if not connection.handed_over:
                connection.close()

    # -- connections ------------------------------------------------------------------------------
    def opened(self, connection: FastConnection) -> Refusal | None:
        cap = self.settings.max_connections_per_address
        count = self._per_address.get(connection.address, 0)
        if cap and count >= cap:
            self.stats.connections_refused += 1
            return Refusal(f"too many connections from this address (at most {cap})", 1)
        self._per_address[connection.address] = count + 1
        self._connections.add(connection)
        self.stats.connections += 1
        return None

    def closed(self, connection: FastConnection) -> None:
        self._connections.discard(connection)
        self.stats.connections -= 1
        count = self._per_address.get(connection.address, 0) - 1
        if count > 0:
            self._per_address[connection.address] = count
        else:
            self._per_address.pop(connection.address, None)

    def handler(self) -> asyncio.Protocol:
        self.stats.handed_over += 1
        return self._make_handler()

    # -- requests ---------------------------------------------------------------------------------
    def serve(self, connection: FastConnection, request: _Request, reply: _Reply,
              head: bytes) -> bool:
        """Answer or park one GET; False when aiohttp must take the connection, from this request
        on."""
        path, _, raw_query = request.url.partition(b"?")
        if not (path.startswith(b"/hls/") and request.plain) or b"%" in request.url \
                or b"+" in raw_query or b"#" in request.url:
            return False
        try:
            steps = path[5:].decode("ascii").split("/")
            query: dict[str, str] = {}
            for pair in raw_query.decode("ascii").split("&"):
                if pair:
                    key, _, value = pair.partition("=")
                    query.setdefault(key, value)
        except UnicodeDecodeError:
            return False
        if not (all(steps) and (len(steps) == 3 or steps[1:] == ["index.m3u8"])):
            return False  # no route of aiohttp's router: it answers 404 "Not Found"
        token = query.get("token")
        route = _ROUTE_OBJECT if len(steps) == 3 and steps[2] != "index.m3u8" else \
            _ROUTE_PLAYLIST if len(steps) == 3 else _ROUTE_MULTIVARIANT
        return self._admit(connection, token, route, request.request_id, reply, self._route,
                           connection, request, reply, head, steps, query, token)

    def serve_reload(self, connection: FastConnection, reload: _Reload, msn: int, part: int,
                     head: bytes) -> bool:
        """Answer or park a repeat of ``connection``'s last blocking reload; False when aiohttp
        must take the connection (as ``serve`` would have said)."""
        self.stats.repeated_reloads += 1
        return self._admit(connection, reload.token, _ROUTE_PLAYLIST, reload.request_id,
                           reload.reply, self._route_reload, connection, reload, msn, part, head)

    def serve_object(self, connection: FastConnection, fetch: _ObjectRequest, name: str,
                     head: bytes) -> bool:
        """Answer or park a repeat of ``connection``'s last object request with another name."""
        self.stats.repeated_objects += 1
        return self._admit(connection, fetch.token, _ROUTE_OBJECT, fetch.request_id, fetch.reply,
                           self._route_object, connection, fetch, name, head)

    def _admit(self, connection: FastConnection, token: str | None, route: str,
               request_id: str | None, reply: _Reply, answer: Callable[..., bool | None],
               *args: Any) -> bool:
        """``answer(rid, *args)`` within the address's limits; its LivedgeError answered here,
        as aiohttp's middleware would (the connection stays in the lane)."""
        limits, address = self.limits, connection.address
        if token is not None and limits.check_auth(address) is not None:
            return False  # aiohttp answers 429 with Retry-After
        if limits.enter(address) is not None:
            return False
        rid = request_id_for(request_id).encode()
        try:
            answered = answer(rid, *args)
        except LivedgeError as error:
            if token is not None and isinstance(error, Unauthorized):
                limits.auth_failed(address)
            self._refuse(connection, route, error, rid, reply)
            answered = True
        if answered is not None:  # parked requests leave when they are answered
            limits.leave(address)
        return answered is not False

    def _route(self, rid: bytes, connection: FastConnection, request: _Request, reply: _Reply,
               head: bytes, steps: list[str], query: dict[str, str], token: str | None
               ) -> bool | None:
        """True: answered; None: parked; False: hand over; LivedgeError: answer it."""
        stream, carried = self.hls.locate(steps[0], token)
        if stream.is_loading():
            return False  # aiohttp waits for the replica's log (a moment) rather than say 503
        if len(steps) == 2:
            if not stream.is_ready():  # starting: held until its first parts
                self._park(_Parked(connection, stream, ANY_RENDITION,
                                   self._loop.time() + first_media_timeout(stream), rid, reply,
                                   head, query=carried))
                return None
            self._send_multivariant(connection, stream, carried, rid, reply)
            return True
        rendition = self.hls.rendition_of(stream, steps[1])
        if steps[2] == "index.m3u8":
            client = f"{connection.remote}|{request.user_agent}"
            self.hls.saw_playlist_request(stream.name, client)
            reload = ReloadQuery.parse(query)
            if reload.msn is not None and reload.part is not None:
                connection.reload = _Reload.of(
                    head, request.url, stream_name=steps[0], rendition=rendition, token=token,
                    skip=reload.skip, request_id=request.request_id, client=client, reply=reply)
            return self._playlist(connection, stream, rendition, reload.msn, reload.part,
                                  reload.skip, carried, rid, reply, head)
        name = object_name(steps[2])
        connection.fetch = _ObjectRequest.of(
            head, request.url, stream_name=steps[0], rendition=rendition, token=token,
            request_id=request.request_id, reply=reply)
        return self._object(rid, connection, stream, rendition, name, reply, head)

    def _object(self, rid: bytes, connection: FastConnection, stream: LiveStream, rendition: str,
                name: str, reply: _Reply, head: bytes) -> bool | None:
        """A part or segment (parked until it exists when it is being made), or an init segment
        the window needs."""
        if name.endswith(".m4s"):
            state = stream.object_state(rendition, name)
            if state is Readiness.WAIT:
                self._park(_Parked(connection, stream, rendition, self._deadline(stream), rid,
                                   reply, head, name=name))
                return None
            if state is not Readiness.READY:
                raise no_such_object()
        elif not is_init_name(name) or stream.object_state(rendition, name) is not Readiness.READY:
            raise no_such_object()  # only the init segments the window needs are read through
        if not self._send_object(connection, stream, rendition, name, rid, reply):
            self._read_through(connection, stream, rendition, name, rid, reply, head)
        return True

    def _relocate(self, template: _Template) -> tuple[LiveStream, str] | None:
        """The stream of a repeated request and the query to carry, checked again: what can
        change between two requests (the stream, its renditions, the token's validity) is; what
        cannot is not. None while a replica loads (as in ``_route``)."""
        stream, carried = self.hls.locate_valid(template.stream_name, template.token)
        if stream.is_loading():
            return None
        if not stream.has_rendition(template.rendition):
            self.hls.rendition_of(stream, template.rendition)  # raises the NotFound that says so
        return stream, carried

    def _route_object(self, rid: bytes, connection: FastConnection, fetch: _ObjectRequest,
                      name: str, head: bytes) -> bool | None:
        located = self._relocate(fetch)
        if located is None:
            return False
        return self._object(rid, connection, located[0], fetch.rendition, name, fetch.reply, head)

    def _route_reload(self, rid: bytes, connection: FastConnection, reload: _Reload, msn: int,
                      part: int, head: bytes) -> bool | None:
        located = self._relocate(reload)
        if located is None:
            return False
        stream, carried = located
        now = self._loop.time()
        if now >= connection.viewer_noted_until:  # the count's window is tens of seconds
            connection.viewer_noted_until = now + VIEWER_NOTE_SECONDS
            self.hls.saw_playlist_request(stream.name, reload.client)
        return self._playlist(connection, stream, reload.rendition, msn, part, reload.skip,
                              carried, rid, reload.reply, head)

    def _playlist(self, connection: FastConnection, stream: LiveStream, rendition: str,
                  msn: int | None, part: int | None, skip: bool, carried: str, rid: bytes,
                  reply: _Reply, head: bytes) -> bool | None:
        """A media playlist: now, or, for a blocking reload (``msn`` given, and ``part`` with
        it or not), parked until the part it asks for exists."""
        if msn is not None:
            state = stream.readiness(rendition, msn, part)
            if state is Readiness.WAIT:
                self._park(_Parked(connection, stream, rendition, self._deadline(stream), rid,
                                   reply, head, msn=msn, part=part, skip=skip, query=carried))
                return None
            if state is not Readiness.READY:
                raise too_far()
        self._send_playlist(connection, stream, rendition, skip, carried, rid, reply)
        return True

    def _deadline(self, stream: LiveStream) -> float:
        """When a request parked now is answered 503 (RFC 8216bis 6.2.5.2: three target
        durations)."""
        return self._loop.time() + 3.0 * stream.settings.target_duration

    # -- answers ----------------------------------------------------------------------------------
    def _head(self, status: int, content_type: str, cache_control: str, length: int,
              reply: _Reply) -> tuple[bytes, bytes]:
        """An answer's head, as the bytes before and after its request id; made once a second
        for each shape of answer."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, formatdate(now, usegmt=True)
            self._heads.clear()
        key = (status, content_type, cache_control, length, reply.connection_header)
        parts = self._heads.get(key)
        if parts is None:
            parts = self._heads[key] = (
                (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                 f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
                 f"Cache-Control: {cache_control}\r\n{self._cors}X-Request-Id: ").encode(),
                (f"\r\nServer: livedge\r\n{reply.connection_header}Date: {self._date}\r\n\r\n"
                 ).encode())
        return parts

    def answer(self, connection: FastConnection, route: str, status: int, content_type: str,
               cache_control: str, body: bytes, rid: bytes, reply: _Reply) -> None:
        before, after = self._head(status, content_type, cache_control, len(body), reply)
        if len(body) < 16384:
            connection.write(b"".join((before, rid, after, body)))
        else:
            connection.write_both(b"".join((before, rid, after)), body)
        self.stats.answered += 1
        self._tally(route, status, 1)
        connection.answered(reply.keep_alive, self._loop.time())

    def _send_multivariant(self, connection: FastConnection, stream: LiveStream, carried: str,
                           rid: bytes, reply: _Reply) -> None:
        body = stream.multivariant_playlist(carried).encode()
        self.answer(connection, _ROUTE_MULTIVARIANT, 200, PLAYLIST_CONTENT_TYPE,
                    PLAYLIST_CACHE_CONTROL, body, rid, reply)

    def _send_playlist(self, connection: FastConnection, stream: LiveStream, rendition: str,
                       skip: bool, carried: str, rid: bytes, reply: _Reply) -> None:
        body = stream.media_playlist(rendition, skip, carried).encode()
        self.answer(connection, _ROUTE_PLAYLIST, 200, PLAYLIST_CONTENT_TYPE,
                    PLAYLIST_CACHE_CONTROL, body, rid, reply)

    def _send_object(self, connection: FastConnection, stream: LiveStream, rendition: str,
                     name: str, rid: bytes, reply: _Reply) -> bool:
        """Answer with the object if memory holds it; False if it does not."""
        data = stream.object(rendition, name)
        if data is None:
            return False
        self._send_data(connection, stream, rendition, data, rid, reply)
        return True

    def _send_data(self, connection: FastConnection, stream: LiveStream, rendition: str,
                   data: bytes, rid: bytes, reply: _Reply) -> None:
        content_type = _CONTENT_TYPES[stream.tracks[rendition].kind.value]
        self.answer(connection, _ROUTE_OBJECT, 200, content_type, self.hls.object_cache_control,
                    data, rid, reply)

    def _read_through(self, connection: FastConnection, stream: LiveStream, rendition: str,
                      name: str, rid: bytes, reply: _Reply, head: bytes) -> None:
        """A listed object memory does not hold: on a replica or an HTTP worker (their events
        carry no bytes) every new part's first request. Read it through the lower tiers (one
        read however many ask) while the connection waits in the lane: handed to aiohttp, it
        would stay there for good. Not counted against the address's request slots: a
        connection waits for one read at a time, and connections per address are capped."""
        self.stats.read_through += 1
        fetch = self._loop.create_task(stream.fetch_object(rendition, name))
        connection.fetching = fetch

        def fetched(done: asyncio.Task) -> None:
            if connection.fetching is not done:
                return  # the connection closed meanwhile
            connection.fetching = None
            error = None if done.cancelled() else done.exception()
            if done.cancelled() or (error is not None and not isinstance(error, LivedgeError)):
                connection.hand_over(replay=head)  # aiohttp tries again, or says why
            elif error is not None or done.result() is None:  # 503 without Redis, or 404
                self._refuse(connection, _ROUTE_OBJECT, error or no_such_object(), rid, reply)
            else:
                self._send_data(connection, stream, rendition, done.result(), rid, reply)

        fetch.add_done_callback(fetched)

    def _refuse(self, connection: FastConnection, route: str, error: LivedgeError, rid: bytes,
                reply: _Reply) -> None:
        """Answer ``error`` as aiohttp's middleware would, keeping the connection in the lane: a
        player that is once told 404 (its stream restarting) or 400 goes on asking, and handed to
        aiohttp it would cost five times as much for the rest of its life."""
        self.answer(connection, route, error.status, "application/json; charset=utf-8",
                    "no-store", json.dumps(error.to_json()).encode(), rid, reply)

    def _refuse_parked(self, parked: _Parked, error: LivedgeError) -> None:
        route = _ROUTE_OBJECT if parked.name else _ROUTE_MULTIVARIANT \
            if parked.rendition == ANY_RENDITION else _ROUTE_PLAYLIST
        self._refuse(parked.connection, route, error, parked.request_id, parked.reply)

    # -- parked requests --------------------------------------------------------------------------
    def _park(self, parked: _Parked) -> None:
        key = (id(parked.stream), parked.rendition)
        group = self._groups.get(key)
        if group is None or group.stream is not parked.stream:
            group = self._groups[key] = _Group(parked.stream, parked.rendition)
        group.parked.append(parked)
        if not group.armed:
            self._rearm(group)
        parked.connection.parked = parked
        counters = self.hls.counters
        counters.blocked_requests += 1
        counters.blocked_total += 1
        self.stats.parked += 1
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _unpark(self, parked: _Parked) -> bool:
        """Take ``parked`` off its connection; False if the connection has gone meanwhile."""
        connection = parked.connection
        if connection.parked is not parked:
            return False
        connection.parked = None
        self.hls.counters.blocked_requests -= 1
        self.stats.parked -= 1
        self.limits.leave(connection.address)
        return True

    def _wake(self, group: _Group) -> None:
        """The rendition changed: answer what is ready now, keep the rest parked."""
        group.armed = False
        if len(group.parked) < BURST_FROM:
            self._answer_ready(group)
            return
        # A wake is one burst of writes that every viewer of the part waits on, so nothing else
        # runs meanwhile. Every switch interval (5 ms) CPython hands the GIL to a thread that asks
        # for it: the transcoders' threads stretched a 10,000-waiter burst by 10-45 %. A garbage
        # collection (a full one: 25 ms at 10,000 waiters) waits for the burst's end too
        # (bench/README.md). The transcoders are buffered; the viewers are not. Where a second
        # core is usable, a helper thread makes the sends while this one prepares the later
        # answers (edge/burst.py): the kernel's work per send is as much as our Python's.
        self.stats.bursts += 1
        interval, collecting = sys.getswitchinterval(), gc.isenabled()
        sys.setswitchinterval(BURST_SWITCH_INTERVAL)
        gc.disable()
        try:
            burst = bursts.Burst(len(group.parked)) if self._bursts_possible else None
            try:
                self._answer_ready(group, burst)
            finally:
                if burst is not None:
                    answers, short = bursts.finish(burst)
                    self.stats.burst_answers += answers
                    self.stats.burst_short_sends += short
        finally:
            if collecting:
                gc.enable()
            sys.setswitchinterval(interval)

    def _answer_ready(self, group: _Group, burst: bursts.Burst | None = None) -> None:
        """The hot loop of blocking reloads: one render and one head per shape of answer,
        counters summed. With a ``burst``, the answers that can go straight to their sockets are
        added to it (edge/burst.py) instead of written."""
        waiting: deque[_Parked] = deque()
        states: dict[tuple, Readiness] = {}
        wires: dict[tuple, tuple[bytes, bytes]] = {}  # (skip, query, connection) -> head, tail
        leaving: dict[str, int] = {}
        now = self._loop.time()
        deadline = now + self.settings.read_timeout
        unparked = playlists = 0
        for parked in group.parked:
            connection = parked.connection
            if connection.parked is not parked:
                continue  # its connection closed
            key = (parked.name, parked.msn, parked.part)
            state = states.get(key)
            if state is None:
                state = states[key] = parked.readiness()
            if state is Readiness.WAIT:
                waiting.append(parked)
                continue
            connection.parked = None
            unparked += 1
            address = connection.address
            leaving[address] = leaving.get(address, 0) + 1
            reply = parked.reply
            if state is Readiness.READY and not parked.name and reply.keep_alive \
                    and parked.rendition != ANY_RENDITION:  # a blocking reload: most of them
                shape = (parked.skip, parked.query, reply.connection_header)
                wire = wires.get(shape)
                if wire is None:
                    body = group.stream.media_playlist(parked.rendition, parked.skip,
                                                       parked.query).encode()
                    before, after = self._head(200, PLAYLIST_CONTENT_TYPE,
                                               PLAYLIST_CACHE_CONTROL, len(body), reply)
                    wire = wires[shape] = (before, after + body)
                transport = connection.transport
                if burst is not None and connection.fd >= 0 \
                        and not transport.get_write_buffer_size() and not transport.is_closing():
                    burst.add(transport, connection.fd, wire[0], parked.request_id, wire[1])
                else:
                    transport.write(b"".join((wire[0], parked.request_id, wire[1])))
                playlists += 1
                connection.answered_alive(deadline)
            else:
                self._answer_other(connection, parked, state)
        group.parked = waiting
        self.hls.counters.blocked_requests -= unparked
        self.stats.parked -= unparked
        for address, count in leaving.items():
            self.limits.leave(address, count)
        if playlists:
            self.stats.answered += playlists
            self._tally(_ROUTE_PLAYLIST, 200, playlists)
        self._rearm(group)

    def _answer_other(self, connection: FastConnection, parked: _Parked, state: Readiness
                      ) -> None:
        """A woken request that is not a kept-alive blocking reload now ready."""
        multivariant = parked.rendition == ANY_RENDITION
        if state is Readiness.READY and multivariant:
            self._send_multivariant(connection, parked.stream, parked.query,
                                    parked.request_id, parked.reply)
        elif state is Readiness.GONE and multivariant:
            connection.hand_over(replay=parked.head)  # a replica gone: aiohttp says why
        elif state is Readiness.READY and not parked.name:
            self._send_playlist(connection, parked.stream, parked.rendition, parked.skip,
                                parked.query, parked.request_id, parked.reply)
        elif state is not Readiness.READY:
            self._refuse_parked(parked, no_such_object() if parked.name else too_far())
        elif not self._send_object(connection, parked.stream, parked.rendition, parked.name,
                                   parked.request_id, parked.reply):
            self._read_through(connection, parked.stream, parked.rendition, parked.name,
                               parked.request_id, parked.reply, parked.head)

    def _rearm(self, group: _Group) -> None:
        key = (id(group.stream), group.rendition)
        if not group.parked:
            if self._groups.get(key) is group:
                del self._groups[key]
        elif not group.armed:
            group.armed = True
            group.stream.call_on_change(group.rendition, lambda: self._wake_soon(group))

    def _wake_soon(self, group: _Group) -> None:
        """Wake ``group`` two loop turns from now: the event log's followers (this node's HTTP
        workers, edge/workers.py; other edges) are answered in the first, so their own waiters
        are woken while this process writes to its own."""
        self._loop.call_soon(self._loop.call_soon, self._wake, group)

    def _sweep(self) -> None:
        """Answer parked requests whose deadline passed with 503 (RFC 8216bis 6.2.5.2)."""
        now = self._loop.time()
        for group in list(self._groups.values()):
            while group.parked and group.parked[0].deadline <= now:
                parked = group.parked.popleft()
                if self._unpark(parked):
                    self.hls.counters.block_timeouts += 1
                    self._refuse_parked(parked, no_media_yet(parked.stream)
                                        if parked.rendition == ANY_RENDITION else part_late())
            self._rearm(group)
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep) if self._groups \
            else None

    def forget(self, parked: _Parked) -> None:
        """``parked``'s connection closed: it stays in its group's deque until the next wake or
        sweep skips it, but no longer counts."""
        self._unpark(parked)


_CONTENT_TYPES = {"video": "video/mp4", "audio": "audio/mp4"}


def _reply(keep_alive: bool, version: str) -> _Reply:
    if not keep_alive:
        return _CLOSE
    return _KEEP_ALIVE_1_0 if version == "1.0" else _KEEP_ALIVE


class FastConnection(asyncio.Protocol):
    """One HTTP/1.1 connection in the lane, until it is handed to aiohttp."""

    # Slots: a wake reads a few of these from each of thousands of connections.
    __slots__ = ("lane", "transport", "fd", "address", "remote", "parked", "fetching", "reload",
                 "fetch", "viewer_noted_until", "_buffer", "_request", "_handler", "_closing",
                 "_write_paused", "_read_paused", "_counted", "_idle_deadline", "_idle_timer")

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket's, for a burst's direct writes (edge/burst.py)
        self.address = "-"
        self.remote = ""
        self.parked: _Parked | None = None
        self.fetching: asyncio.Task | None = None  # an object read through the lower tiers
        self.reload: _Reload | None = None  # the last blocking reload, as a template
        self.fetch: _ObjectRequest | None = None  # the last object request, as a template
        self.viewer_noted_until = 0.0  # loop time: a repeated reload notes the viewer again
        self._buffer = bytearray()
        self._request = _Request()
        self._handler: Any = None  # aiohttp's protocol once handed over
        self._closing = False
        self._write_paused = False
        self._read_paused = False
        self._counted = False
        self._idle_deadline = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def handed_over(self) -> bool:
        return self._handler is not None

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")  # (under TLS, bytes go through the transport)
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self.fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else ""
        self.address = client_key(self.remote or None)
        refusal = self.lane.opened(self)
        if refusal is not None:
            body = json.dumps({"message": refusal.message}).encode()
            transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                b"Retry-After: " + refusal.retry_after_header.encode() +
                b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
                b"\r\n\r\n" + body)
            self._closing = True
            transport.close()
            return
        self._counted = True
        if not self.lane.settings.enabled:
            self.hand_over()
            return
        loop = self.lane._loop
        self._idle_deadline = loop.time() + self.lane.settings.read_timeout
        self._idle_timer = loop.call_at(self._idle_deadline, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
            return
        if not self._buffer and data.endswith(b"\r\n\r\n") and self._takes_requests() \
                and data.find(b"\r\n\r\n") == len(data) - 4 and len(data) <= MAX_HEAD_BYTES:
            self._serve_head(data)  # one whole request, as players send them: no buffer copies
            return
        self._buffer += data
        self._process()

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        return None  # close

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()
        self._write_paused = True

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()
            return
        self._write_paused = False
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.parked is not None:
            self.lane.forget(self.parked)
        if self.fetching is not None:
            fetching, self.fetching = self.fetching, None
            fetching.cancel()  # only this request's wait: the read itself is shared, shielded
        if self._counted:
            self._counted = False
            self.lane.closed(self)
        if self._handler is not None:
            self._handler.connection_lost(exc)

    # -- requests ---------------------------------------------------------------------------------
    def _process(self) -> None:
        buffer = self._buffer
        while self._takes_requests():
            end = buffer.find(b"\r\n\r\n")
            if end < 0 or end + 4 > MAX_HEAD_BYTES:
                if len(buffer) > MAX_HEAD_BYTES:
                    self.hand_over()  # a head too large, whole or not: aiohttp answers 400
                break
            # Off the buffer before it is served: an answer written now must not find it there
            # and schedule a pass for pipelined requests that are not there.
            head = bytes(buffer[:end + 4])
            del buffer[:end + 4]
            if not self._serve_head(head):
                break
        if self._handler is None and not self._closing:
            self._throttle_reading(len(buffer) > MAX_BUFFERED_BYTES)

    def _takes_requests(self) -> bool:
        """Whether the next request can be served now: none is parked or being read through,
        the transport takes writes, and the connection is the lane's and open."""
        return not (self.parked or self.fetching or self._write_paused or self._handler
                    or self._closing)

    def _serve_head(self, head: bytes) -> bool:
        """Serve one request's head; False once it is handed to aiohttp."""
        served = self._serve_repeat(head)
        if served is None:
            served = self._serve_parsed(head)
        if not served:
            self.hand_over(replay=head)
        return served

    def _serve_parsed(self, head: bytes) -> bool:
        """Parse ``head`` and serve it (``FastLane.serve``); False when aiohttp must take it."""
        request = self._request
        request.reset()
        try:
            request.parser.feed_data(head)
        except httptools.HttpParserError:
            return False
        return request.method == b"GET" and request.plain and self.lane.serve(
            self, request, _reply(request.keep_alive, request.version), head)

    def _serve_repeat(self, head: bytes) -> bool | None:
        """Serve ``head`` if it repeats this connection's last reload or object request (as
        ``FastLane.serve`` answers); None if it does not."""
        reload, fetch = self.reload, self.fetch
        if reload is not None:
            numbers = reload.numbers(head)
            if numbers is not None:
                return self.lane.serve_reload(self, reload, *numbers, head)
        if fetch is not None:
            name = fetch.name(head)
            if name is not None:
                return self.lane.serve_object(self, fetch, name, head)
        return None

    def _throttle_reading(self, pause: bool) -> None:
        if pause != self._read_paused and self.transport is not None:
            self._read_paused = pause
            (self.transport.pause_reading if pause else self.transport.resume_reading)()

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def write_both(self, head: bytes, body: bytes) -> None:
        self.transport.writelines((head, body))  # type: ignore[union-attr]

    def answered(self, keep_alive: bool, now: float) -> None:
        """A request was answered: close, or give the next one the full read deadline."""
        if keep_alive:
            self.answered_alive(now + self.lane.settings.read_timeout)
        else:
            self.close()

    def answered_alive(self, read_deadline: float) -> None:
        """A request was answered and the connection is kept alive: the next request is due by
        ``read_deadline``."""
        self._idle_deadline = read_deadline
        if self.parked is None and self._buffer and not self._closing:
            # Requests pipelined behind an answered parked one. Later, not inside a wake loop.
            self.lane._loop.call_soon(self._process)

    def hand_over(self, replay: bytes = b"") -> None:
        """From the current request on (``replay``: the head of a parked request already taken
        off the buffer), aiohttp serves this connection."""
        if self._handler is not None or self._closing:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        handler = self._handler = self.lane.handler()
        handler.connection_made(self.transport)
        if self._write_paused:
            handler.pause_writing()
        self._throttle_reading(False)
        data, self._buffer = replay + bytes(self._buffer), bytearray()
        if data:
            handler.data_received(data)

    def close(self) -> None:
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.close()

    def _idle_check(self) -> None:
        """The slow-client deadline: no complete request in time, and nothing parked."""
        if self._handler is not None or self._closing:
            return
        loop = self.lane._loop
        if self.parked is None and self.fetching is None and loop.time() >= self._idle_deadline:
            self.close()
            return
        self._idle_timer = loop.call_at(max(self._idle_deadline, loop.time() + 1.0),
                                        self._idle_check)
