"""Media files for tests, made with PyAV's own FFmpeg from lavfi test sources."""

from __future__ import annotations

import io
from pathlib import Path

import av


def encode_lavfi(target: Path | io.BytesIO, seconds: float, size: tuple[int, int] = (640, 360),
                 rate: int = 30, video_codec: str = "libx264", audio_codec: str = "aac",
                 container: str | None = None, options: dict[str, str] | None = None,
                 video_options: dict[str, str] | None = None) -> None:
    """``seconds`` of a moving test picture and a 440 Hz tone, encoded into ``target`` (a file, in
    the format its name says, or a buffer in ``container``)."""
    graph = (f"testsrc2=size={size[0]}x{size[1]}:rate={rate}[out0];"
             "sine=frequency=440:sample_rate=48000[out1]")
    with av.open(graph, format="lavfi") as source, \
            av.open(target if isinstance(target, io.BytesIO) else str(target), "w",
                    format=container, options=options or {}) as output:
        video = output.add_stream(video_codec, rate=rate, options=video_options or {})
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = output.add_stream(audio_codec, rate=48_000)
        finished = set()
        for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
            stream = video if isinstance(frame, av.VideoFrame) else audio
            if frame.time >= seconds:
                finished.add(stream.type)
                if len(finished) == 2:
                    break
                continue
            output.mux(stream.encode(frame))
        output.mux(video.encode(None))
        output.mux(audio.encode(None))


def write_h264_aac(path: Path, seconds: float, size: str = "640x360",
                   video_options: dict[str, str] | None = None) -> Path:
    """``seconds`` of a moving test picture (H.264, 30 fps) and a tone (AAC) in ``path``'s format."""
    width, height = (int(n) for n in size.split("x"))
    encode_lavfi(path, seconds, (width, height),
                 video_options={"preset": "ultrafast", **(video_options or {})})
    return path
