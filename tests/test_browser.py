"""The pages in real headless Chromium (Debian's), against real nodes, on a loopback-only network.

Each test keeps a screenshot under ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from edge.tokens import Scope, issue_token
from tests.browser import chromium_in, loopback_namespace, node_in, page_errors, screenshot
from tests.nodes import TEST_SECRET

pytestmark = pytest.mark.timeout(120)

PLAYBACK_WAIT_MS = 30_000  # first segments of a fresh publish, then hls.js start-up


@pytest.fixture(scope="module")
def namespace():
    with loopback_namespace() as namespace:
        yield namespace


@pytest.fixture(scope="module")
def node(namespace, tmp_path_factory):
    """One node for the module: the demo stream, and room for the publish tests."""
    with node_in(namespace, tmp_path_factory.mktemp("node"), "--demo") as node:
        yield node


@pytest.fixture(scope="module")
def browser(namespace, tmp_path_factory) -> BrowserContext:
    with chromium_in(namespace, tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest.fixture
def page(browser) -> Page:
    page = browser.new_page()
    yield page
    page.close()


def video_time(page: Page) -> float:
    return page.evaluate("document.getElementById('video').currentTime")


def assert_playing(page: Page, media_seconds: float = 1.0, within: float = 8.0) -> None:
    """The video element's clock advances by ``media_seconds`` within ``within`` seconds of wall
    time (a stall on the way is allowed; a frozen or stopped player is not)."""
    page.wait_for_function("() => document.getElementById('video').currentTime > 0.5",
                           timeout=PLAYBACK_WAIT_MS)
    start = video_time(page)
    deadline = time.monotonic() + within
    while video_time(page) - start < media_seconds:
        assert time.monotonic() < deadline, \
            f"currentTime moved {video_time(page) - start:.2f} s in {within} s"
        page.wait_for_timeout(100)


# -- index -------------------------------------------------------------------------------------------
def test_index_lists_the_demo_stream_and_its_link_works_from_the_keyboard(node, page):
    errors = page_errors(page)
    page.goto(node.url + "/")
    link = page.locator("#streams a", has_text="demo")
    expect(link).to_have_attribute("href", "/watch/demo")
    expect(page.locator("#streams li", has_text="demo")).to_contain_text("360p · 180p")
    screenshot(page, "index")
    # Tab from the top of the page reaches the link; Enter follows it.
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('href')") == "/watch/demo":
            break
    else:
        pytest.fail("Tab never reached the demo link")
    page.keyboard.press("Enter")
    page.wait_for_url(node.url + "/watch/demo")
    assert errors == []


# -- watch -------------------------------------------------------------------------------------------
def test_watch_demo_plays_offers_renditions_and_switches_quality(node, page):
    errors = page_errors(page)
    page.goto(node.url + "/watch/demo")
    assert_playing(page)
    assert page.evaluate("Hls.version") == "1.7.4" and page.evaluate(
        "window.livedgeWatch.hls.config.lowLatencyMode") is True

    options = page.locator("#quality option")
    labels = options.all_inner_texts()
    assert labels[0] == "Auto"
    assert any(label.startswith("360p") for label in labels)
    assert any(label.startswith("180p") for label in labels)
    assert page.evaluate("window.livedgeWatch.hls.levels.length") >= 2

    # Latency behind the live edge is read out as a number of seconds.
    page.wait_for_function("() => document.getElementById('latency').dataset.value > 0")
    assert re.fullmatch(r"\d+\.\d\d s( \(target \d+\.\d\d s\))?",
                        page.locator("#latency").inner_text())
    latency = float(page.locator("#latency").get_attribute("data-value"))
    assert 0 < latency < 10
    assert re.fullmatch(r"\d+\.\d\d s", page.locator("#clock-delay").inner_text())
    assert re.fullmatch(r"\d+( \(\d+\.\d s\))?", page.locator("#stalls").inner_text())
    screenshot(page, "watch-demo")

    # A manual switch to the smallest rung: hls.js's level changes and the picture is 180 rows.
    low = next(label for label in labels if label.startswith("180p"))
    low_value = page.locator("#quality option", has_text=low).get_attribute("value")
    page.locator("#quality").select_option(label=low)
    page.wait_for_function(
        f"() => window.livedgeWatch.hls.currentLevel === {low_value} && "
        "document.getElementById('video').videoHeight === 180", timeout=15_000)
    assert page.evaluate("window.livedgeWatch.hls.autoLevelEnabled") is False
    assert_playing(page)
    expect(page.locator("#level")).to_contain_text("180p")
    # And back to automatic choice.
    page.locator("#quality").select_option("-1")
    page.wait_for_function("() => window.livedgeWatch.hls.autoLevelEnabled === true")
    assert_playing(page)
    assert errors == []


def latency(page: Page) -> float:
    return page.evaluate("window.livedgeWatch.stats.latency")


def test_a_player_that_fell_behind_returns_to_live_unless_the_viewer_went_back(node, page):
    page.goto(node.url + "/watch/demo")
    assert_playing(page)
    target = page.evaluate("window.livedgeWatch.stats.targetLatency")
    assert target and 0 < target < 3
    # A pause leaves the player seconds behind, beyond the range hls.js closes by playing faster.
    page.evaluate("document.getElementById('video').pause()")
    page.wait_for_timeout(4000)
    page.evaluate("document.getElementById('video').play()")
    page.wait_for_function("() => window.livedgeWatch.stats.jumps >= 1", timeout=10_000)
    page.wait_for_function(f"() => window.livedgeWatch.stats.latency < {target + 1.5}",
                           timeout=10_000)
    # A viewer who seeks back stays where they went ... (on a slow machine the player may have
    # needed a second jump by now, 10 s after the first: count from here)
    jumps = page.evaluate("window.livedgeWatch.stats.jumps")
    page.evaluate("document.getElementById('video').currentTime -= 4")
    page.wait_for_timeout(3000)
    assert page.evaluate("window.livedgeWatch.stats.jumps") == jumps
    assert latency(page) > target + 2.5
    # ... until they ask for the live edge.
    page.get_by_role("button", name="Go to live edge").click()
    page.wait_for_function(f"() => window.livedgeWatch.stats.latency < {target + 1.5}",
                           timeout=10_000)
    assert_playing(page)


def test_watch_a_stream_that_is_not_live_says_so_and_keeps_trying(node, page):
    page.goto(node.url + "/watch/nobody-here")
    expect(page.locator("#state")).to_have_attribute("data-state", "waiting", timeout=10_000)
    expect(page.locator("#state")).to_contain_text("not live")


def test_playback_tokens_ride_from_the_watch_url_to_the_playlists(namespace, browser,
                                                                   tmp_path):
    token = issue_token(TEST_SECRET, "HS256", Scope.PLAY, "demo", 120, "viewer")
    with node_in(namespace, tmp_path, "--demo", PLAYBACK_AUTH="token") as private:
        page = browser.new_page()
        try:
            page.goto(private.url + "/")
            expect(page.locator("#streams-private")).to_be_visible()
            assert page.locator("a[href='/watch/demo']").count() == 0  # names stay private
            # The open form carries the token onto the watch URL.
            page.fill("#open-stream", "demo")
            page.fill("#open-token", token)
            page.press("#open-token", "Enter")
            page.wait_for_url(re.compile(r"/watch/demo\?token="))
            assert_playing(page)
            assert page.evaluate("window.livedgeWatch.source") == \
                f"/hls/demo/index.m3u8?token={token}"
            page.goto(private.url + "/watch/demo")
            expect(page.locator("#state")).to_have_attribute("data-state", "error",
                                                             timeout=10_000)
            expect(page.locator("#state")).to_contain_text("play token")
        finally:
            page.close()


# -- layout and controls ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/publish", "/watch/demo"])
def test_pages_fit_a_phone_and_label_every_control(node, browser, path):
    page = browser.new_page()
    page.set_viewport_size({"width": 360, "height": 740})
    try:
        errors = page_errors(page)
        page.goto(node.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter(control => control.labels.length === 0).map(control => control.id)""")
        assert unlabelled == []
        nameless = page.evaluate("""[...document.querySelectorAll('button')]
            .filter(button => !button.textContent.trim()).map(button => button.outerHTML)""")
        assert nameless == []
        name = "phone-" + (path.strip("/").replace("/", "-") or "index")
        screenshot(page, name)
        assert [e for e in errors if "net::ERR" not in e] == []
    finally:
        page.close()


