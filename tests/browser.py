"""Real headless Chromium for page tests, and a loopback-only network for it and the node.

Chromium and the node run inside one network namespace that holds nothing but ``lo`` (made by
``unshare --net``, held open by a sleeping process), so WebRTC's ICE can only ever find 127.0.0.1:
no test traffic can leave the machine, and no host interface changes what the test sees. The test
process stays outside; it drives Chromium through Playwright, which talks to the browser over pipes
(a wrapper script ``nsenter``s the namespace and execs Debian's ``/usr/bin/chromium``), and it reaches
the node over HTTP from a thread that has entered the namespace (``Namespace.call``). Needs root.

Chromium is Debian's package (``apt-get install chromium``), never a browser Playwright downloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from playwright.sync_api import BrowserContext, Page, sync_playwright

from tests.nodes import RunningNode, node_environment

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"  # screenshots kept for people to look at (gitignored)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
]
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class Namespace:
    """A network namespace with only loopback, alive while its holder process sleeps."""

    def __init__(self) -> None:
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE)
        if self._holder.stdout.readline().strip() != b"up":
            self._holder.wait()
            raise RuntimeError("could not make a network namespace (unshare --net needs root)")
        # unshare and sh exec, so the holder's pid is the sleeping process in the namespace.
        self.path = f"/proc/{self._holder.pid}/ns/net"
        self._next_port = 20000

    def port(self) -> int:
        """A port nothing in this namespace listens on (it starts empty; we hand them out)."""
        self._next_port += 1
        return self._next_port

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` run on a thread that has entered the namespace (sockets it opens are
        inside); the calling thread's own network is untouched."""
        outcome: dict[str, object] = {}

        def enter_and_run() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns into the test namespace failed")
                finally:
                    os.close(fd)
                outcome["value"] = function()
            except BaseException as error:  # handed to the caller
                outcome["error"] = error

        thread = threading.Thread(target=enter_and_run, name="in-namespace")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    def fetch(self, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``url`` from inside the namespace: (status, body)."""
        def get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()
        return self.call(get)

    def close(self) -> None:
        self._holder.kill()
        self._holder.wait()


@contextlib.contextmanager
def loopback_namespace() -> Iterator[Namespace]:
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.close()


@contextlib.contextmanager
def node_in(namespace: Namespace, log_dir: Path, *args: str, startup_timeout: float = 20.0,
            **env: str) -> Iterator[RunningNode]:
    """A ``livedge serve`` process inside ``namespace`` (as ``tests.nodes.running_node``, which
    polls from outside and so cannot be used here). ICE candidates are 127.0.0.1 only."""
    port, ws_port = namespace.port(), namespace.port()
    env = node_environment(WS_PORT=str(ws_port), WEBRTC_HOSTS="127.0.0.1", **env)
    log_path = log_dir / f"node-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            namespace.command([sys.executable, "-m", "edge.cli", "serve", "--host", "127.0.0.1",
                               "--port", str(port), *args]),
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    node = RunningNode(f"http://127.0.0.1:{port}", process, log_path, f"ws://127.0.0.1:{ws_port}")
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"node exited with {process.returncode}:\n{node.log()}")
            try:
                if namespace.fetch(node.url + "/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node did not start:\n{node.log()}")
            time.sleep(0.1)
        yield node
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # nsenter forwards it to the node
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def chromium_in(namespace: Namespace, work_dir: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh profile and fake camera, microphone and permission
    prompts, inside ``namespace``."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (scripts/test does)")
    wrapper = work_dir / "chromium-in-namespace"
    wrapper.write_text(f'#!/bin/sh\nexec nsenter --net={namespace.path} -- {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(work_dir / "profile"), executable_path=str(wrapper), args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


def page_errors(page: Page) -> list[str]:
    """A list that fills with the page's uncaught exceptions and console errors."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("console", lambda message: errors.append(f"console: {message.text}")
            if message.type == "error" else None)
    return errors


def screenshot(page: Page, name: str) -> Path:
    """Keep a full-page screenshot as ``test-artifacts/{name}.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
