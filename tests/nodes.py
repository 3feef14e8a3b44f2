"""Real livedge nodes for end-to-end tests: a ``livedge serve`` process on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prometheus_client.parser import text_string_to_metric_families

from bench.ports import free_port

# A small ladder keeps two cores ahead of real time with the 720p demo source.
SMALL_LADDER = "360p:640x360:700k,180p:320x180:250k"
TEST_SECRET = "test-secret-" + "x" * 32


@dataclass
class RunningNode:
    url: str
    process: subprocess.Popen
    log_path: Path
    ws_url: str  # the WebSocket ingest server, ws://127.0.0.1:WS_PORT

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def node_environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PORT", "HOST")}
    env.update({"JWT_SECRET": TEST_SECRET, "LADDER": SMALL_LADDER, "SEGMENT_DURATION": "1",
                "PART_DURATION": "0.25", "X264_PRESET": "ultrafast", "LOG_LEVEL": "info"})
    env.update(extra)
    return env


@contextlib.contextmanager
def running_node(tmp_path: Path, *args: str, startup_timeout: float = 40.0,
                 port: int | None = None, command: str = "serve",
                 **env: str) -> Iterator[RunningNode]:
    port = port or free_port()
    env.setdefault("WS_PORT", str(free_port()))
    log_path = tmp_path / f"node-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", command, "--host", "127.0.0.1", "--port", str(port),
             *args], env=node_environment(**env), stdout=log_file, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent)
    node = RunningNode(f"http://127.0.0.1:{port}", process, log_path,
                       f"ws://127.0.0.1:{env['WS_PORT']}")
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"node exited with {process.returncode}:\n{node.log()}")
            try:
                with urllib.request.urlopen(node.url + "/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node did not start:\n{node.log()}") from None
                time.sleep(0.1)
        yield node
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The node's /metrics text, and its samples keyed (name, sorted labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples
