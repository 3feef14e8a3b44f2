"""The pages as files and as HTTP answers: shipped in the package, nothing from other hosts, labelled
controls, the pinned hls.js; the routes of a real node. (Behaviour in a browser: test_browser.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from edge.web import CONTENT_SECURITY_POLICY, WEB_ROOT, _stream_list
from origin.window import RenditionStats, StreamStats
from tests.nodes import running_node

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted(WEB_ROOT.glob("*.html"))
OWN_ASSETS = sorted([*PAGES, *WEB_ROOT.glob("*.js"), *WEB_ROOT.glob("*.css")])


class PageParser(HTMLParser):
    """Collects what the checks below look at: tags with their attributes, and label targets."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


# -- the files ---------------------------------------------------------------------------------------
def test_there_are_pages_and_scripts_to_check():
    assert {p.name for p in PAGES} == {"index.html", "publish.html", "watch.html"}
    assert {"index.js", "publish.js", "watch.js", "style.css"} <= {p.name for p in OWN_ASSETS}


@pytest.mark.parametrize("path", OWN_ASSETS, ids=lambda p: p.name)
def test_nothing_is_loaded_from_another_host(path):
    text = path.read_text(encoding="utf-8")
    assert re.findall(r"https?://[^\s\"'<>)]+", text) == []
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?//""", text)  # protocol-relative
    assert "@import" not in text


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_pages_reference_only_same_origin_assets(path):
    page = parse(path)
    references = [attrs.get("src") for attrs in page.all("script")] + \
        [attrs.get("href") for attrs in page.all("link")]
    assert references
    for reference in references:
        assert reference and (reference.startswith("/static/") or reference == "data:,"), reference
    for reference in references:
        if reference.startswith("/static/"):
            assert (WEB_ROOT / reference.removeprefix("/static/")).is_file(), reference


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_pages_are_phone_ready_and_every_control_has_a_label(path):
    page = parse(path)
    assert page.all("html")[0].get("lang") == "en"
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in page.all("meta")
    label_targets = {attrs.get("for") for attrs in page.all("label")}
    controls = page.all("input") + page.all("select") + page.all("textarea")
    assert controls
    for control in controls:
        assert control.get("id") in label_targets, control
    ids = [attrs["id"] for _, attrs in page.tags if attrs.get("id")]
    assert len(ids) == len(set(ids))


def test_the_vendored_hls_js_is_the_version_package_json_pins():
    pin = json.loads((REPO / "package.json").read_text())["dependencies"]["hls.js"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin), "pin an exact version"
    lock = json.loads((REPO / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/hls.js"]["version"] == pin
    assert lock["packages"]["node_modules/hls.js"]["integrity"].startswith("sha512-")
    vendored = (WEB_ROOT / "vendor" / "hls.min.js").read_text(encoding="utf-8")
    versions = set(re.findall(r"hls\.js version (\d+\.\d+\.\d+)", vendored))
    assert versions == {pin}
    licence = (WEB_ROOT / "vendor" / "hls.js-LICENSE").read_text()
    assert "Apache License" in licence and "Dailymotion" in licence


def test_the_wheel_ships_the_pages_and_hls_js(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True, timeout=100)
    [wheel] = tmp_path.glob("livedge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*OWN_ASSETS, WEB_ROOT / "vendor" / "hls.min.js",
                 WEB_ROOT / "vendor" / "hls.js-LICENSE"]:
        assert path.relative_to(REPO).as_posix() in names


# -- the stream list ---------------------------------------------------------------------------------
def stats(name: str, ended: bool = False, heights: tuple[int, ...] = (360, 180)) -> StreamStats:
    renditions = tuple(RenditionStats(f"{h}p", "video", h * 16 // 9, h, 30.0, 500_000, 480_000, 3, 1)
                       for h in heights)
    audio = RenditionStats("audio", "audio", 0, 0, 0.0, 128_000, 128_000, 3, 1)
    return StreamStats(name, 0.0, (audio, *renditions), 10, 100, ended)


def test_the_stream_list_links_live_streams_only_sorted_and_escaped():
    listing = _stream_list([stats("zeta"), stats("gone", ended=True), stats("alpha", heights=(180, 720))])
    assert re.findall(r'href="([^"]+)"', listing) == ["/watch/alpha", "/watch/zeta"]
    assert "720p · 180p" in listing and "gone" not in listing and "audio" not in listing
    assert "<script>" not in _stream_list([stats("<script>")])
    assert 'id="no-streams"' in _stream_list([stats("gone", ended=True)])


# -- a real node -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("web"), "--demo") as node:
        yield node


async def test_the_index_lists_the_demo_stream(demo_node):
    async with aiohttp.ClientSession() as session:
        async with session.get(demo_node.url + "/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            body = await response.text()
    assert re.search(r'<a href="/watch/demo">demo</a>', body)
    assert "<!--streams-->" not in body


async def test_config_tells_the_pages_the_websocket_port(demo_node):
    async with aiohttp.ClientSession() as session:
        async with session.get(demo_node.url + "/api/config") as response:
            assert response.status == 200
            config = await response.json()
    assert config == {"playback_auth": False, "ws_port": URL(demo_node.ws_url).port}


@pytest.mark.parametrize("path, content_type", [
    ("/publish", "text/html"),
    ("/watch/demo", "text/html"),
    ("/watch/not-live-yet", "text/html"),  # the player waits for it
    ("/static/watch.js", "text/javascript"),
    ("/static/style.css", "text/css"),
    ("/static/vendor/hls.min.js", "text/javascript"),
])
async def test_pages_and_assets_are_served(demo_node, path, content_type):
    async with aiohttp.ClientSession() as session:
        async with session.get(demo_node.url + path) as response:
            assert response.status == 200
            # Older mimetypes tables say application/javascript; both are fine for browsers.
            assert response.content_type in (content_type, content_type.replace("text/", "application/"))
            assert len(await response.read()) > 100


@pytest.mark.parametrize("path, status", [
    ("/watch/..%2Fetc", 400),
    ("/watch/" + "a" * 100, 400),
    ("/static/../web.py", 404),
    ("/static/%2e%2e/web.py", 404),
    ("/static/..%2Fweb.py", 404),
    ("/static/vendor", 404),  # no directory listings
    ("/static/nothing.js", 404),
    ("/static/index.html", 404),  # pages only through their routes
])
async def test_bad_page_paths_get_json_errors_and_no_files_outside(demo_node, path, status):
    async with aiohttp.ClientSession() as session:
        async with session.get(URL(demo_node.url + path, encoded=True)) as response:
            assert response.status == status
            body = await response.text()
    assert "message" in json.loads(body)
    assert "import" not in body


async def test_with_play_tokens_the_index_lists_no_names(tmp_path):
    with running_node(tmp_path, "--demo", PLAYBACK_AUTH="token") as node:
        async with aiohttp.ClientSession() as session:
            async with session.get(node.url + "/") as response:
                body = await response.text()
            async with session.get(node.url + "/api/config") as response:
                config = await response.json()
    assert 'id="streams-private"' in body and "/watch/demo" not in body
    assert config["playback_auth"] is True
