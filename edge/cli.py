"""``livedge``: serve an edge node, issue tokens, publish a source."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request

from edge.config import ConfigError, Settings, load_settings
from edge.tokens import DEFAULT_AUDIENCE, KeyLoadError, Scope, issue_token

log = logging.getLogger("livedge")


def _serve(args: argparse.Namespace) -> int:
    from edge.app import build_app
    from edge.logs import configure_logging
    from edge.serve import serve

    overrides: dict[str, object] = {}
    if args.command == "origin":
        overrides["role"] = "origin"
    if getattr(args, "demo", False):
        overrides["demo"] = True
    if args.port is not None:
        overrides["port"] = args.port
    if args.host is not None:
        overrides["host"] = args.host
    def load() -> Settings:
        return load_settings(os.environ, args.config, overrides)

    try:
        settings = load()
    except ConfigError as error:
        print(f"livedge: configuration problems:\n{error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        app = build_app(settings, loader=load)
    except KeyLoadError as error:
        print(f"livedge: JWT key problem: {error}", file=sys.stderr)
        return 2
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{shown_host}:{settings.port}"
    log.info("livedge listening", extra={"url": base})
    if settings.demo:
        try:
            print(f"livedge: demo stream at {base}/hls/demo/index.m3u8 "
                  f"(ffplay {base}/hls/demo/index.m3u8, or any HLS player)", file=sys.stderr)
        except OSError:
            pass  # stderr on a full disk (ENOSPC) or a closed pipe: a courtesy is no reason to die
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    worker_command = (sys.executable, "-m", "edge.cli", "serve", "--host", settings.host,
                      "--port", str(settings.port), *(("--config", args.config) if args.config
                                                      else ()))
    runner(serve(app, settings, settings.drain_seconds, worker_command))
    return 0


def _token(args: argparse.Namespace) -> int:
    if args.key:
        with open(args.key, encoding="utf-8") as file:
            key, algorithm = file.read(), args.algorithm
    else:
        key, algorithm = os.environ.get("JWT_SECRET", ""), "HS256"
        if not key:
            print("livedge token: set JWT_SECRET (the node's secret) or pass --key PRIVATE_KEY.pem",
                  file=sys.stderr)
            return 2
    scopes = [Scope(scope) for scope in args.scope.replace(",", " ").split()]
    print(issue_token(key, algorithm, scopes, args.stream, args.ttl, args.sub,
                      audience=os.environ.get("JWT_AUDIENCE") or DEFAULT_AUDIENCE,
                      issuer=os.environ.get("JWT_ISSUER")))
    return 0


def _publish(args: argparse.Namespace) -> int:
    """Push SOURCE into a node over WHIP (or, with --pull, ask the node to pull it)."""
    token = args.token or os.environ.get("LIVEDGE_TOKEN")
    base = args.url.rstrip("/")
    if args.pull:
        return _ask_node_to_pull(base, args.source, args.stream, token)
    from ingest.whip_client import WhipClientError, publish

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        asyncio.run(publish(args.source, f"{base}/whip/{args.stream}", token,
                            video_codec=args.video_codec, source_format=args.format,
                            loop_input=args.loop, ice_hosts=args.ice_host))
    except WhipClientError as error:
        print(f"livedge publish: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _ask_node_to_pull(base: str, source: str, stream: str, token: str | None) -> int:
    body = json.dumps({"name": stream, "url": source}).encode()
    request = urllib.request.Request(f"{base}/api/streams", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.loads(response.read())["playlist"])
    except urllib.error.HTTPError as error:
        print(f"livedge publish: {error.code} {error.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="livedge", description="Live-streaming edge node")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the edge node")
    serve.add_argument("--demo", action="store_true", help="also publish a test stream 'demo'")
    serve.add_argument("--config", help="TOML configuration file (environment variables win)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--host")
    serve.set_defaults(run=_serve)

    origin = commands.add_parser("origin", help="run the fleet's origin: directory and shield, "
                                                "no ingest (needs SEEDS or GOSSIP_KEYS)")
    origin.add_argument("--config", help="TOML configuration file (environment variables win)")
    origin.add_argument("--port", type=int)
    origin.add_argument("--host")
    origin.set_defaults(run=_serve)

    token = commands.add_parser("token", help="print a JWT signed with the configured key")
    token.add_argument("--scope", required=True, help="publish, play, admin (several: 'play publish')")
    token.add_argument("--stream", required=True, help="stream name or glob, e.g. 'cam-*'")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.add_argument("--sub", default="livedge-cli")
    token.add_argument("--key", help="PEM private key (default: HS256 with $JWT_SECRET)")
    token.add_argument("--algorithm", default="RS256", choices=["RS256", "ES256", "EdDSA"])
    token.set_defaults(run=_token)

    publish = commands.add_parser("publish", help="push a source into a node over WHIP")
    publish.add_argument("source", help="any FFmpeg-readable URL or file")
    publish.add_argument("--stream", required=True)
    publish.add_argument("--url", default="http://127.0.0.1:3000", help="the node")
    publish.add_argument("--token", help="publish token (default $LIVEDGE_TOKEN); admin with --pull")
    publish.add_argument("--video-codec", default="H264", choices=["H264", "VP8"])
    publish.add_argument("--format", help="FFmpeg input format (e.g. lavfi, v4l2)")
    publish.add_argument("--loop", action="store_true", help="loop a file source")
    publish.add_argument("--ice-host", action="append", default=[],
                         help="offer only this local address as an ICE candidate (repeatable)")
    publish.add_argument("--pull", action="store_true",
                         help="instead, ask the node to pull SOURCE itself (admin token)")
    publish.set_defaults(run=_publish)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
