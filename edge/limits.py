"""Per-address limits against hostile clients, and the HTTP server's read deadline.

What one client address may do, so that one address cannot starve the others:

* **Publish attempts** (``POST /whip/{stream}`` and WebSocket ingest handshakes) come out of a
  token bucket: ``publish_rate`` per second, bursts of ``publish_burst``. An offer costs ICE
  gathering and a DTLS certificate; a flood of them is refused before any of that.
* **Failed authentications**: ``auth_failure_limit`` refusals (401) of a presented credential
  within ``AUTH_FAILURE_WINDOW`` seconds lock the address out for ``auth_lockout`` seconds. While
  locked out, every request that carries a credential (``Authorization``, ``?token=`` or a fleet
  credential) gets 429
  without being checked, so guessing stops paying; requests without one (open playback from the
  same NAT, probes) carry on.
* **Concurrent requests**: at most ``max_requests_per_address`` requests of one address are in the
  handlers at once (blocked playlist reloads and held parts included); the probes (``/healthz``,
  ``/readyz``, ``/metrics``) are not counted, so a busy address never fails its own health checks,
  nor is the peer API (``/fleet/``: other edges and this node's HTTP workers, each following every
  stream it serves with one long answer; a request without a valid fleet credential is refused
  at once, and counts as a failed authentication).

Refusals are ``429 Too Many Requests`` with ``Retry-After`` (whole seconds) and the JSON body
``{"message": ...}`` every other error has.

Connections that never finish a request (slowloris) never reach a handler: aiohttp arms its
keep-alive timer when a connection opens and bytes of an incomplete request do not re-arm it, so
``server_handler_args`` sets ``keepalive_timeout`` to ``http_read_timeout``: the deadline for a
request's headers and the idle time allowed between requests.

A client address is the peer's IP address; IPv6 clients are grouped by their /64 (one subscriber
usually holds a whole /64). Behind a proxy every client shares the proxy's address: raise the
limits there.

The core (``AddressLimits``) is I/O-free and takes its clock as a parameter; ``limits_middleware``
is the thin aiohttp layer.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from edge.config import Settings
from edge.errors import LivedgeError, Unauthorized
from edge.peer_api import FLEET_HEADER

AUTH_FAILURE_WINDOW = 10.0  # seconds over which failed authentications are counted
MAX_TRACKED_ADDRESSES = 100_000  # per table; the least recently seen address is forgotten first
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
PEER_API_PREFIX = "/fleet/"  # edge/peer_api.py: authenticated before anything is held
WHIP_ENDPOINT_PREFIX = "/whip/"


@dataclass(frozen=True)
class LimitSettings:
    """Per-address limits; rates per second, durations in seconds. ``max_requests_per_address`` 0
    means no cap."""

    publish_rate: float = 10.0
    publish_burst: int = 20
    auth_failure_limit: int = 20
    auth_failure_window: float = AUTH_FAILURE_WINDOW
    auth_lockout: float = 60.0
    max_requests_per_address: int = 256
    max_tracked_addresses: int = MAX_TRACKED_ADDRESSES

    @classmethod
    def from_settings(cls, settings: Settings) -> LimitSettings:
        """The limits of one serving process. With HTTP workers the kernel spreads a client's
        connections over every process and each counts its own refusals, so each allows its
        share of AUTH_FAILURE_LIMIT: together about the configured number of guesses, not N
        times it."""
        return cls(publish_rate=settings.publish_rate, publish_burst=settings.publish_burst,
                   auth_failure_limit=-(-settings.auth_failure_limit // settings.http_workers),
                   auth_lockout=settings.auth_lockout_seconds,
                   max_requests_per_address=settings.max_requests_per_address)


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused and when the client may try again (seconds)."""

    message: str
    retry_after: float

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, at least 1 (RFC 9110 10.2.3 has no fractions)."""
        return str(max(1, math.ceil(self.retry_after)))

    def response(self) -> web.Response:
        return web.json_response({"message": self.message}, status=429,
                                 headers={"Retry-After": self.retry_after_header})


@dataclass(frozen=True)
class LimitStats:
    """Counters since start, read at scrape time."""

    publish_refused: int
    auth_refused: int
    requests_refused: int
    lockouts: int
    locked_addresses: int


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class _Failures:
    times: collections.deque[float]
    locked_until: float = 0.0


class _Table(collections.OrderedDict):
    """An insertion-ordered dict that forgets its least recently touched entry past ``limit``, so a
    client spraying addresses costs bounded memory."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: str, make: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = self[key] = make()
            while len(self) > self.limit:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


