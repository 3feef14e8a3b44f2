"""The composition root: settings in, a running aiohttp application out.

Only this module (and the CLI) wires ingest, origin and edge together.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Callable

from aiohttp import web

from edge.api import ApiRoutes
from edge.cache import MemoryCache
from edge.config import ConfigError, Settings
from edge.errors import LivedgeError
from edge.logs import request_id, request_id_for
from edge.fastlane import LaneStats
from edge.hls import HlsRoutes, HlsSettings
from edge.metrics import Metrics
from edge.node import Node
from edge.publish import Publishing
from edge.redis_tier import RedisConfig, RedisTier, connect
from edge.replica import LocalResumer, ObjectReader, ReplicaDirectory
from edge.eventlog import LocalEventLog
from edge.fleet import Fleet, FleetSettings, fleet_secret
from edge.peer_api import FleetCredential, PeerApi
from edge.workers import MainProcessLink, forwarded_client_middleware, new_worker_secret
from edge.membership import GossipSettings, decode_key
from edge.peer_fill import FleetSource, timings_for
from origin.packager import PackagerSettings
from edge.webhooks import Webhooks
from edge.whip import WHIP, WhipRoutes
from edge.web import PageSettings, WebRoutes
from edge.tokens import Claims, KeyLoadError, Scope, TokenVerifier, bearer_token
from edge.ws_ingest import WebSocketIngest
from edge.limits import LIMITS, AddressLimits, LimitSettings, limits_middleware, server_handler_args
from origin.live import LiveSettings

log = logging.getLogger("livedge.app")

NODE = web.AppKey("node", Node)
HLS = web.AppKey("hls", HlsRoutes)
WORKER_SECRET = web.AppKey("worker_secret", object)  # str, when this node starts HTTP workers
LANE_STATS = web.AppKey("lane_stats", LaneStats)  # filled by the fast lane edge/serve.py starts
PUBLISHING = web.AppKey("publishing", Publishing)
VERIFIER = web.AppKey("verifier", TokenVerifier)
METRICS = web.AppKey("metrics", Metrics)
LOADER = web.AppKey("loader", Callable[[], Settings])
RELOADED = web.AppKey("reloaded", list)  # called after each successful reload (HTTP workers)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Content-Length, X-Request-Id",
    "Access-Control-Max-Age": "600",
}


def build_verifier(settings: Settings) -> TokenVerifier:
    """The configured keys; with none, a random per-process secret (tokens from ``livedge token``
    then only work when ``JWT_SECRET`` is shared, which the README says)."""
    secret = settings.jwt_secret
    if not (secret or settings.jwt_public_key_file or settings.jwks_file):
        secret = secrets.token_urlsafe(32)
        log.warning("no JWT_SECRET or public key configured: publishing and admin need a token "
                    "signed with a random secret nobody knows; set JWT_SECRET")
    return TokenVerifier.from_files(secret, settings.jwt_public_key_file, settings.jwks_file,
                                    settings.jwt_audience, settings.jwt_issuer)


def _route_label(request: web.Request) -> str:
    route = request.match_info.route.resource
    return route.canonical if route is not None else "unmatched"


def reload_settings(app: web.Application) -> list[str]:
    """Apply what can change live (JWT keys, log level) from a fresh read of the configuration;
    return the problems found (then nothing changes)."""
    try:
        settings = app[LOADER]()
        verifier = build_verifier(settings)
    except ConfigError as error:
        return list(error.problems)
    except (KeyLoadError, OSError) as error:
        return [str(error)]
    app[VERIFIER] = verifier
    logging.getLogger().setLevel(settings.log_level.upper())
    log.info("configuration reloaded: JWT keys and log level")
    for reloaded in app[RELOADED]:
        reloaded()
    return []


# -- cache tiers (issue 4) and the fleet (issue 5) ---------------------------------------------------
@dataclass(frozen=True)
class CacheTiers:
    """Below the memory LRU: Redis (write-through of streams made here) and/or the fleet (peer
    fill); replicas of streams made elsewhere read through them."""

    redis: RedisTier | None
    fleet: Fleet | None
    reader: ObjectReader
    replicas: ReplicaDirectory


def build_fleet(settings: Settings, node: Node, streams: Callable[[str], object],
                event_log: LocalEventLog) -> Fleet | None:
    """Gossip membership and peer fill when ``SEEDS`` or ``GOSSIP_KEYS`` is set."""
    if not (settings.seeds or settings.gossip_keys):
        return None
    name = settings.node_name or socket.gethostname()
    keys = tuple(decode_key(key) for key in settings.gossip_keys)
    host, _, port = settings.gossip_bind.rpartition(":")
    loopback = host.startswith("127.") or host == "localhost"
    gossip = GossipSettings(name=name, bind=settings.gossip_bind,
                            advertise=settings.gossip_advertise, seeds=settings.seeds, keys=keys,
                            loopback=loopback)
    http_url = settings.advertise_url or f"http://{name}:{settings.port}"

    def digest() -> dict[str, int]:
        return {stats.name: max((r.last_msn for r in stats.renditions if r.last_msn is not None),
                                default=0)
                for stats in node.stream_stats() if not stats.ended}

    def load() -> float:
        active = node.publishing.active_count() if node.publishing else 0
        return active / max(1, settings.max_publishers)

    fleet_settings = FleetSettings(gossip, http_url, settings.zone, settings.origin_url,
                                   fleet_secret(keys, settings.fleet_secret),
                                   origin_role=settings.role == "origin")
    return Fleet(fleet_settings, streams, event_log, digest, lambda: node.draining, load)


def build_tiers(settings: Settings, node: Node, cache: MemoryCache,
                fleet_for: Callable[[Callable[[str], object]], Fleet | None]) -> CacheTiers | None:
    """The tiers below memory: Redis when ``REDIS_URL`` or ``REDIS_SENTINELS`` is set, the fleet
    when gossip is configured; ``None`` for a single node with neither."""
    live = LiveSettings(settings.segment_duration, settings.part_duration, settings.window_segments)
    tier: RedisTier | None = None
    if settings.redis_url or settings.redis_sentinels:
        sentinels = tuple((host, int(port)) for host, _, port in
                          (address.rpartition(":") for address in settings.redis_sentinels))
        config = RedisConfig(settings.redis_url, sentinels, settings.redis_sentinel_service,
                             settings.redis_cluster)
        tier = RedisTier(connect(config), live, f"{socket.gethostname()}:{settings.port}",
                         dvr_seconds=settings.redis_dvr_seconds)
    replicas: ReplicaDirectory | None = None
    fleet = fleet_for(lambda name: replicas.live_stream(name) if replicas else None)
    if tier is None and fleet is None:
        return None
    part_target = PackagerSettings(settings.segment_duration, settings.part_duration).part_target
    source = FleetSource(fleet, tier.timings if tier else timings_for(live), tier) if fleet \
        else tier
    reader = ObjectReader(cache, source)
    replicas = ReplicaDirectory(node, source, reader, cache, live, part_target)
    if tier is not None:
        node.stream_listeners.append(tier.on_window_event)
        tier.resumer = LocalResumer(node.live_stream, reader, tier.timings.ttl_for)
        node.readiness_details["redis"] = lambda: {**asdict(tier.stats()),
                                                   "replicas": replicas.stats().replicas}
    if fleet is not None:
        node.readiness_details["fleet"] = fleet.membership.stats
    return CacheTiers(tier, fleet, reader, replicas)


def build_worker_tiers(settings: Settings, node: Node, cache: MemoryCache,
                       link: MainProcessLink) -> CacheTiers:
    """An HTTP worker's only tier below memory: its main process, through the peer API."""
    live = LiveSettings(settings.segment_duration, settings.part_duration, settings.window_segments)
    part_target = PackagerSettings(settings.segment_duration, settings.part_duration).part_target
    source = FleetSource(link, timings_for(live))
    reader = ObjectReader(cache, source)
    return CacheTiers(None, None, reader, ReplicaDirectory(node, source, reader, cache, live,
                                                           part_target))


