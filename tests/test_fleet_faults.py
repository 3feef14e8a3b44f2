"""Faults in a fleet of real edge processes, each in its own network namespace.

Three ``livedge serve`` processes, one per network namespace, each namespace joined to one bridge by
a veth pair; they gossip on the namespace addresses, so kinship runs its ``lan`` preset (1 s probes,
0.5 s probe timeout, TCP fallback pings), the timings of a real network, not the loopback ones. The
bridge, the namespaces and the links are made by the test and deleted by name in a ``finally``.

Faults are iptables rules inside one edge's namespace, on its link: drop everything to and from the
other edges (a partition), or a random 30 % of it (a lossy link; ``tc netem`` would do the same, but
this kernel has no ``sch_netem``). The rules spare the bridge's own address, from which the test
process reads every edge's ``/api/cluster``, so it watches each edge's view through the fault.
Needs root, as the page tests do.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from kinship.rendezvous import owner as rendezvous_owner

from edge.tokens import Scope, issue_token
from tests.nodes import TEST_SECRET, node_environment
from tests.test_e2e_node import wait_for_segments

pytestmark = pytest.mark.timeout(120)
ADMIN = {"Authorization": "Bearer " + issue_token(TEST_SECRET, "HS256", Scope.ADMIN, "*", 86400,
                                                  "ops")}
REPO = Path(__file__).resolve().parent.parent
HTTP_PORT = 8080  # every edge has a namespace of its own, so they all use the same ports
WS_PORT = 8081
GOSSIP_PORT = 7946
POLL_TIMEOUT = aiohttp.ClientTimeout(total=3)


def run(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


# -- the network ----------------------------------------------------------------------------------
@dataclass(eq=False)  # one object per edge: hashed by identity
class Edge:
    name: str
    namespace: str
    link: str  # the edge's end of its veth pair, inside its namespace
    address: str
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _free_subnet() -> str:
    """A /24 of 198.18.0.0/15 (RFC 2544, set aside for benchmarks) no interface or route uses."""
    used = run("ip", "-o", "addr") + run("ip", "route")
    taken = [ipaddress.ip_network(text, strict=False)
             for text in re.findall(r"\b(198\.1[89]\.\d+\.\d+(?:/\d+)?)", used)]
    for third in range(os.getpid() % 200 + 20, 256):
        subnet = ipaddress.ip_network(f"198.18.{third}.0/24")
        if not any(subnet.overlaps(network) for network in taken):
            return f"198.18.{third}"
    raise RuntimeError("no free /24 in 198.18.0.0/16")


class Lab:
    """Edges in namespaces on one bridge. Use ``with Lab(tmp_path, 3) as lab:``; everything made
    (processes first, then namespaces, links, bridge) is removed by name on exit."""

    def __init__(self, tmp_path: Path, count: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.prefix = f"lvf{tag}"  # interface names stay within 15 characters
        self.subnet = _free_subnet()
        self.control = f"{self.subnet}.1"  # the bridge: the test process's address
        self.bridge = f"{self.prefix}b"
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.edges = [Edge(f"edge-{i}", f"{self.prefix}n{i}", f"{self.prefix}e{i}",
                           f"{self.subnet}.{i + 2}", tmp_path / f"edge-{i}.log")
                      for i in range(count)]
        self._made_links: list[str] = []
        self._made_namespaces: list[str] = []
        self._made_bridge = False

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _build(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        run("ip", "addr", "add", f"{self.control}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for index, edge in enumerate(self.edges):
            host_end = f"{self.prefix}h{index}"
            run("ip", "netns", "add", edge.namespace)
            self._made_namespaces.append(edge.namespace)
            run("ip", "link", "add", host_end, "type", "veth", "peer", "name", edge.link)
            self._made_links.append(host_end)
            run("ip", "link", "set", edge.link, "netns", edge.namespace)
            run("ip", "link", "set", host_end, "master", self.bridge)
            run("ip", "link", "set", host_end, "up")
            run("ip", "-n", edge.namespace, "addr", "add", f"{edge.address}/24", "dev", edge.link)
            run("ip", "-n", edge.namespace, "link", "set", edge.link, "up")
            run("ip", "-n", edge.namespace, "link", "set", "lo", "up")

    def close(self) -> None:
        for edge in self.edges:
            stop(edge)
        for namespace in self._made_namespaces:  # takes the edge's end of its veth with it
            run("ip", "netns", "del", namespace, check=False)
        for link in self._made_links:  # gone with its peer already, unless the move failed
            if run("ip", "-o", "link", "show", link, check=False):
                run("ip", "link", "del", link, check=False)
        if self._made_bridge:
            run("ip", "link", "del", self.bridge, check=False)

    # -- edges ------------------------------------------------------------------------------------
    def start(self, *edges_and_args: tuple[Edge, tuple[str, ...]]) -> None:
        """Start the edges (each with its CLI args) together; the first is every edge's seed."""
        seed = f"{edges_and_args[0][0].address}:{GOSSIP_PORT}"
        for edge, args in edges_and_args:
            env = node_environment(NODE_NAME=edge.name, GOSSIP_BIND=f"{edge.address}:{GOSSIP_PORT}",
                                   SEEDS=seed, GOSSIP_KEYS=self.key, WS_PORT=str(WS_PORT),
                                   ADVERTISE_URL=edge.url)
            with open(edge.log_path, "wb") as log_file:
                # ``ip netns exec`` execs the command: the Popen pid is the edge itself.
                edge.process = subprocess.Popen(
                    ["ip", "netns", "exec", edge.namespace, sys.executable, "-m", "edge.cli",
                     "serve", "--host", edge.address, "--port", str(HTTP_PORT), *args],
                    env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        for edge, _ in edges_and_args:
            wait_healthy(edge)

    # -- faults -----------------------------------------------------------------------------------
    def _drop(self, edge: Edge, *match: str) -> None:
        """Drop packets on ``edge``'s link, both ways, except to and from the test process."""
        ipt = ("ip", "netns", "exec", edge.namespace, "iptables")
        run(*ipt, "-A", "INPUT", "-i", edge.link, "!", "-s", self.control, *match, "-j", "DROP")
        run(*ipt, "-A", "OUTPUT", "-o", edge.link, "!", "-d", self.control, *match, "-j", "DROP")

    def partition(self, edge: Edge) -> None:
        self._drop(edge)

    def lossy(self, edge: Edge, probability: float) -> None:
        self._drop(edge, "-m", "statistic", "--mode", "random", "--probability", str(probability))

    def heal(self, edge: Edge) -> None:
        for chain in ("INPUT", "OUTPUT"):
            run("ip", "netns", "exec", edge.namespace, "iptables", "-F", chain)

    def dropped(self, edge: Edge) -> int:
        """Packets the fault rules on ``edge`` dropped so far."""
        table = run("ip", "netns", "exec", edge.namespace, "iptables", "-n", "-v", "-x", "-L")
        return sum(int(line.split()[0]) for line in table.splitlines()
                   if line.split()[2:3] == ["DROP"])


def wait_healthy(edge: Edge, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert edge.process is not None
        if edge.process.poll() is not None:
            raise RuntimeError(f"{edge.name} exited with {edge.process.returncode}:\n{edge.log()}")
        try:
            with urllib.request.urlopen(edge.url + "/healthz", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{edge.name} did not start:\n{edge.log()}") from None
            time.sleep(0.1)


def stop(edge: Edge) -> None:
    process = edge.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- what the edges say ---------------------------------------------------------------------------
async def view(session: aiohttp.ClientSession, edge: Edge) -> dict:
    async with session.get(f"{edge.url}/api/cluster", headers=ADMIN,
                           timeout=POLL_TIMEOUT) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def members(document: dict) -> list[str]:
    return [member["name"] for member in document["members"]]


def state(document: dict, name: str) -> str:
    return document["membership"]["states"].get(name, "unknown")


async def until(predicate, timeout: float, what: str, interval: float = 0.1) -> float:
    """Seconds until ``await predicate()`` is true; fails after ``timeout``."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, what
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def converged(session: aiohttp.ClientSession, lab: Lab,
                    streams: dict[str, str] | None = None) -> bool:
    """Every edge lists every edge, all alive, and (if given) the same stream directory."""
    names = sorted(edge.name for edge in lab.edges)
    for edge in lab.edges:
        document = await view(session, edge)
        if members(document) != names or any(state(document, name) != "alive"
                                             for name in names if name != edge.name):
            return False
        if streams is not None and document["streams"] != streams:
            return False
    return True


# -- an LL-HLS viewer ------------------------------------------------------------------------------
_HINT = re.compile(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"')
_PART = re.compile(r'#EXT-X-PART:[^\n]*URI="part(\d+)\.(\d+)\.m4s"')


@dataclass
class Viewing:
    """What viewers of one edge got: (what, status or error name) per request, objects asked."""

    answers: list[tuple[str, object]] = field(default_factory=list)
    objects: set[str] = field(default_factory=set)

    def failures(self) -> list[tuple[str, object]]:
        return [answer for answer in self.answers if answer[1] != 200]


async def viewer(session: aiohttp.ClientSession, edge: Edge, rendition: str, stop_at: float,
                 seen: Viewing) -> None:
    """Follow ``rendition`` of the demo as an LL-HLS player does until ``stop_at`` (monotonic):
    join at the live edge, fetch the init segment, then a blocking reload for the hinted part and
    a GET of every part listed since the last answer."""
    base = f"{edge.url}/hls/demo/{rendition}"

    async def fetch(what: str, url: str) -> tuple[object, str]:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=8)) as response:
                body = await response.read()
                seen.answers.append((what, response.status))
                return response.status, body.decode(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            seen.answers.append((what, type(error).__name__))
            return None, ""

    newest: tuple[int, int] | None = None
    hint = None
    while time.monotonic() < stop_at:
        if hint is None:  # joining (or after an error): the live edge, nothing older
            status, body = await fetch("playlist", f"{base}/index.m3u8")
            if status != 200:
                await asyncio.sleep(0.2)
                continue
            if newest is None:
                seen.objects.add(f"{rendition}/init.mp4")
                await fetch("init.mp4", f"{base}/init.mp4")
        else:
            status, body = await fetch(
                "reload", f"{base}/index.m3u8?_HLS_msn={hint[1]}&_HLS_part={hint[2]}")
            if status != 200:
                hint = None
                continue
        listed = [(int(msn), int(index)) for msn, index in _PART.findall(body)]
        fresh = [part for part in listed if newest is not None and part > newest]
        newest = max(listed, default=newest)
        for msn, index in fresh:
            name = f"part{msn}.{index}.m4s"
            seen.objects.add(f"{rendition}/{name}")
            await fetch(name, f"{base}/{name}")
        hint = _HINT.search(body)


async def watch(session, viewers: dict[Edge, int], seconds: float,
                rendition: str = "180p") -> dict[str, Viewing]:
    stop_at = time.monotonic() + seconds
    seen = {edge.name: Viewing() for edge in viewers}
    await asyncio.gather(*(viewer(session, edge, rendition, stop_at, seen[edge.name])
                           for edge, count in viewers.items() for _ in range(count)))
    return seen


# -- the tests ------------------------------------------------------------------------------------
async def test_a_partitioned_edge_is_declared_dead_and_the_view_converges_when_it_heals(tmp_path):
    """Cut off from the other edges, an edge is suspected then declared dead by them (and suspects
    them in turn); once the link heals, every edge lists every edge alive again, with the same
    stream directory, and the cut edge plays the stream ingested elsewhere."""
    with Lab(tmp_path, 3) as lab:
        ingesting, cut, other = lab.edges
        lab.start((ingesting, ("--demo",)), (cut, ()), (other, ()))
        async with aiohttp.ClientSession() as session:
            directory = {"demo": ingesting.name}
            await until(lambda: converged(session, lab, directory), 30, "no first convergence")
            lab.partition(cut)

            async def others_see_it(expected: tuple[str, ...]) -> bool:
                views = [await view(session, edge) for edge in (ingesting, other)]
                return all(state(document, cut.name) in expected for document in views)
            suspected = await until(lambda: others_see_it(("suspect", "dead")), 10,
                                    "the cut edge was never suspected")
            dead = await until(lambda: others_see_it(("dead",)), 20,
                               "the cut edge was never declared dead") + suspected

            # The cut edge suspects both others too. It takes far longer to declare them dead:
            # every probe it sends fails, so Lifeguard's local health slows its own accusations.
            async def cut_edge_routes_around_them() -> bool:
                document = await view(session, cut)  # the test's own address is spared
                return all(state(document, edge.name) in ("suspect", "dead")
                           for edge in (ingesting, other))
            await until(cut_edge_routes_around_them, 10, "the cut edge still trusts the others")
            for edge in (ingesting, other):
                document = await view(session, edge)
                assert members(document) == [ingesting.name, other.name]
                assert document["streams"] == directory
            assert lab.dropped(cut) > 0

            lab.heal(cut)
            healed = await until(lambda: converged(session, lab, directory), 45,
                                 "the view did not converge after the partition healed")
            # Peer fill works again: the cut edge plays the stream ingested elsewhere.
            await wait_for_segments(session, f"{cut.url}/hls/demo/180p/index.m3u8", 2, timeout=20)
            print(f"\npartition (lan preset): suspected after {suspected:.1f} s, dead after "
                  f"{dead:.1f} s; converged {healed:.1f} s after healing")


async def test_thirty_percent_packet_loss_kills_nobody(tmp_path):
    """30 s of 30 % random loss on one edge's link, both ways: suspicions come and are refuted,
    but no edge ever leaves any edge's table and no death is ever declared (kinship's events are
    counted, so a death between two polls counts too)."""
    with Lab(tmp_path, 3) as lab:
        lossy = lab.edges[1]
        lab.start(*((edge, ()) for edge in lab.edges))
        names = [edge.name for edge in lab.edges]
        async with aiohttp.ClientSession() as session:
            await until(lambda: converged(session, lab), 30, "no first convergence")
            lab.lossy(lossy, 0.3)
            polls = 0
            ends_at = time.monotonic() + 30
            while time.monotonic() < ends_at:
                for edge in lab.edges:
                    document = await view(session, edge)
                    # Suspicions come and go under loss; a suspect stays listed (routed around).
                    assert members(document) == names, (edge.name, document["membership"])
                    assert all(state(document, name) in ("alive", "suspect")
                               for name in names if name != edge.name), document["membership"]
                polls += 1
                await asyncio.sleep(0.2)
            views = [await view(session, edge) for edge in lab.edges]
            assert [document["membership"]["deaths"] for document in views] == [0, 0, 0]
            dropped = lab.dropped(lossy)
            assert dropped > 50  # the link really lost packets (gossip is about 10 a second)
            suspicions = [document["membership"]["suspicions"] for document in views]
            print(f"\n30% loss for 30 s (lan preset): {dropped} packets dropped, {polls} polls "
                  f"of every edge, suspicions seen per edge {suspicions}, deaths 0")


async def test_an_edge_killed_mid_stream_is_declared_dead_and_other_viewers_see_no_error(
        tmp_path):
    """With viewers on two edges, each object is fetched upstream once per edge. Then the stream's
    rendezvous owner is killed (SIGKILL): the survivors route around it within 5 s and declare it
    dead (with the lan preset a suspicion lasts about 4 s more), and viewers of the other edge get
    nothing but 200s throughout."""
    with Lab(tmp_path, 3) as lab:
        ingesting, killed, watched = lab.edges
        # The edge killed is the stream's rendezvous owner: the other edge fills through it.
        assert rendezvous_owner("demo", [edge.name for edge in lab.edges]) == killed.name
        lab.start((ingesting, ("--demo",)), (killed, ()), (watched, ()))
        async with aiohttp.ClientSession() as session:
            directory = {"demo": ingesting.name}
            await until(lambda: converged(session, lab, directory), 30, "no first convergence")
            for edge in (killed, watched):
                await wait_for_segments(session, f"{edge.url}/hls/demo/180p/index.m3u8", 2)

            # Several viewers on each edge: one upstream fetch of each object per edge, and the
            # ingesting edge serves each object once (to the owner, which serves the other edge).
            before = {edge.name: await view(session, edge) for edge in lab.edges}
            seen = await watch(session, {killed: 3, watched: 3}, seconds=4)
            after = {edge.name: await view(session, edge) for edge in lab.edges}

            def grew(name: str, counter: str) -> int:
                return after[name][counter] - before[name][counter]
            assert not seen[killed.name].failures() and not seen[watched.name].failures()
            asked_killed, asked_watched = seen[killed.name].objects, seen[watched.name].objects
            assert len(asked_watched) >= 8  # init + parts of about 4 s
            assert 0 < grew(watched.name, "upstream_fetches") <= len(asked_watched)
            assert 0 < grew(killed.name, "upstream_fetches") <= len(asked_killed | asked_watched)
            assert 0 < grew(killed.name, "served_to_peers") <= len(asked_watched)
            assert 0 < grew(ingesting.name, "served_to_peers") <= len(asked_killed | asked_watched)
            counts = (f"objects asked: {len(asked_killed)} on {killed.name}, {len(asked_watched)} "
                      f"on {watched.name}; upstream fetches: "
                      + ", ".join(f"{name} {grew(name, 'upstream_fetches')}" for name in after)
                      + f"; served to peers by {ingesting.name}: "
                      f"{grew(ingesting.name, 'served_to_peers')}")

            # Kill the owner mid-stream while viewers of the other edge keep watching.
            watching = asyncio.create_task(watch(session, {watched: 3}, seconds=14))
            await asyncio.sleep(2)
            served_before = (await view(session, ingesting))["served_to_peers"]
            killed.process.kill()  # SIGKILL: no leave message

            async def survivors_see(expected: tuple[str, ...]) -> bool:
                views = [await view(session, edge) for edge in (ingesting, watched)]
                return all(state(document, killed.name) in expected for document in views)
            routed_around = await until(lambda: survivors_see(("suspect", "dead")), 10,
                                        "the killed edge was never suspected")
            # lan preset: suspicion lasts at least 4 x log10(3) x 1 s and at most 6 times that.
            dead = await until(lambda: survivors_see(("dead",)), 15,
                               "the killed edge was never declared dead") + routed_around
            seen_during = await watching
            failures = seen_during[watched.name].failures()
            assert not failures, failures
            assert len(seen_during[watched.name].answers) > 40
            assert (await view(session, ingesting))["served_to_peers"] > served_before
            for edge in (ingesting, watched):
                assert members(await view(session, edge)) == [ingesting.name, watched.name]
            assert routed_around < 5.0, f"routed around after {routed_around:.1f} s"
            print(f"\n{counts}\nkilled owner (lan preset): routed around (suspect) after "
                  f"{routed_around:.2f} s, dead after {dead:.2f} s; "
                  f"{len(seen_during[watched.name].answers)} viewer requests on "
                  f"{watched.name}, all 200")
