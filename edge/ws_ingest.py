"""WebSocket ingest: ``ws://host:WS_PORT/ingest/{stream}``, served by the ``websockets`` library.

The publisher sends one continuous container byte stream as binary messages: WebM/Matroska (a
browser's MediaRecorder, started with a timeslice such as 250 ms so chunks flow while recording),
MPEG-TS or fragmented MP4 (``ffmpeg -f mpegts`` / ``-f mp4 -movflags frag_keyframe+empty_moov``).
Message boundaries mean nothing. The container is probed from the first bytes, demuxed and decoded
on a thread of its own (``ingest.container``) and pushed into the publication's ladder transcoder.

Authentication happens before the upgrade, in ``process_request``: a bad path gets 404, a bad stream
name 400, a missing or unusable token 401, a token without publish scope or for another stream 403,
each with a ``{"message": ...}`` JSON body as the HTTP API answers. No socket is handed to an
unauthenticated peer and no publication is begun for it. (Browsers do not expose the status of a
refused handshake: their ``close`` event says 1006. Check the token before connecting.) The token is
read from ``Authorization: Bearer`` or, for browsers, which cannot set headers, ``?token=``.

After the upgrade the session ends with a close frame whose reason says why:

==== ==========================================================================================
1000 the container ended (a non-fragmented MP4 whose samples are all read)
1001 the node is shutting down (the server closes every connection)
1003 text messages, bytes that are no supported container, a container that cannot be decoded
1008 the stream is being published already, the on_publish webhook refused, a takeover or eviction,
     the bitrate limit, no media (no decoded frame for ``no_media_timeout`` seconds)
1009 a message over ``max_message_bytes`` (closed by ``websockets`` itself)
1011 an internal error
1013 a publisher limit (node, address or token subject): try again later
==== ==========================================================================================

Memory per publisher is bounded (``IngestLimits``): ``websockets`` holds at most
``MAX_QUEUED_FRAMES`` frames of at most ``max_message_bytes``; the reader holds ``buffer_bytes``
plus one message (about 7 MiB in all by default). When the reader is full (the decoder, paced to the
media clock, is behind the bytes), this module stops calling ``recv()``; ``websockets`` then stops
reading the socket and TCP flow control slows the publisher. A transcoder that falls behind drops
frames in its own bounded queues (never blocks).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from edge.errors import (Conflict, Forbidden, LivedgeError, NotFound, TooManyRequests,
                         Unauthorized, Unavailable)
from edge.limits import AddressLimits, client_key, presents_credential
from edge.names import validate_stream_name
from edge.publish import Publication, Publishing
from edge.tokens import Claims, Scope, TokenVerifier, bearer_token
from ingest.container import (PROBE_HEAD_BYTES, ByteStreamReader, ContainerDemuxer,
                              UnsupportedMedia, probe_container)

log = logging.getLogger("livedge.ws_ingest")

INGEST_PATH_PREFIX = "/ingest/"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_QUEUED_FRAMES = 4  # websockets' receive buffer, in frames, before it stops reading the socket
READ_BUFFER_BYTES = 2 * 1024 * 1024  # bytes waiting for the demuxer before back-pressure
MAX_BITRATE = 20_000_000  # bits per second, averaged over BITRATE_WINDOW
BITRATE_WINDOW = 3.0  # seconds
NO_MEDIA_TIMEOUT = 10.0  # seconds without a decoded frame (from the upgrade on) before closing
DRAIN_TIMEOUT = 2.0  # seconds to decode (unpaced) what a publisher sent before it closed
DEMUX_STOP_TIMEOUT = 15.0  # seconds to wait for the decode thread (a transcoder handoff: <= 10)
CLOSE_TIMEOUT = 2.0  # seconds to wait for the publisher's closing handshake
MAX_CLOSE_REASON_BYTES = 123  # what fits in a close frame
# Environment overrides of the defaults above (tests shorten the no-media timeout).
NO_MEDIA_TIMEOUT_ENV = "LIVEDGE_WS_NO_MEDIA_TIMEOUT"
MAX_BITRATE_ENV = "LIVEDGE_WS_MAX_BITRATE"


@dataclass(frozen=True)
class IngestLimits:
    """Per-publisher limits. Bytes, bits per second, seconds."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_bitrate: int = MAX_BITRATE
    bitrate_window: float = BITRATE_WINDOW
    buffer_bytes: int = READ_BUFFER_BYTES
    no_media_timeout: float = NO_MEDIA_TIMEOUT
    realtime: bool = True  # decode no faster than the media clock (back-pressure on fast senders)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> IngestLimits:
        """The defaults, with ``LIVEDGE_WS_NO_MEDIA_TIMEOUT`` (seconds) and
        ``LIVEDGE_WS_MAX_BITRATE`` (bits per second) applied when set. Raises ValueError naming a
        bad value."""
        changes: dict[str, float | int] = {}
        for variable, field, parse in ((NO_MEDIA_TIMEOUT_ENV, "no_media_timeout", float),
                                       (MAX_BITRATE_ENV, "max_bitrate", int)):
            raw = environ.get(variable, "").strip()
            if not raw:
                continue
            try:
                value = parse(raw)
            except ValueError:
                raise ValueError(f"{variable}={raw!r} is not a number") from None
            if not value > 0:
                raise ValueError(f"{variable} must be positive")
            changes[field] = value
        return cls(**changes)


