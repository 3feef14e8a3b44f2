"""Media files for tests, made with PyAV's own FFmpeg from lavfi test sources."""

from __future__ import annotations

from pathlib import Path

import av

TEST_GRAPH = "testsrc2=size={size}:rate=30[out0];sine=frequency=440:sample_rate=48000[out1]"


def write_h264_aac(path: Path, seconds: float, size: str = "640x360",
                   video_options: dict[str, str] | None = None) -> Path:
    """``seconds`` of a moving test picture (H.264, 30 fps) and a tone (AAC) in ``path``'s format."""
    width, height = (int(n) for n in size.split("x"))
    with av.open(TEST_GRAPH.format(size=size), format="lavfi") as source, \
            av.open(str(path), "w") as target:
        video_out = target.add_stream("libx264", rate=30,
                                      options={"preset": "ultrafast", **(video_options or {})})
        video_out.width, video_out.height, video_out.pix_fmt = width, height, "yuv420p"
        audio_out = target.add_stream("aac", rate=48_000)
        done = set()
        for frame in source.decode(source.streams.video[0], source.streams.audio[0]):
            out = video_out if isinstance(frame, av.VideoFrame) else audio_out
            if frame.time >= seconds:
                done.add(out.type)
                if len(done) == 2:
                    break
                continue
            target.mux(out.encode(frame))
        target.mux(video_out.encode(None))
        target.mux(audio_out.encode(None))
    return path
