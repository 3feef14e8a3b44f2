"""Operating a node process: SIGTERM drains and exits 0, SIGHUP and /api/reload reload JWT keys."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

from edge.tokens import Scope, issue_token
from tests.nodes import running_node

OLD_SECRET = "old-secret-" + "o" * 32
NEW_SECRET = "new-secret-" + "n" * 32


def status_of(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_sigterm_exits_zero_and_logs_the_drain(tmp_path):
    with running_node(tmp_path, "--demo") as node:
        assert status_of(node.url + "/readyz") == 200
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=20) == 0
        log = node.log()
    assert "draining" in log and '"stopped"' in log
    assert "Traceback" not in log


def test_sighup_reloads_the_jwt_secret_from_the_config_file(tmp_path):
    config = tmp_path / "livedge.toml"
    config.write_text(f'jwt_secret = "{OLD_SECRET}"\n')
    old = issue_token(OLD_SECRET, "HS256", Scope.ADMIN, "*", 60, "ops")
    new = issue_token(NEW_SECRET, "HS256", Scope.ADMIN, "*", 60, "ops")
    # JWT_SECRET from the environment would win over the file: clear it for this node.
    with running_node(tmp_path, "--config", str(config), JWT_SECRET="") as node:
        assert status_of(node.url + "/api/streams", old) == 200
        config.write_text(f'jwt_secret = "{NEW_SECRET}"\n')
        node.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status_of(node.url + "/api/streams", new) != 200:
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.1)
        assert status_of(node.url + "/api/streams", old) == 401
        # A broken file is refused and the keys in use stay.
        config.write_text('jwt_secret = "short"\n')
        request = urllib.request.Request(node.url + "/api/reload", method="POST")
        request.add_header("Authorization", f"Bearer {new}")
        try:
            urllib.request.urlopen(request, timeout=5)
            raise AssertionError("reload of a bad config was accepted")
        except urllib.error.HTTPError as error:
            assert error.code == 400
        assert status_of(node.url + "/api/streams", new) == 200