def build_app(settings: Settings, verifier: TokenVerifier | None = None,
              loader: Callable[[], Settings] | None = None) -> web.Application:
    cache = MemoryCache(max_bytes=settings.cache_memory)
    node = Node(settings, cache)
    webhooks = Webhooks(settings.on_publish_url, settings.on_unpublish_url)
    publishing = Publishing(node, webhooks)
    node.publishing = publishing
    verifier = verifier or build_verifier(settings)
    replicas_here: list[ReplicaDirectory] = []  # the event log also logs replicas (workers)
    event_log = LocalEventLog(lambda name: replicas_here[0].existing(name) if replicas_here
                              else node.live_stream(name))
    node.stream_listeners.append(event_log.on_window_event)
    link = MainProcessLink(settings.worker_of, settings.worker_secret or "") \
        if settings.worker_of else None
    tiers = build_worker_tiers(settings, node, cache, link) if link else \
        build_tiers(settings, node, cache,
                    lambda lookup: build_fleet(settings, node, lookup, event_log))
    streams = tiers.replicas if tiers else node  # streams made here first, then replicas
    if tiers and tiers.fleet:
        fleet = tiers.fleet
        publishing.elsewhere = lambda stream: fleet.ingester_url(stream)

    hls = HlsRoutes(streams, HlsSettings(playback_auth=settings.playback_auth == "token",
                                      object_max_age=int(max(60, 3 * settings.window_segments
                                                             * settings.segment_duration))),
                    verifier=lambda: app[VERIFIER], on_playlist=node.viewer_tracker.saw)

    class Snapshots:
        stream_stats = staticmethod(node.stream_stats)
        transcode_stats = staticmethod(node.transcode_stats)
        cache_stats = staticmethod(cache.stats)

        @staticmethod
        def publisher_stats():
            return app[WHIP].stats() if WHIP in app else {}

        @staticmethod
        def fleet_stats():
            return tiers.fleet.stats() if tiers and tiers.fleet else None

        @staticmethod
        def redis_stats():
            return tiers.redis.stats() if tiers and tiers.redis else None

        @staticmethod
        def replica_stats():
            return tiers.replicas.stats() if tiers else None

        @staticmethod
        def hls_counters():
            return hls.counters

        @staticmethod
        def limit_stats():
            return limits.stats()

        @staticmethod
        def lane_stats():
            return app[LANE_STATS]

    metrics = Metrics(Snapshots())

    def authorize(request: web.Request, scope: Scope, stream: str | None) -> Claims:
        token = bearer_token(request.headers.get("Authorization"), request.query.get("token"))
        return app[VERIFIER].verify(token, scope, stream)

    @web.middleware
    async def errors_and_cors(request: web.Request, handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and request.path != "/whip" \
                and not request.path.startswith("/whip/"):
            return web.Response(status=204, headers=CORS_HEADERS)
        rid = request_id_for(request.headers.get("X-Request-Id"))
        request_id.set(rid)
        try:
            response = await handler(request)
        except LivedgeError as error:
            response = web.json_response(error.to_json(), status=error.status)
        except web.HTTPException as error:
            response = web.json_response({"message": error.reason}, status=error.status)
        except Exception:
            log.exception("unhandled error", extra={"url": request.path})
            response = web.json_response({"message": "internal error"}, status=500)
        response.headers.update(CORS_HEADERS)
        response.headers["X-Request-Id"] = rid
        metrics.http_requests.labels(_route_label(request), str(response.status)).inc()
        return response

    limits = AddressLimits(LimitSettings.from_settings(settings))
    middlewares = [errors_and_cors, limits_middleware(limits)]
    worker_secret = None
    if settings.http_workers > 1 and link is None:
        worker_secret = new_worker_secret()
        middlewares.insert(0, forwarded_client_middleware(worker_secret))
    app = web.Application(middlewares=middlewares,
                          client_max_size=1024 * 1024,
                          handler_args=server_handler_args(settings))
    app[LIMITS] = limits
    app[NODE] = node
    app[PUBLISHING] = publishing
    app[LOADER] = loader or (lambda: settings)
    app[RELOADED] = []

    async def reload_handler(request: web.Request) -> web.Response:
        authorize(request, Scope.ADMIN, None)
        problems = reload_settings(app)
        if problems:
            return web.json_response({"message": "reload refused", "problems": problems},
                                     status=400)
        return web.json_response({"reloaded": ["jwt keys", "log level"]})

    app[VERIFIER] = verifier
    app[METRICS] = metrics
    hls.add_to(app)
    app[HLS] = hls
    app[LANE_STATS] = LaneStats()
    app[WORKER_SECRET] = worker_secret
    # An HTTP worker (edge/workers.py) serves LL-HLS; its main process answers everything else.
    is_origin = settings.role == "origin"  # a shield and directory: nothing is published here
    ingests = not is_origin and link is None
    if link is not None:
        link.add_to(app, metrics.render)
    else:
        app.router.add_post("/api/reload", reload_handler)
        ApiRoutes(node, metrics, authorize,
                  publishers=lambda: app[WHIP].stats() if WHIP in app else {},
                  metrics_need_admin=settings.metrics_auth == "admin").add_to(app)
        WebRoutes(node, PageSettings(settings.playback_auth == "token", settings.ws_port)
                  ).add_to(app)
    if ingests:
        WhipRoutes.from_settings(settings, publishing, authorize).add_to(app)
    if tiers and tiers.fleet:
        tiers.fleet.add_to(app, lambda request: authorize(request, Scope.ADMIN, None))
    if worker_secret is not None and tiers is not None:
        # Workers follow the streams this node replicates (Redis, the fleet) through it too.
        replicas_here.append(tiers.replicas)
        tiers.replicas.listeners.append(event_log.on_window_event)
    if worker_secret is not None:  # the peer API this node's workers follow its streams through
        worker_credential = FleetCredential(worker_secret.encode(), "main")
        if tiers and tiers.fleet:
            tiers.fleet.api.credentials.append(worker_credential)
        else:
            PeerApi("main", streams.live_stream, event_log, lambda: {},
                    [worker_credential]).add_to(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        lag_probe = asyncio.create_task(metrics.probe_loop_lag(), name="loop-lag")
        if tiers and tiers.redis:
            await tiers.redis.start()  # before any stream: a restarted node resumes from it
        if tiers and tiers.fleet:
            await tiers.fleet.start()
        if link is not None:
            await link.start()
        ws_ingest = None
        if ingests:
            for name, url in settings.pull_streams:
                await node.add_pull(name, url)
            if settings.demo:
                await node.add_demo()
            ws_ingest = WebSocketIngest(publishing, lambda: app[VERIFIER], settings.host,
                                        settings.ws_port, guard=limits)
            await ws_ingest.start()
        yield
        if ws_ingest is not None:
            await ws_ingest.close()  # before publishing.close(): its sessions end publications
        lag_probe.cancel()
        with suppress(asyncio.CancelledError):
            await lag_probe
        if tiers and tiers.fleet:
            await tiers.fleet.leave()  # peers route around us at once
        if tiers and tiers.redis:
            tiers.redis.shutting_down()  # streams stopped by a shutdown stay resumable in Redis
        await publishing.close()
        await node.close()
        if tiers:
            await tiers.replicas.close()
        if tiers and tiers.redis:
            await tiers.redis.close()
        if link is not None:
            await link.close()
        await webhooks.close()

    app.cleanup_ctx.append(lifecycle)
    return app