def test_publish_form_is_operable_from_the_keyboard(node, page):
    page.goto(node.url + "/publish")
    order = []
    for _ in range(10):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    # Every control is reachable, in reading order (the stop button is disabled until publishing).
    controls = ["source", "camera", "microphone", "stream", "token", "websocket", "start"]
    reached = [entry for entry in order if entry in controls]
    assert reached[:len(controls)] == controls
    page.focus("#websocket")
    page.keyboard.press("Space")
    assert page.is_checked("#websocket")


# -- publish -----------------------------------------------------------------------------------------
def publish_then_watch(node, browser, stream: str, websocket: bool, artifact: str) -> None:
    token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, stream, 120, "tester")
    publisher = browser.new_page()
    viewer = browser.new_page()
    try:
        errors = page_errors(publisher)
        publisher.goto(node.url + "/publish")
        expect(publisher.locator("#websocket")).to_be_enabled()  # /api/config gave the WS port
        publisher.fill("#stream", stream)
        publisher.fill("#token", token)
        if websocket:
            publisher.check("#websocket")
        publisher.press("#token", "Enter")  # submits the form, as a keyboard user would
        state = publisher.locator("#state")
        expect(state).to_have_attribute("data-state", "live", timeout=20_000)
        publisher.wait_for_function("() => document.getElementById('bitrate').dataset.bps > 50000",
                                    timeout=10_000)
        expect(publisher.locator("#transport")).to_contain_text(
            "WebSocket" if websocket else "WebRTC")
        expect(publisher.locator("#watch-link")).to_have_attribute("href", f"/watch/{stream}")

        viewer.goto(node.url + f"/watch/{stream}")
        assert_playing(viewer)
        assert viewer.evaluate("document.getElementById('video').videoWidth") > 0
        assert viewer.evaluate("window.livedgeWatch.hls.audioTracks.length") == 1  # the microphone
        screenshot(publisher, f"{artifact}-publish")
        screenshot(viewer, f"{artifact}-watch")

        publisher.click("#stop")
        expect(state).to_have_attribute("data-state", "stopped")
        assert publisher.evaluate("document.getElementById('preview').srcObject") is None
        # The session really ended on the node: the same name can be published again at once
        # (a live session would be refused with 409).
        publisher.click("#start")
        expect(state).to_have_attribute("data-state", "live", timeout=20_000)
        publisher.click("#stop")
        expect(state).to_have_attribute("data-state", "stopped")
        assert errors == []
    finally:
        viewer.close()
        publisher.close()


