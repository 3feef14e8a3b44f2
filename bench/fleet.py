"""Origin offload in a fleet: upstream fetches per new part as LL-HLS viewers grow, and failure
detection under that load.

Three ``livedge serve`` processes on 127.0.0.1 form a fleet (``SEEDS``, ``GOSSIP_KEYS``,
``GOSSIP_BIND``, ``ADVERTISE_URL``, ``NODE_NAME``); edge-0 ingests ``--demo``. Simulated LL-HLS
viewers (``bench.loadclient.follow``: blocking reloads of the preload hint, then a GET of every new
part) run in a separate process, spread over the fleet: 45 % on edge-1, 45 % on edge-2 and 10 % on
the ingesting edge-0. For each viewer count the bench reads every edge's ``/api/cluster`` at the
start and end of a measured window and counts the parts edge-0 produced in it (from its own
playlist), then reports, per new part of the renditions followed:

- ``served_to_peers`` growth at edge-0: what the ingesting edge serves to the fleet. The target is
  one fetch of each object: the rendezvous owner of the stream (edge-1 for ``demo`` among these
  three names) asks edge-0, and the other edge asks the owner;
- ``upstream_fetches`` growth at each other edge: the target is one fetch of each object per edge,
  flat as viewers grow (viewers of one edge share one fetch: memory tier and request coalescing).

Then, at the largest viewer count, the owner (edge-1) is killed with SIGKILL: the bench times how
long edge-0 and edge-2 take to route around it (suspect) and to declare it dead, and counts the
viewers' errors on edge-0 and edge-2 (target: none) and the false suspicions and deaths of live
members during every window (target: none). On 127.0.0.1 kinship runs its ``local`` preset (200 ms
probes); ``tests/test_fleet_faults.py`` measures the ``lan`` preset in network namespaces.

Everything runs on 127.0.0.1 with bounded loops; the edges are stopped by PID at the end.

    .venv/bin/python -m bench.fleet [--steps 30,100,300] [--seconds 15] [--audio]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from kinship.rendezvous import owner as rendezvous_owner

from bench.load import BENCH_SECRET, NodeProcess, cpu_share, launch_node, raise_fd_limit
from bench.loadclient import (FollowSettings, ViewerStats, follow, latencies, listed_parts,
                              loop_lag_probe, percentile)
from bench.ports import free_port
from edge.tokens import Scope, issue_token

REPO = Path(__file__).resolve().parent.parent
STREAM = "demo"
RENDITION = "180p"
SHARES = (0.10, 0.45, 0.45)  # viewers on edge-0 (ingesting), edge-1, edge-2
ADMIN_TOKEN = issue_token(BENCH_SECRET, "HS256", Scope.ADMIN, "*", 86400, "bench")


# -- the fleet -------------------------------------------------------------------------------------
@dataclass
class Edge:
    name: str
    node: NodeProcess

    @property
    def url(self) -> str:
        return self.node.url


@contextlib.contextmanager
def fleet(workdir: Path, segment: float, part: float) -> Iterator[list[Edge]]:
    key = base64.b64encode(os.urandom(32)).decode()
    gossip = [free_port() for _ in range(3)]
    http = [free_port() for _ in range(3)]
    edges: list[Edge] = []
    try:
        for index in range(3):
            name = f"edge-{index}"
            node = launch_node(
                workdir / name, *(("--demo",) if index == 0 else ()), port=http[index],
                NODE_NAME=name, GOSSIP_BIND=f"127.0.0.1:{gossip[index]}",
                SEEDS=f"127.0.0.1:{gossip[0]}", GOSSIP_KEYS=key,
                ADVERTISE_URL=f"http://127.0.0.1:{http[index]}", SEGMENT_DURATION=str(segment),
                PART_DURATION=str(part), LOG_LEVEL="warning")
            edges.append(Edge(name, node))
        yield edges
    finally:
        for edge in edges:
            if edge.node.alive():
                edge.node.stop()


def cluster(edge: Edge, timeout: float = 2.0) -> dict | None:
    """``/api/cluster`` of ``edge``; None if it does not answer."""
    request = urllib.request.Request(f"{edge.url}/api/cluster",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except OSError:
        return None


def wait_converged(edges: list[Edge], timeout: float = 60.0) -> None:
    names = [edge.name for edge in edges]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [cluster(edge) for edge in edges]
        if all(view and [m["name"] for m in view["members"]] == names
               and view["streams"].get(STREAM) == edges[0].name for view in views):
            playlists = [playlist(edge) for edge in edges]
            if all(text and text.count(b"#EXTINF") >= 2 for text in playlists):
                return
        time.sleep(0.5)
    raise RuntimeError("the fleet did not converge on the demo stream")


def playlist(edge: Edge, rendition: str = RENDITION) -> bytes | None:
    try:
        with urllib.request.urlopen(f"{edge.url}/hls/{STREAM}/{rendition}/index.m3u8",
                                    timeout=2) as response:
            return response.read()
    except OSError:
        return None


def counters(edge: Edge) -> dict[str, int]:
    """The fleet counters of ``edge`` (upstream fetches, objects served to peers, suspicions and
    deaths its membership saw)."""
    view = cluster(edge)
    if view is None:
        raise RuntimeError(f"{edge.name} does not answer /api/cluster")
    return {"upstream_fetches": view["upstream_fetches"],
            "served_to_peers": view["served_to_peers"],
            "suspicions": view["membership"]["suspicions"],
            "deaths": view["membership"]["deaths"]}


def state_of(view: dict | None, name: str) -> str:
    return view["membership"]["states"].get(name, "unknown") if view else "no answer"


# -- the viewers' process --------------------------------------------------------------------------
def viewer_counts(total: int) -> list[int]:
    counts = [int(total * share) for share in SHARES]
    counts[1] += total - sum(counts)
    return counts


async def run_viewers(targets: list[tuple[str, int]], playlists: list[str], measure_from: float,
                      stop_at: float, ramp: float) -> dict:
    """``count`` viewers on each edge URL of ``targets``, joining over ``ramp`` seconds, each
    following every playlist of ``playlists``; one report per edge URL, plus the generator's own
    CPU (cores) and event-loop lag (its saturation)."""
    stats = {url: ViewerStats() for url, _ in targets}
    lags: list[float] = []
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    tasks = [asyncio.create_task(loop_lag_probe(stop_at, lags))]
    total = sum(count for _, count in targets)
    # Interleaved, so every edge's viewers join over the whole ramp.
    order = sorted(((url, number / count) for url, count in targets for number in range(count)),
                   key=lambda item: item[1])
    for url, _ in order:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        settings = FollowSettings(host, int(port), measure_from, stop_at)
        for name in playlists:
            tasks.append(asyncio.create_task(follow(name, settings, stats[url])))
        await asyncio.sleep(ramp / max(1, total))
    await asyncio.gather(*tasks)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report: dict = {}
    for url, seen in stats.items():
        entry = asdict(seen)
        entry.update(latencies(entry.pop("records")))
        report[url] = entry
    cpu = (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    report["generator"] = {"cpu": cpu / (time.time() - started),
                           "loop_lag_p99": percentile(lags, 0.99)}
    return report


def viewers_main(args: argparse.Namespace) -> None:
    targets = [(text.rsplit("=", 1)[0], int(text.rsplit("=", 1)[1])) for text in args.edge]
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    report = runner(run_viewers(targets, args.playlist, args.measure_from, args.stop_at,
                                args.ramp))
    json.dump(report, sys.stdout)


def start_viewers(edges: list[Edge], total: int, playlists: list[str], measure_from: float,
                  stop_at: float, ramp: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "bench.fleet", "viewers", "--measure-from", str(measure_from),
            "--stop-at", str(stop_at), "--ramp", str(ramp)]
    for edge, count in zip(edges, viewer_counts(total)):
        argv += ["--edge", f"{edge.url}={count}"]
    for name in playlists:
        argv += ["--playlist", name]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO)


# -- one measured step -----------------------------------------------------------------------------
@dataclass
class Step:
    viewers: int
    seconds: float
    parts: int  # new parts of the followed renditions produced by edge-0 in the window
    served_by_ingest: int  # served_to_peers growth at edge-0
    upstream: dict[str, int]  # upstream_fetches growth per edge
    false_suspicions: int  # suspicions of live members seen during the window, all edges
    false_deaths: int
    cpu: dict[str, float]  # cores per edge process
    viewer_report: dict  # per edge name
    generator: dict  # the viewers' process: cpu (cores), loop_lag_p99 (seconds)

    def per_part(self, count: int) -> float:
        return count / self.parts if self.parts else float("nan")


def sample_parts(edge: Edge, renditions: list[str], seen: set) -> None:
    for rendition in renditions:
        text = playlist(edge, rendition)
        if text:
            seen.update((rendition, part.msn, part.index) for part in listed_parts(text))


def measure(edges: list[Edge], viewers: int, playlists: list[str], seconds: float,
            ramp: float, warmup: float) -> Step:
    renditions = [name.split("/", 1)[1] for name in playlists]
    measure_from = time.time() + ramp + warmup + 1.0
    stop_at = measure_from + seconds
    process = start_viewers(edges, viewers, playlists, measure_from, stop_at, ramp)
    try:
        before_parts: set = set()
        while time.time() < measure_from:
            sample_parts(edges[0], renditions, before_parts)
            time.sleep(0.5)
        sample_parts(edges[0], renditions, before_parts)  # the newest before the window
        before = {edge.name: counters(edge) for edge in edges}
        cpu_before = {edge.name: edge.node.sample() for edge in edges}
        window_parts: set = set()
        while time.time() < stop_at:
            sample_parts(edges[0], renditions, window_parts)
            time.sleep(0.5)
        after = {edge.name: counters(edge) for edge in edges}
        cpu_after = {edge.name: edge.node.sample() for edge in edges}
        sample_parts(edges[0], renditions, window_parts)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    by_url = json.loads(output)
    report = {edge.name: by_url.get(edge.url, {}) for edge in edges}
    generator = by_url.get("generator", {})

    def grew(name: str, counter: str) -> int:
        return after[name][counter] - before[name][counter]
    return Step(
        viewers, seconds, len(window_parts - before_parts),
        grew(edges[0].name, "served_to_peers"),
        {edge.name: grew(edge.name, "upstream_fetches") for edge in edges},
        sum(grew(edge.name, "suspicions") for edge in edges),
        sum(grew(edge.name, "deaths") for edge in edges),
        {name: cpu_share(cpu_before[name], cpu_after[name]) for name in cpu_before},
        report, generator)


# -- the kill --------------------------------------------------------------------------------------
@dataclass
class Kill:
    viewers: int
    routed_around: dict[str, float]  # survivor -> seconds from the kill to suspect (or dead)
    dead: dict[str, float]  # survivor -> seconds from the kill to dead
    false_suspicions: int  # suspicions of survivors during the run, all survivors
    false_deaths: int
    viewer_report: dict


def kill_owner(edges: list[Edge], viewers: int, playlists: list[str], ramp: float,
               warmup: float, after: float = 12.0) -> Kill:
    victim = edges[1]
    survivors = [edges[0], edges[2]]
    measure_from = time.time() + ramp + warmup + 1.0
    kill_at = measure_from + 3.0
    stop_at = kill_at + after
    process = start_viewers(edges, viewers, playlists, measure_from, stop_at, ramp)
    try:
        while time.time() < measure_from:
            time.sleep(0.2)
        before = {edge.name: counters(edge) for edge in survivors}
        while time.time() < kill_at:
            time.sleep(0.05)
        victim.node.kill()
        killed = time.monotonic()
        routed: dict[str, float] = {}
        dead: dict[str, float] = {}
        while time.time() < stop_at and len(dead) < len(survivors):
            for edge in survivors:
                state = state_of(cluster(edge, timeout=1.0), victim.name)
                if state in ("suspect", "dead") and edge.name not in routed:
                    routed[edge.name] = time.monotonic() - killed
                if state == "dead" and edge.name not in dead:
                    dead[edge.name] = time.monotonic() - killed
            time.sleep(0.05)
        while time.time() < stop_at:
            time.sleep(0.2)
        end = {edge.name: counters(edge) for edge in survivors}
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    by_url = json.loads(output)
    suspicions = sum(end[name]["suspicions"] - before[name]["suspicions"] for name in end)
    deaths = sum(end[name]["deaths"] - before[name]["deaths"] for name in end)
    # Each survivor suspects the victim once and declares it dead once: those are not false.
    return Kill(viewers, routed, dead, max(0, suspicions - len(survivors)),
                max(0, deaths - len(survivors)),
                {edge.name: by_url.get(edge.url, {}) for edge in edges})


# -- report ----------------------------------------------------------------------------------------
def errors(entry: dict) -> int:
    return sum(entry.get("errors", {}).values()) + sum(entry.get("statuses", {}).values())


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def step_table(steps: list[Step]) -> str:
    lines = ["| viewers (edge-0/1/2) | new parts | edge-0 served to peers per part | "
             "upstream fetches per part (edge-1 / edge-2) | parts delivered | errors | "
             "delivery p50 / p99 (worst edge) | false suspicions / deaths | "
             "CPU edge-0 / 1 / 2 / viewers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for step in steps:
        counts = "/".join(str(count) for count in viewer_counts(step.viewers))
        report = step.viewer_report
        delivery = [entry["delivery"] for entry in report.values() if entry.get("delivery")]
        delivered = sum(d["count"] for d in delivery)
        failures = sum(errors(entry) for entry in report.values())
        p50 = max((d["p50"] for d in delivery if d["p50"] is not None), default=None)
        p99 = max((d["p99"] for d in delivery if d["p99"] is not None), default=None)
        cpu = " / ".join(f"{step.cpu[name]:.2f}" for name in sorted(step.cpu))
        cpu += f" / {step.generator.get('cpu', float('nan')):.2f}"
        lines.append(
            f"| {step.viewers} ({counts}) | {step.parts} | "
            f"{step.per_part(step.served_by_ingest):.2f} | "
            f"{step.per_part(step.upstream['edge-1']):.2f} / "
            f"{step.per_part(step.upstream['edge-2']):.2f} | {delivered} | {failures} | "
            f"{ms(p50)} / {ms(p99)} | {step.false_suspicions} / {step.false_deaths} | {cpu} |")
    return "\n".join(lines)


def kill_table(kill: Kill) -> str:
    report = kill.viewer_report
    lines = ["| viewers | routed around (suspect) edge-0 / edge-2 | dead edge-0 / edge-2 | "
             "errors on edge-0 / edge-2 (survivors) | errors on edge-1 (killed) | "
             "false suspicions / deaths |", "|---|---|---|---|---|---|"]

    def seconds(values: dict[str, float], name: str) -> str:
        return f"{values[name]:.2f} s" if name in values else "not seen"
    lines.append(
        f"| {kill.viewers} | {seconds(kill.routed_around, 'edge-0')} / "
        f"{seconds(kill.routed_around, 'edge-2')} | {seconds(kill.dead, 'edge-0')} / "
        f"{seconds(kill.dead, 'edge-2')} | {errors(report['edge-0'])} / "
        f"{errors(report['edge-2'])} | {errors(report['edge-1'])} | "
        f"{kill.false_suspicions} / {kill.false_deaths} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    inner = commands.add_parser("viewers", help="(internal) the viewers' process")
    inner.add_argument("--edge", action="append", required=True, help="URL=count")
    inner.add_argument("--playlist", action="append", required=True)
    inner.add_argument("--measure-from", type=float, required=True)
    inner.add_argument("--stop-at", type=float, required=True)
    inner.add_argument("--ramp", type=float, default=3.0)
    parser.add_argument("--steps", default="30,100,300")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per step")
    parser.add_argument("--segment", type=float, default=2.0)
    parser.add_argument("--part", type=float, default=0.5)
    parser.add_argument("--audio", action="store_true", help="viewers also follow the audio")
    parser.add_argument("--no-kill", action="store_true")
    args = parser.parse_args()
    if args.command == "viewers":
        viewers_main(args)
        return
    steps = [int(text) for text in args.steps.split(",")]
    raise_fd_limit(4 * max(steps) + 1024)
    playlists = [f"{STREAM}/{RENDITION}"] + ([f"{STREAM}/audio"] if args.audio else [])
    names = ["edge-0", "edge-1", "edge-2"]
    assert rendezvous_owner(STREAM, names) == "edge-1"  # the kill below takes out the owner
    with tempfile.TemporaryDirectory(prefix="livedge-fleet-") as workdir, \
            fleet(Path(workdir), args.segment, args.part) as edges:
        wait_converged(edges)
        results: list[Step] = []
        for viewers in steps:
            step = measure(edges, viewers, playlists, args.seconds, ramp=min(5.0, viewers / 50),
                           warmup=3.0)
            results.append(step)
            print(step_table([step]).splitlines()[-1], flush=True)
        print()
        print(f"segments {args.segment} s, parts {args.part} s, following "
              f"{', '.join(playlists)}; {args.seconds:.0f} s windows")
        print(step_table(results))
        if not args.no_kill:
            kill = kill_owner(edges, max(steps), playlists, ramp=min(5.0, max(steps) / 50),
                              warmup=3.0)
            print()
            print(kill_table(kill))
            for name, entry in kill.viewer_report.items():
                print(f"  {name}: errors {entry.get('errors')}, statuses {entry.get('statuses')}")


if __name__ == "__main__":
    main()