class BitrateMeter:
    """Bytes received over a sliding window. Pure: the caller passes the time (seconds, monotonic).

    The rate is the window's bytes over the window's full length, so a burst of up to
    ``limit * window`` bits is tolerated at any moment, including the start."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._bytes = 0

    def add(self, size: int, now: float) -> None:
        self._arrivals.append((now, size))
        self._bytes += size

    def bits_per_second(self, now: float) -> float:
        while self._arrivals and self._arrivals[0][0] <= now - self.window:
            self._bytes -= self._arrivals.popleft()[1]
        return self._bytes * 8 / self.window


@dataclass(frozen=True)
class SessionEnd:
    """How a session ended: the close code and reason sent, or ``code`` None when the publisher
    closed (or lost) the connection itself."""

    code: int | None
    reason: str = ""


@dataclass(frozen=True)
class _Admission:
    stream: str
    claims: Claims


class WebSocketIngest:
    """The WebSocket ingest server of a node.

    ``verifier`` is called per request (the app may swap its verifier). ``start()`` binds
    ``host:port`` (port 0: any free port, see ``port``); ``close()`` closes every session with 1001
    and returns when each has ended its publication."""

    def __init__(self, publishing: Publishing, verifier: Callable[[], TokenVerifier], host: str,
                 port: int, limits: IngestLimits | None = None,
                 guard: AddressLimits | None = None) -> None:
        self._publishing = publishing
        self._verifier = verifier
        self._host = host
        self._requested_port = port
        self.limits = limits if limits is not None else IngestLimits.from_environment(os.environ)
        self._guard = guard  # per-address publish rate and failed-authentication lockout
        self._server: Server | None = None
        self._admitted: WeakKeyDictionary[ServerConnection, _Admission] = WeakKeyDictionary()

    @property
    def port(self) -> int:
        """The bound port; only valid after ``start()``."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> bool:
        """Listen; returns False (and logs an error) when the port cannot be bound, so a node whose
        WebSocket port is taken still serves HLS and its other ingests."""
        try:
            self._server = await self._serve()
        except OSError as error:
            log.error("websocket ingest disabled: cannot listen on %s:%s: %s", self._host,
                      self._requested_port, error)
            return False
        log.info("websocket ingest listening on %s:%d", self._host, self.port)
        return True

    async def _serve(self) -> Server:
        return await serve(
            self._handle, self._host, self._requested_port,
            process_request=self._admit,
            max_size=self.limits.max_message_bytes,
            max_queue=MAX_QUEUED_FRAMES,
            # No keepalive pings: under back-pressure the pong waits unread behind media frames and
            # the ping would time out. A dead publisher sends no media: the watchdog closes it.
            ping_interval=None,
            compression=None,  # media does not deflate; inflating is CPU and a memory bomb vector
            close_timeout=CLOSE_TIMEOUT,
            logger=log)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()

    # -- before the upgrade ------------------------------------------------------------------------

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """``process_request``: None lets the upgrade proceed; a response refuses it."""
        address = client_key(str(connection.remote_address[0])
                             if connection.remote_address else None)
        credential = presents_credential(request.headers, parse_qs(urlsplit(request.path).query))
        refusal = self._guard.refuse_publish(address, credential) if self._guard else None
        try:
            if refusal is not None:
                raise TooManyRequests(refusal.message)
            admission = self._authorize(request)
        except LivedgeError as error:
            if self._guard and credential and isinstance(error, Unauthorized):
                self._guard.auth_failed(address)
            response = connection.respond(error.status, json.dumps(error.to_json()))
            del response.headers["Content-Type"]  # respond() says text/plain
            response.headers["Content-Type"] = "application/json"
            if refusal is not None:
                response.headers["Retry-After"] = refusal.retry_after_header
            return response
        self._admitted[connection] = admission
        return None

    def _authorize(self, request: Request) -> _Admission:
        target = urlsplit(request.path)
        if not target.path.startswith(INGEST_PATH_PREFIX):
            raise NotFound(f"publish to ws://host:port{INGEST_PATH_PREFIX}<stream>")
        stream = validate_stream_name(unquote(target.path[len(INGEST_PATH_PREFIX):]))
        query_tokens = parse_qs(target.query).get("token", [])
        token = bearer_token(request.headers.get("Authorization"),
                             query_tokens[0] if query_tokens else None)
        claims = self._verifier().verify(token, Scope.PUBLISH, stream)
        return _Admission(stream, claims)

    # -- after the upgrade -------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        admission = self._admitted.pop(connection)
        address = str(connection.remote_address[0]) if connection.remote_address else "-"
        try:
            publication = await self._publishing.begin(admission.stream, admission.claims,
                                                       address, "websocket")
        except LivedgeError as error:
            await connection.close(_close_code_for(error), _fit(error.message))
            return
        end = SessionEnd(CloseCode.INTERNAL_ERROR, "internal error")
        session = _Session(connection, publication, self.limits)
        try:
            end = await session.run()
        except Exception:
            log.exception("websocket ingest failed", extra={"stream": admission.stream})
        finally:
            await session.stop_decoding()
            if end.code is not None:
                await connection.close(end.code, _fit(end.reason))
            await self._publishing.end(publication)
            log.info("websocket publish ended: %s, %d bytes, %d frames",
                     f"sent {end.code} {end.reason!r}" if end.code is not None
                     else f"the publisher left {end.reason}".rstrip(),
                     session.bytes_received, session.frames,
                     extra={"stream": admission.stream, "session": publication.session_id,
                            "peer": address})