def test_publish_over_websocket_then_watch(node, browser):
    publish_then_watch(node, browser, "cam-ws", websocket=True, artifact="websocket")


def test_publish_with_a_bad_token_says_why(node, page):
    page.goto(node.url + "/publish")
    page.fill("#stream", "cam-refused")
    page.fill("#token", issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "other", 60, "x"))
    page.check("#websocket")
    page.click("#start")
    state = page.locator("#state")
    expect(state).to_have_attribute("data-state", "error", timeout=10_000)
    expect(state).to_contain_text("refused")
    expect(page.locator("#start")).to_be_enabled()


def test_publish_over_whip_then_watch(node, browser):
    publish_then_watch(node, browser, "cam-whip", websocket=False, artifact="whip")


def test_publish_a_screen(node, page):
    page.goto(node.url + "/publish")
    page.select_option("#source", "screen")
    expect(page.locator("#camera")).to_be_hidden()  # no camera to choose for a screen
    page.fill("#stream", "screen")
    page.fill("#token", issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, "screen", 60, "x"))
    page.click("#start")
    expect(page.locator("#state")).to_have_attribute("data-state", "live", timeout=20_000)
    page.wait_for_function("() => document.getElementById('bitrate').dataset.bps > 50000",
                           timeout=10_000)
    tracks = page.evaluate("""window.livedgePublish.session.media.getTracks()
        .map(track => track.kind + ':' + (track.getSettings().displaySurface || 'device'))""")
    assert sorted(tracks) == ["audio:device", "video:monitor"]  # the screen, and the microphone
    page.click("#stop")
    expect(page.locator("#state")).to_have_attribute("data-state", "stopped")