def client_key(address: str | None) -> str:
    """The address limits are counted under: the IP address, an IPv4-mapped IPv6 address as IPv4,
    other IPv6 addresses as their /64; anything unparsable (a Unix socket) as itself."""
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def presents_credential(headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """Whether a request carries a credential the node checks (a bearer token, a fleet's)."""
    return bool(headers.get("Authorization")) or "token" in query or FLEET_HEADER in headers


class AddressLimits:
    """The per-address state of one node. Not thread-safe: use it from the event loop.

    ``clock`` returns monotonic seconds."""

    def __init__(self, settings: LimitSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._buckets = _Table(settings.max_tracked_addresses)
        self._failures = _Table(settings.max_tracked_addresses)
        self._in_flight: dict[str, int] = {}  # a plain dict: twice as fast as a Counter here
        self._publish_refused = 0
        self._auth_refused = 0
        self._requests_refused = 0
        self._lockouts = 0

    # -- publish attempts ------------------------------------------------------------------------
    def admit_publish(self, address: str) -> Refusal | None:
        """Take one publish attempt of ``address`` from its bucket; a refusal when it is empty."""
        settings = self.settings
        now = self._clock()
        bucket = self._buckets.touch(address, lambda: _Bucket(settings.publish_burst, now))
        bucket.tokens = min(settings.publish_burst,
                            bucket.tokens + (now - bucket.updated) * settings.publish_rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        self._publish_refused += 1
        return Refusal(f"too many publish attempts from this address: at most "
                       f"{settings.publish_rate:g} per second",
                       (1 - bucket.tokens) / settings.publish_rate)

    def refuse_publish(self, address: str, credential: bool) -> Refusal | None:
        """For a publish attempt: the lockout (if it carries a credential), then the bucket."""
        return (self.check_auth(address) if credential else None) or self.admit_publish(address)

    # -- failed authentications ------------------------------------------------------------------
    def check_auth(self, address: str) -> Refusal | None:
        """A refusal while ``address`` is locked out for failed authentications."""
        failures = self._failures.get(address)
        if failures is None:
            return None
        remaining = failures.locked_until - self._clock()
        if remaining <= 0:
            return None
        self._auth_refused += 1
        return Refusal("too many failed authentications from this address", remaining)

    def auth_failed(self, address: str) -> None:
        """Record that a credential presented by ``address`` was refused (401)."""
        settings = self.settings
        now = self._clock()
        failures = self._failures.touch(
            address, lambda: _Failures(collections.deque(maxlen=settings.auth_failure_limit)))
        if failures.locked_until > now:
            return
        failures.times.append(now)
        if len(failures.times) == settings.auth_failure_limit \
                and now - failures.times[0] <= settings.auth_failure_window:
            failures.locked_until = now + settings.auth_lockout
            failures.times.clear()
            self._lockouts += 1

    # -- concurrent requests ---------------------------------------------------------------------
    def enter(self, address: str) -> Refusal | None:
        """Count a request of ``address`` in; a refusal (and nothing counted) past the cap. Every
        ``enter`` that returns None must be paired with one ``leave``."""
        cap = self.settings.max_requests_per_address
        in_flight = self._in_flight.get(address, 0)
        if cap and in_flight >= cap:
            self._requests_refused += 1
            return Refusal(f"too many concurrent requests from this address (at most {cap})", 1)
        self._in_flight[address] = in_flight + 1
        return None

    def leave(self, address: str, count: int = 1) -> None:
        """Count ``count`` requests of ``address`` out."""
        left = self._in_flight.get(address, 0) - count
        if left > 0:
            self._in_flight[address] = left
        else:
            self._in_flight.pop(address, None)

    def in_flight(self, address: str) -> int:
        return self._in_flight.get(address, 0)

    def stats(self) -> LimitStats:
        now = self._clock()
        return LimitStats(self._publish_refused, self._auth_refused, self._requests_refused,
                          self._lockouts,
                          sum(f.locked_until > now for f in self._failures.values()))


LIMITS = web.AppKey("limits", AddressLimits)


def _peer_api_read(request: web.Request) -> bool:
    """A peer API request (all are GETs without a body): refused at once without a valid fleet
    credential, held long only with one. Anything else under /fleet/ is counted (a worker proxies
    it to its main process before anyone checks it)."""
    return request.method == "GET" and not request.body_exists \
        and request.path.startswith(PEER_API_PREFIX)


def limits_middleware(limits: AddressLimits) -> Callable:
    """The aiohttp middleware applying ``limits``; install it inside the one that turns errors into
    JSON, so its 401s are seen as exceptions and its 429s get the usual headers."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        address = client_key(request.remote)
        credential = presents_credential(request.headers, request.query)
        if request.method == "POST" and request.path.startswith(WHIP_ENDPOINT_PREFIX):
            refusal = limits.refuse_publish(address, credential)
        else:
            refusal = limits.check_auth(address) if credential else None
        if refusal is not None:
            return refusal.response()
        counted = request.path not in PROBE_PATHS and not _peer_api_read(request)
        if counted:
            refusal = limits.enter(address)
            if refusal is not None:
                return refusal.response()
        try:
            response = await handler(request)
        except LivedgeError as error:
            if credential and isinstance(error, Unauthorized):
                limits.auth_failed(address)
            raise
        finally:
            if counted:
                limits.leave(address)
        if credential and response.status == 401:
            limits.auth_failed(address)
        return response

    return middleware


def server_handler_args(settings: Settings) -> dict[str, Any]:
    """``web.Application(handler_args=...)``: what aiohttp's per-connection handler is given."""
    return {"keepalive_timeout": settings.http_read_timeout}