def _close_code_for(error: LivedgeError) -> int:
    """The close code for a publish refusal after the upgrade."""
    if isinstance(error, (TooManyRequests, Unavailable)):
        return CloseCode.TRY_AGAIN_LATER
    if isinstance(error, (Conflict, Forbidden)):
        return CloseCode.POLICY_VIOLATION
    return CloseCode.INTERNAL_ERROR


def _fit(reason: str) -> str:
    """``reason`` cut to what a close frame holds (123 bytes of UTF-8)."""
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[:MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


class _Session:
    """One publisher's bytes into one publication, on the event loop; decoding on its own thread.

    ``run()`` returns the first reason to end: the receive loop's, the decode thread's, the no-media
    watchdog's or an eviction's."""

    def __init__(self, connection: ServerConnection, publication: Publication,
                 limits: IngestLimits) -> None:
        self._connection = connection
        self._publication = publication
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._end: asyncio.Future[SessionEnd] = self._loop.create_future()
        self._room = asyncio.Event()
        self._reader = ByteStreamReader(limits.buffer_bytes, on_room=self._on_room)
        self._demuxer: ContainerDemuxer | None = None
        self._decoded: asyncio.Future[Exception | None] | None = None  # the decode thread's outcome
        self._started_at = time.monotonic()
        self._publisher_gone = False
        self.bytes_received = 0

    @property
    def frames(self) -> int:
        return self._demuxer.frames if self._demuxer is not None else 0

    async def run(self) -> SessionEnd:
        self._publication.on_evicted(
            lambda reason: self._finish(SessionEnd(CloseCode.POLICY_VIOLATION, reason)))
        tasks = [asyncio.create_task(self._receive(), name="ws-ingest-receive"),
                 asyncio.create_task(self._watch_for_media(), name="ws-ingest-watchdog")]
        try:
            return await self._end
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _finish(self, end: SessionEnd) -> None:
        """Record the first reason to end and stop decoding at once (the transcoder may be closed
        by the publishing side right after an eviction)."""
        if self._end.done():
            return
        self._end.set_result(end)
        if self._demuxer is not None:
            self._demuxer.stop()
        else:
            self._reader.abort()

    async def stop_decoding(self) -> None:
        """Stop the decode thread and wait for it: the transcoder has one producer at a time."""
        if self._demuxer is None or self._decoded is None:
            return
        self._demuxer.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._decoded), DEMUX_STOP_TIMEOUT)
        except TimeoutError:
            log.error("websocket decode thread did not stop",
                      extra={"stream": self._publication.stream_name})

    # -- the receive loop --------------------------------------------------------------------------

    async def _receive(self) -> None:
        meter = BitrateMeter(self._limits.bitrate_window)
        head = b""
        while True:
            try:
                message = await self._connection.recv()
            except ConnectionClosed:
                await self._publisher_left()
                return
            if isinstance(message, str):
                self._finish(SessionEnd(CloseCode.UNSUPPORTED_DATA,
                                        "text messages are not media: send binary messages"))
                return
            self.bytes_received += len(message)
            now = time.monotonic()
            meter.add(len(message), now)
            rate = meter.bits_per_second(now)
            if rate > self._limits.max_bitrate:
                self._finish(SessionEnd(CloseCode.POLICY_VIOLATION, (
                    f"bitrate limit: {rate / 1e6:.1f} Mbit/s over {meter.window:g} s, "
                    f"the limit is {self._limits.max_bitrate / 1e6:g} Mbit/s")))
                return
            if self._demuxer is None:
                head += message
                try:
                    container_format = probe_container(head[:PROBE_HEAD_BYTES])
                except UnsupportedMedia as error:
                    self._finish(SessionEnd(CloseCode.UNSUPPORTED_DATA,
                                            f"unsupported data: {error}"))
                    return
                if container_format is None:
                    continue
                self._demuxer = ContainerDemuxer(self._reader, container_format,
                                                 self._publication.transcoder,
                                                 realtime=self._limits.realtime)
                self._decoded = self._start_decoding(self._demuxer)
                message, head = head, b""
            if not self._reader.feed(message):
                # Full: stop receiving until the decoder has read half of it (back-pressure).
                self._room.clear()
                await self._room.wait()

    async def _publisher_left(self) -> None:
        """The publisher closed (or lost) the connection: decode what it sent, briefly, then end."""
        self._publisher_gone = True
        if self._demuxer is not None:
            self._demuxer.end_input()
        if self._decoded is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._decoded), DRAIN_TIMEOUT)
            except TimeoutError:
                pass
        self._finish(SessionEnd(None))

    def _on_room(self) -> None:
        """Called on the decode thread when the reader has room again."""
        self._loop.call_soon_threadsafe(self._room.set)

    # -- the decode thread -------------------------------------------------------------------------

    def _start_decoding(self, demuxer: ContainerDemuxer) -> asyncio.Future[Exception | None]:
        decoded: asyncio.Future[Exception | None] = self._loop.create_future()

        def settle(error: Exception | None) -> None:
            if not decoded.done():
                decoded.set_result(error)
            self._decoding_ended(error)

        def body() -> None:
            error: Exception | None = None
            try:
                demuxer.run()
            except Exception as exc:  # noqa: BLE001 - every failure ends the session, below
                error = exc
            try:
                self._loop.call_soon_threadsafe(settle, error)
            except RuntimeError:
                pass  # the loop is gone: nobody waits for us any more

        threading.Thread(target=body, name=f"ws-ingest-{self._publication.stream_name}",
                         daemon=True).start()
        return decoded

    def _decoding_ended(self, error: Exception | None) -> None:
        if error is not None and not isinstance(error, UnsupportedMedia):
            log.error("websocket decode thread failed: %s: %s", type(error).__name__, error,
                      extra={"stream": self._publication.stream_name})
        if self._publisher_gone:  # nobody to tell: the reason is for the log
            self._finish(SessionEnd(None, f"(then decoding failed: {error})" if error else ""))
        elif isinstance(error, UnsupportedMedia):
            self._finish(SessionEnd(CloseCode.UNSUPPORTED_DATA, f"unsupported data: {error}"))
        elif error is not None:
            self._finish(SessionEnd(CloseCode.INTERNAL_ERROR, "internal error"))
        else:  # the container said it was complete while the socket stayed open
            self._finish(SessionEnd(CloseCode.NORMAL_CLOSURE, "the container ended"))

    # -- the watchdog ------------------------------------------------------------------------------

    async def _watch_for_media(self) -> None:
        timeout = self._limits.no_media_timeout
        while True:
            last = self._demuxer.last_frame_at if self._demuxer is not None else None
            silent_for = time.monotonic() - (last if last is not None else self._started_at)
            if silent_for >= timeout:
                self._finish(SessionEnd(CloseCode.POLICY_VIOLATION, f"no media for {timeout:g} s"))
                return
            await asyncio.sleep(min(1.0, timeout - silent_for + 0.01))