def publish_in_background(namespace, node, stream: str, data: bytes, seconds: float,
                          times: int = 1) -> tuple[threading.Thread, list[str]]:
    """Publish ``data`` (``seconds`` of MPEG-TS) to ``stream`` over the WebSocket ingest from inside
    the namespace, paced, ``times`` in a row 1 s apart (a publisher that drops and comes back), on
    a started thread; the list fills with each publish's outcome ("ok" or why not)."""
    from bench.soak import publish_ws
    token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, stream, 86400, "tester")
    outcome: list[str] = []

    def publish() -> None:
        for attempt in range(times):
            if attempt:
                time.sleep(1.0)
            outcome.append(namespace.call(lambda: asyncio.run(
                publish_ws(node.ws_url, stream, data, seconds, token=token))))

    publisher = threading.Thread(target=publish)
    publisher.start()
    return publisher, outcome


def test_hls_js_plays_on_across_a_resolution_change(namespace, node, page):
    # The publisher drops from 640x360 to 320x180: the 360p rung goes on at 320x180 after a
    # discontinuity, with a new init segment at its own URI (an EXT-X-MAP after the
    # DISCONTINUITY). hls.js, pinned to that rung, must decode the new size with the new init.
    from bench.soak import encode_ts
    data = encode_ts(20.0, (640, 360), 30, ((10.0, (320, 180)),))
    publisher, outcome = publish_in_background(namespace, node, "resize", data, 20.0)
    try:
        errors = page_errors(page)
        page.goto(node.url + "/watch/resize")
        assert_playing(page)
        label = next(text for text in page.locator("#quality option").all_inner_texts()
                     if text.startswith("360p"))
        page.locator("#quality").select_option(label=label)
        page.wait_for_function("() => document.getElementById('video').videoHeight === 360",
                               timeout=15_000)
        page.wait_for_function("() => document.getElementById('video').videoHeight === 180",
                               timeout=25_000)
        assert_playing(page)
        status, body = namespace.fetch(node.url + "/hls/resize/360p/index.m3u8")
        assert status == 200 and '#EXT-X-MAP:URI="init-1.mp4' in body.decode()
        screenshot(page, "resolution-change")
        assert errors == []
    finally:
        publisher.join(timeout=30)
    assert outcome == ["ok"]


def test_hls_js_plays_on_across_a_republish(namespace, node, page):
    # The publisher's connection drops after 10 s and it comes back 1 s later (within the grace
    # period): the stream goes on after a discontinuity, and a watching hls.js must play the new
    # period's media, not stop at the old period's end.
    from bench.soak import encode_ts
    data = encode_ts(10.0, (320, 180), 30)
    publisher, outcome = publish_in_background(namespace, node, "again", data, 10.0, times=2)
    try:
        errors = page_errors(page)
        page.goto(node.url + "/watch/again")
        assert_playing(page)
        publisher.join(timeout=40)
        # The second period's media plays: the clock passes 10 s of media before both ended.
        page.wait_for_function("() => document.getElementById('video').currentTime > 12",
                               timeout=15_000)
        status, body = namespace.fetch(node.url + "/hls/again/180p/index.m3u8")
        assert status == 200 and "#EXT-X-DISCONTINUITY" in body.decode()
        screenshot(page, "republish")
        assert errors == []
    finally:
        publisher.join(timeout=30)
    assert outcome == ["ok", "ok"]
