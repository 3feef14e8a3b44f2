"""The demo source: the bitmap font, the clock overlay, and the whole source through a real
transcoder."""

import asyncio
import re
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from ingest.demo import (BOX_LUMA, FONT, GLYPH_HEIGHT, GLYPH_WIDTH, TEXT_LUMA, DemoSource,
                         clock_text, demo_graph, draw_text, overlay_position, text_size)
from ingest.ladder import RungSpec
from ingest.pull import SourceState
from ingest.transcoder import LadderTranscoder


class RecordingConsumer:
    """A frame consumer that keeps copies of the luma planes it receives."""

    def __init__(self) -> None:
        self.luma: list[np.ndarray] = []
        self.audio_frames = 0
        self.closed = False

    def hint_frame_rate(self, frames_per_second):
        self.frame_rate = frames_per_second

    def push_video(self, frame):
        self.luma.append(frame.to_ndarray()[:frame.height])  # the Y plane of yuv420p, as drawn

    def push_audio(self, frame):
        self.audio_frames += 1

    def discontinuity(self):
        pass

    def close(self):
        self.closed = True


def test_draw_text_renders_each_glyph_scaled():
    luma = np.full((40, 60), 100, dtype=np.uint8)
    draw_text(luma, "1:", 3, 4, scale=2)
    width, height = text_size("1:", 2)
    assert (width, height) == ((2 * (GLYPH_WIDTH + 1) + 1) * 2, (GLYPH_HEIGHT + 2) * 2)
    box = luma[4:4 + height, 3:3 + width]
    # each glyph pixel became a 2x2 block: sample the top-left of each block
    glyph = box[2:2 + 2 * GLYPH_HEIGHT:2, 2:2 + 2 * GLYPH_WIDTH:2]
    assert np.array_equal(glyph == TEXT_LUMA, FONT["1"])
    assert set(np.unique(box)) == {TEXT_LUMA, BOX_LUMA}
    assert (luma[:4] == 100).all() and (luma[:, :3] == 100).all()  # nothing outside the box


def test_draw_text_clips_at_the_frame_edge():
    luma = np.zeros((10, 10), dtype=np.uint8)
    draw_text(luma, "12:34", 5, 5, scale=3)  # far larger than the frame
    assert luma[5:, 5:].any() and not luma[:5].any()


def test_clock_text_is_local_wall_time_with_milliseconds():
    moment = time.mktime((2024, 5, 17, 13, 4, 5, 0, 0, -1)) + 0.678
    assert clock_text(moment) == "13:04:05.678"
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", clock_text(time.time()))


async def test_the_demo_draws_the_clock_it_reads_and_a_frame_counter():
    ticks = iter(1_700_000_000.0 + 0.1 * i for i in range(10_000))
    readings: list[float] = []

    def clock() -> float:
        readings.append(next(ticks))
        return readings[-1]

    consumer = RecordingConsumer()
    source = DemoSource(consumer, width=320, height=180, clock=clock)
    task = asyncio.create_task(source.run())
    while len(consumer.luma) < 3:
        await asyncio.sleep(0.02)
    source.stop()
    await asyncio.wait_for(task, 5)
    assert consumer.closed and consumer.frame_rate == 30.0
    assert consumer.audio_frames > 0

    x, y, scale = overlay_position(180)
    for index in range(2):
        expected = np.zeros_like(consumer.luma[index])
        draw_text(expected, clock_text(readings[index]), x, y, scale)
        draw_text(expected, f"#{index:07d}".ljust(12), x, y + text_size("0", scale)[1], scale)
        width, height = text_size(clock_text(readings[index]), scale)
        region = (slice(y, y + 2 * height), slice(x, x + width))
        # the frame carries exactly the text for its clock reading and its number
        assert np.array_equal(consumer.luma[index][region], expected[region])
    clock_region = (slice(y, y + text_size("0", scale)[1]), slice(x, x + width))
    assert not np.array_equal(consumer.luma[0][clock_region], consumer.luma[1][clock_region])


async def test_the_demo_is_paced_and_its_clock_survives_encoding():
    """The whole path: lavfi -> overlay -> LadderTranscoder -> H.264; decode, compare clocks."""
    samples: dict[str, list] = {"360p": [], "audio": []}
    tracks: dict[str, object] = {}
    loop_thread = threading.get_ident()
    ended = asyncio.Event()

    class Sink:
        def add_track(self, track):
            assert threading.get_ident() == loop_thread
            tracks[track.name] = track

        def add_sample(self, name, sample):
            assert threading.get_ident() == loop_thread
            samples[name].append(sample)

        def discontinuity(self):
            raise AssertionError("the demo never restarts")

        def end(self):
            ended.set()

    transcoder = LadderTranscoder(Sink(), asyncio.get_running_loop(),
                                  [RungSpec("360p", 640, 360, 600_000)], segment_duration=1.0)
    source = DemoSource(transcoder, width=640, height=360)
    started = time.monotonic()
    task = asyncio.create_task(source.run())
    while len(samples["360p"]) < 36:
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    assert source.state is SourceState.LIVE
    source.stop()
    await asyncio.wait_for(task, 5)
    await asyncio.wait_for(ended.wait(), 5)
    assert elapsed >= 1.0  # 36 frames at 30 fps cannot arrive faster than real time (+ latency)
    assert len(samples["audio"]) > 30

    decoder = av.CodecContext.create("h264", "r")
    decoder.extradata = tracks["360p"].codec_config
    decoded = []
    for sample in samples["360p"]:
        packet = av.Packet(sample.data)
        packet.pts, packet.time_base = sample.pts, Fraction(1, 90000)
        decoded += decoder.decode(packet)
    first, later = decoded[0].to_ndarray(format="gray"), decoded[30].to_ndarray(format="gray")
    x, y, scale = overlay_position(360)
    width, height = text_size(clock_text(0.0), scale)
    clock_region = (slice(y + scale, y + height - scale), slice(x + scale, x + width - scale))
    # a second apart, the drawn clock differs (its seconds digit at least)
    assert np.abs(first[clock_region].astype(int) - later[clock_region].astype(int)).max() > 100
    # and it is still text: mostly near-black box with near-white strokes after compression
    values = first[clock_region]
    assert ((values < 60) | (values > 190)).mean() > 0.9


@pytest.mark.parametrize("width, height, rate, tone", [(1280, 720, 30, 1000.0), (320, 180, 25, 440)])
def test_demo_graph_has_a_picture_and_a_tone(width, height, rate, tone):
    with av.open(demo_graph(width, height, rate, tone), format="lavfi") as container:
        [video] = container.streams.video
        [audio] = container.streams.audio
        assert (video.codec_context.width, video.codec_context.height) == (width, height)
        assert video.average_rate == rate
        assert audio.rate == 48000
