"""Glass to glass: from a frame drawn in the publish page to the same frame shown by the watch page.

One headless Chromium (Debian's) and one node share a loopback-only network namespace (as the page
tests do, ``tests/browser.py``). The publish page's camera is replaced, before the page's own code
runs, by a canvas stream on which ``Date.now()`` is drawn every frame as 32 black/white blocks (and
again inverted, so a frame blended by the codec is recognised and skipped). The watch page draws each
presented frame (``requestVideoFrameCallback``) onto a canvas, reads the blocks back and subtracts
the stamp from the time the frame was due on screen. Both pages run in one browser, so one clock.

It measures everything a viewer waits for: capture, browser encode, WHIP or WebSocket, decode and
the ladder transcode on the node, LL-HLS packaging, hls.js loading parts and its playback buffer.

    .venv/bin/python -m bench.glass_to_glass [--seconds 15] [--transports whip,websocket]
        [--segment 2 --part 0.5] [--size 640x360]

Node settings are the defaults (``edge.config.Settings``) unless given here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edge.config import DEFAULT_LADDER, Settings
from edge.tokens import Scope, issue_token
from tests.browser import chromium_in, loopback_namespace, node_in
from tests.nodes import TEST_SECRET

BITS = 32  # the low 32 bits of Date.now(): wraps every 49 days, differences are taken modulo 2**32
BLOCK = 16  # pixels per bit, horizontally, in a 640-pixel-wide frame
ROW = 24  # pixels high, each of the two rows
LEFT, TOP = 64, 40

# Replaces getUserMedia in the publish page (injected over CDP, so the page's CSP does not apply).
STAMPING_CAMERA = """
(() => {
  const [WIDTH, HEIGHT] = %(size)s;
  const scale = WIDTH / 640;
  const original = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const canvas = document.createElement("canvas");
    canvas.width = WIDTH; canvas.height = HEIGHT;
    const context = canvas.getContext("2d");
    let frame = 0;
    const draw = () => {
      const stamp = Date.now() %% 4294967296;
      context.fillStyle = "#505050"; context.fillRect(0, 0, WIDTH, HEIGHT);
      context.fillStyle = "#c0c040";  // something moving, so the encoders have work to do
      context.fillRect(((frame++ * 8) %% 640) * scale, 200 * scale, 40 * scale, 40 * scale);
      for (let row = 0; row < 2; row++) {
        for (let bit = 0; bit < %(bits)d; bit++) {
          const one = Math.floor(stamp / 2 ** bit) %% 2 === 1;
          context.fillStyle = one !== (row === 1) ? "#ffffff" : "#000000";
          context.fillRect((%(left)d + bit * %(block)d) * scale, (%(top)d + row * 2 * %(row)d) * scale,
                           %(block)d * scale, %(row)d * scale);
        }
      }
      context.fillStyle = "#ffffff"; context.font = 28 * scale + "px sans-serif";
      context.fillText(new Date().toISOString().slice(11, 23), %(left)d * scale, 320 * scale);
    };
    draw();
    setInterval(draw, 1000 / 30);
    const stream = canvas.captureStream(30);
    if (constraints.audio) {
      const voice = await original({ audio: constraints.audio });
      voice.getAudioTracks().forEach((track) => stream.addTrack(track));
    }
    return stream;
  };
})();
"""

# Run in the watch page: the glass-to-glass delay of every readable frame for ``seconds``.
READ_STAMPS = """
async ([seconds, bits, block, row, left, top]) => {
  const video = document.getElementById("video");
  const canvas = document.createElement("canvas");
  canvas.width = 640; canvas.height = 360;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const read = (rowIndex) => {
    const y = top + rowIndex * 2 * row + row / 2;
    const pixels = context.getImageData(0, y, 640, 1).data;
    let value = 0;
    for (let bit = 0; bit < bits; bit++) {
      const x = left + bit * block + block / 2;
      if (pixels[x * 4 + 1] > 128) value += 2 ** bit;
    }
    return value;
  };
  const delays = [];
  let unreadable = 0;
  const stallsBefore = window.livedgeWatch.stats.stalls;
  const end = performance.now() + seconds * 1000;
  await new Promise((resolve) => {
    const onFrame = (now, metadata) => {
      context.drawImage(video, 0, 0, 640, 360);
      const stamp = read(0);
      if (stamp + read(1) === 2 ** bits - 1) {
        const shown = (performance.timeOrigin + metadata.expectedDisplayTime) % 2 ** bits;
        delays.push(((shown - stamp + 2 ** bits) % 2 ** bits) / 1000);
      } else {
        unreadable += 1;
      }
      if (performance.now() < end) video.requestVideoFrameCallback(onFrame);
      else resolve();
    };
    video.requestVideoFrameCallback(onFrame);
  });
  const watch = window.livedgeWatch;
  return { delays, unreadable, stalls: watch.stats.stalls - stallsBefore, hlsLatency: watch.stats.latency,
           targetLatency: watch.stats.targetLatency };
}
"""


def ladder_text() -> str:
    return ",".join(f"{r.name}:{r.width}x{r.height}:{r.video_bitrate}" for r in DEFAULT_LADDER)


def measure(context, node, transport: str, seconds: float, warmup: float) -> dict:
    stream = f"g2g-{transport}"
    token = issue_token(TEST_SECRET, "HS256", Scope.PUBLISH, stream, 600, "bench")
    publisher = context.new_page()
    viewer = context.new_page()
    try:
        publisher.goto(node.url + "/publish")
        publisher.fill("#stream", stream)
        publisher.fill("#token", token)
        if transport == "websocket":
            publisher.check("#websocket")
        publisher.click("#start")
        publisher.wait_for_selector("#state[data-state=live]", timeout=30_000)
        viewer.goto(node.url + f"/watch/{stream}")
        viewer.wait_for_function("() => document.getElementById('video').currentTime > 0.5",
                                 timeout=60_000)
        viewer.wait_for_timeout(warmup * 1000)  # hls.js settles on its target latency
        result = viewer.evaluate(READ_STAMPS, [seconds, BITS, BLOCK, ROW, LEFT, TOP])
        result["sent"] = publisher.locator("#transport").inner_text()
        publisher.click("#stop")
        publisher.wait_for_selector("#state[data-state=stopped]", timeout=10_000)
        return result
    finally:
        viewer.close()
        publisher.close()


def summarise(transport: str, result: dict) -> str:
    delays = sorted(result["delays"])
    if not delays:
        return f"| {transport} | 0 frames read ({result['unreadable']} unreadable) | | | | | |"
    deciles = statistics.quantiles(delays, n=10) if len(delays) > 1 else delays * 9
    latency = "–" if result["hlsLatency"] is None else \
        f"{result['hlsLatency']:.2f} s (target {result['targetLatency']:.2f} s)"
    return (f"| {transport} | {len(delays)} | {statistics.median(delays):.2f} s | "
            f"{deciles[0]:.2f} s | {deciles[-1]:.2f} s | {delays[-1]:.2f} s | "
            f"{latency} | {result['stalls']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured, per transport")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--transports", default="whip,websocket")
    defaults = Settings()
    parser.add_argument("--segment", type=float, default=defaults.segment_duration)
    parser.add_argument("--part", type=float, default=defaults.part_duration)
    parser.add_argument("--preset", default=defaults.x264_preset)
    parser.add_argument("--size", default="640x360", help="the stamped canvas, WxH")
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))

    with tempfile.TemporaryDirectory() as work, loopback_namespace() as namespace:
        work_dir = Path(work)
        env = {"LADDER": ladder_text(), "SEGMENT_DURATION": str(args.segment),
               "PART_DURATION": str(args.part), "X264_PRESET": args.preset, "LOG_LEVEL": "warning"}
        with node_in(namespace, work_dir, **env) as node, \
                chromium_in(namespace, work_dir) as context:
            context.add_init_script(STAMPING_CAMERA % {
                "size": f"[{width}, {height}]", "bits": BITS, "block": BLOCK, "row": ROW,
                "left": LEFT, "top": TOP})
            print(f"segment {args.segment} s, part {args.part} s, preset {args.preset}, "
                  f"source {width}x{height} 30 fps, {args.seconds:.0f} s measured per transport")
            print("| transport | frames | median | p10 | p90 | max | hls.js latency at the end | stalls |")
            print("|---|---|---|---|---|---|---|---|")
            for transport in args.transports.split(","):
                started = time.monotonic()
                result = measure(context, node, transport, args.seconds, args.warmup)
                print(summarise(transport, result), flush=True)
                print(f"  sent: {result['sent']}")
                if result["unreadable"]:
                    print(f"  ({result['unreadable']} frames unreadable, "
                          f"{time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
