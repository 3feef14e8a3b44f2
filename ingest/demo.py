"""The built-in test source: lavfi ``testsrc2`` (moving picture) and a 1 kHz ``sine`` tone, with the
wall-clock time (HH:MM:SS.mmm, local time, taken when the frame is produced) and a frame counter
burned into the picture. Point a player at it and compare its clock with yours to read the
glass-to-glass latency.

PyAV's FFmpeg has no ``drawtext`` filter, so the text is drawn here into the Y (luma) plane with a
tiny 5x7 bitmap font, scaled up, on a box whose chroma is set to grey. The source is a ``PullSource`` over a lavfi graph, so it shares the
pull code path: paced in real time, same reconnect and stop behaviour.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from ingest.pull import Backoff, FrameConsumer, PullSource

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
_FONT_ROWS = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    ":": ("00000", "01100", "01100", "00000", "01100", "01100", "00000"),
    ".": ("00000", "00000", "00000", "00000", "00000", "01100", "01100"),
    "#": ("01010", "01010", "11111", "01010", "11111", "01010", "01010"),
    " ": ("00000",) * 7,
}
FONT = {char: np.array([[bit == "1" for bit in row] for row in rows], dtype=bool)
        for char, rows in _FONT_ROWS.items()}
TEXT_LUMA, BOX_LUMA = 235, 16  # video-range white on video-range black
NEUTRAL_CHROMA = 128


def text_size(text: str, scale: int) -> tuple[int, int]:
    """Width and height in pixels of ``text`` drawn by ``draw_text`` (one glyph column of spacing
    around each glyph, one glyph row of margin above and below)."""
    return (len(text) * (GLYPH_WIDTH + 1) + 1) * scale, (GLYPH_HEIGHT + 2) * scale


def draw_text(luma: np.ndarray, text: str, x: int, y: int, scale: int) -> None:
    """Draw ``text`` (characters of ``FONT``) into the 2-D uint8 array ``luma`` with its top-left
    corner at (x, y), white on a black box so it reads over any picture. Clipped at the edges."""
    width, height = text_size(text, scale)
    canvas = np.full((height // scale, width // scale), BOX_LUMA, dtype=np.uint8)
    for index, char in enumerate(text):
        left = 1 + index * (GLYPH_WIDTH + 1)
        glyph_area = canvas[1:1 + GLYPH_HEIGHT, left:left + GLYPH_WIDTH]
        glyph_area[FONT[char]] = TEXT_LUMA
    scaled = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    rows = max(0, min(height, luma.shape[0] - y))
    columns = max(0, min(width, luma.shape[1] - x))
    luma[y:y + rows, x:x + columns] = scaled[:rows, :columns]


def clock_text(epoch_seconds: float) -> str:
    """``HH:MM:SS.mmm`` in local time."""
    whole, milliseconds = divmod(round(epoch_seconds * 1000), 1000)
    return time.strftime("%H:%M:%S", time.localtime(whole)) + f".{milliseconds:03d}"


def overlay_position(frame_height: int) -> tuple[int, int, int]:
    """(x, y, scale) of the clock line; the counter line goes right below it."""
    scale = max(1, frame_height // 120)
    return 2 * scale, frame_height // 20, scale  # below testsrc2's own small timestamp


def demo_graph(width: int, height: int, frame_rate: int, tone_hz: float) -> str:
    """The lavfi graph: picture on ``out0``, a 48 kHz tone on ``out1``."""
    return (f"testsrc2=size={width}x{height}:rate={frame_rate}[out0];"
            f"sine=frequency={tone_hz}:sample_rate=48000[out1]")


class DemoSource(PullSource):
    """The test pattern with a clock, paced in real time; use it like any ``PullSource``."""

    def __init__(self, consumer: FrameConsumer, *, width: int = 1280, height: int = 720,
                 frame_rate: int = 30, tone_hz: float = 1000.0,
                 clock: Callable[[], float] = time.time, backoff: Backoff = Backoff()) -> None:
        super().__init__(demo_graph(width, height, frame_rate, tone_hz), consumer, format="lavfi",
                         realtime=True, backoff=backoff)
        self._clock = clock
        self._reformatter = VideoReformatter()  # never frame.reformat(): see PERF-NOTES
        self.frames_drawn = 0

    def process_video(self, frame: av.VideoFrame) -> av.VideoFrame:
        if frame.format.name not in ("yuv420p", "yuvj420p"):
            frame = self._reformatter.reformat(frame, format="yuv420p", threads=1)
        frame.make_writable()  # the filter graph may still reference the buffer
        x, y, scale = overlay_position(frame.height)
        clock = clock_text(self._clock())
        lines = (clock, f"#{self.frames_drawn:07d}".ljust(len(clock)))  # one box for both lines
        line_height = text_size("0", scale)[1]
        box_width = max(text_size(line, scale)[0] for line in lines)
        luma = _plane_array(frame, 0)
        for index, line in enumerate(lines):
            draw_text(luma, line, x, y + index * line_height, scale)
        for chroma_plane in (1, 2):  # grey, not tinted by the picture's colours
            chroma = _plane_array(frame, chroma_plane)
            chroma[y // 2:(y + len(lines) * line_height + 1) // 2,
                   x // 2:(x + box_width + 1) // 2] = NEUTRAL_CHROMA
        self.frames_drawn += 1
        return frame


def _plane_array(frame: av.VideoFrame, index: int) -> np.ndarray:
    """A writable 2-D view of one plane of a (writable) frame, without the line padding."""
    plane = frame.planes[index]
    rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, :plane.width]
