"""The container image, built the documented way (scripts/build-image: a Debian base made with
debootstrap, wheels built on the host) and played through LL-HLS from a running container.

Needs root, Debian's docker.io and debootstrap (scripts/test installs them). When no Docker engine
answers, the fixture starts ``dockerd`` and stops that process, by its PID, at the end; it never
touches an engine it did not start. The base image stays in the engine's store between runs, so only
the first run on a machine pays for debootstrap (about a minute).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import av
import pytest

from bench.ports import free_port

REPO = Path(__file__).resolve().parent.parent
IMAGE_TAG = "livedge:ci"
# With --bridge=none a container has no network of its own, so it shares the host's.
DOCKERD_ARGS = ("--storage-driver=overlay2", "--iptables=false", "--bridge=none")
BUILD_TIMEOUT = 900  # seconds; a first build includes debootstrap


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def _engine_answers() -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=10, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory) -> Iterator[None]:
    """A Docker engine to talk to: the running one, or a ``dockerd`` started (and later stopped) here."""
    assert shutil.which("docker"), "no docker client: scripts/test installs Debian's docker.io"
    if _engine_answers():
        yield
        return
    assert os.geteuid() == 0, "starting dockerd needs root"
    assert shutil.which("dockerd"), "no dockerd: scripts/test installs Debian's docker.io"
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(["dockerd", *DOCKERD_ARGS], stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers():
            assert daemon.poll() is None, f"dockerd exited {daemon.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"dockerd did not answer:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)  # dockerd stops the containerd it started
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


@pytest.fixture(scope="module")
def image(docker_engine) -> str:
    """The image tag, built by scripts/build-image exactly as deploy/README.md documents."""
    started = time.monotonic()
    result = subprocess.run([str(REPO / "scripts" / "build-image"), IMAGE_TAG], cwd=REPO,
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert result.returncode == 0, f"build-image failed:\n{result.stderr[-6000:]}"
    print(f"\nscripts/build-image took {time.monotonic() - started:.1f} s")
    return IMAGE_TAG


def run_in_image(image: str, *command: str, entrypoint: str | None = None) -> str:
    prefix = ["--entrypoint", entrypoint] if entrypoint else []
    return docker("run", "--rm", "--network", "host", *prefix, image, *command).stdout


def test_image_holds_runtime_packages_only_and_runs_as_non_root(image):
    config = docker("image", "inspect", "--format",
                    "{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}|"
                    "{{json .Config.ExposedPorts}}", image).stdout.strip()
    user, entrypoint, cmd, ports = config.split("|")
    assert user == "10001:10001"
    assert (entrypoint, cmd) == ('["livedge"]', '["serve"]')
    for port in ("3000/tcp", "3001/tcp", "7946/tcp", "7946/udp", "40000/udp", "40099/udp"):
        assert f'"{port}"' in ports
    probe = ("import importlib.util as u, os; "
             "print(os.getuid(), [m for m in ('pip', 'setuptools', 'pytest', 'yamllint') "
             "if u.find_spec(m)])")
    assert run_in_image(image, "-c", probe, entrypoint="python3").split() == ["10001", "[]"]
    assert "serve" in run_in_image(image, "--help")
    # PyAV's wheel carries its own FFmpeg: the codecs the ladder needs load with no system library.
    codecs = run_in_image(image, "-c", "import av; [av.codec.Codec(n, 'w') for n in "
                          "('libx264', 'aac')]; print('ok', av.__version__)", entrypoint="python3")
    assert codecs.startswith("ok ")
    # The burst sender (edge/_sendmany.c) was compiled into livedge's wheel and loads here.
    assert run_in_image(image, "-c", "import edge.burst as b; print(b.Burst.__name__)",
                        entrypoint="python3").strip() == "Burst"


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _wait_for(url: str, pattern: str, timeout: float) -> str:
    """GET ``url`` until its body matches ``pattern``; the last body (text)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            last = _get(url).decode()
        except (OSError, urllib.error.HTTPError):
            last = ""
        if re.search(pattern, last, re.MULTILINE):
            return last
        time.sleep(0.25)
    raise AssertionError(f"{url} never matched {pattern!r}; last body:\n{last}")


def test_container_serves_the_demo_stream_over_ll_hls_and_drains_on_stop(image):
    port, ws_port = free_port(), free_port()
    container = docker(
        "run", "--detach", "--network", "host",
        # As deploy/k8s and compose run it: nothing but /tmp is writable.
        "--read-only", "--tmpfs", "/tmp",
        # The image's own HEALTHCHECK command, probed every second instead of every ten.
        "--health-interval", "1s", "--health-start-period", "20s",
        "--env", "HOST=127.0.0.1", "--env", f"PORT={port}", "--env", f"WS_PORT={ws_port}",
        "--env", "LADDER=360p:640x360:700k", "--env", "SEGMENT_DURATION=1",
        "--env", "PART_DURATION=0.25", "--env", "X264_PRESET=ultrafast",
        image, "serve", "--demo").stdout.strip()
    try:
        base = f"http://127.0.0.1:{port}"
        multivariant = _wait_for(f"{base}/hls/demo/index.m3u8", r"^#EXT-X-STREAM-INF:", 60)
        media_uri = next(line for line in multivariant.splitlines()
                         if line and not line.startswith("#"))
        assert media_uri == "360p/index.m3u8"
        playlist = _wait_for(f"{base}/hls/demo/{media_uri}", r"^#EXTINF:", 30)
        assert "#EXT-X-PART:" in playlist and "#EXT-X-PRELOAD-HINT:" in playlist
        init_uri = re.search(r'#EXT-X-MAP:URI="([^"]+)"', playlist).group(1)
        segment_uri = re.search(r"^#EXTINF:[^\n]*\n(?:#[^\n]*\n)*([^#\n][^\n]*)$", playlist,
                                re.MULTILINE).group(1)
        rendition = f"{base}/hls/demo/360p/"
        with av.open(io.BytesIO(_get(rendition + init_uri) + _get(rendition + segment_uri)),
                     format="mp4") as played:
            frames = list(played.decode(video=0))
        assert frames and (frames[0].width, frames[0].height) == (640, 360)
        assert len(frames) >= 15  # a 1 s segment at the demo's 30 fps

        _wait_for(f"{base}/readyz", r'"ready": true', 10)
        deadline = time.monotonic() + 20
        while (health := docker("inspect", "--format", "{{.State.Health.Status}}",
                                container).stdout.strip()) != "healthy":
            assert health == "starting" and time.monotonic() < deadline, health
            time.sleep(0.5)

        docker("stop", "--time", "20", container, timeout=40)
        exit_code = docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
        assert exit_code == "0", docker("logs", container, check=False).stderr[-4000:]
    finally:
        docker("rm", "--force", container, check=False)
