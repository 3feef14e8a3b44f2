"""Which renditions to encode for a given source size: a pure planning step, no media I/O.

Rules (``plan_ladder``):
- Each rung is a box. The source is fitted inside the box keeping the source's aspect ratio, unless the
  box already has the source's aspect (within 1 %), in which case the box is used as configured (so a
  16:9 source gets the conventional 854x480, not 852x480). Dimensions are rounded down to even numbers
  because yuv420p needs them even.
- Never upscale: a rung is kept only if its fitted size is no larger than the source in both
  dimensions. Testing the fitted size rather than the raw box means a 1440x1080 (4:3) source still gets
  its "1080p" rung, at 1440x1080, instead of dropping to 720p.
- Two rungs that fit to the same size would be identical renditions: the first one (in configured
  order, normally the better one) is kept.
- If every rung is larger than the source, one rendition is still needed: the *smallest* configured
  rung (the cheapest, the one meant for the weakest viewers) is kept under its own name at the source
  size, its bitrate scaled down by the pixel-count ratio (never below ``MIN_FALLBACK_BITRATE``, never
  above its configured bitrate).

When the source changes size mid-stream (``replan_ladder``), every rung already listed to viewers
goes on: players such as hls.js never re-read the multivariant playlist, so a rung that stopped
would leave its viewers waiting. A listed rung whose fitted size is now above the source is encoded
at the source's own (even) size with its own bitrate cap, until the source grows back.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

ASPECT_TOLERANCE = 0.01  # relative difference under which a box counts as having the source's aspect
MIN_FALLBACK_BITRATE = 100_000  # bits per second


@dataclass(frozen=True)
class RungSpec:
    """One rendition to encode: a name (the track name), a size box in pixels and a video bitrate in
    bits per second. ``max_frame_rate`` caps the output frame rate (frames per second), None = source."""

    name: str
    width: int
    height: int
    video_bitrate: int
    max_frame_rate: float | None = None


def plan_ladder(rungs: Sequence[RungSpec], source_width: int, source_height: int) -> list[RungSpec]:
    """The rungs to encode for a ``source_width`` x ``source_height`` source, with the sizes actually
    encoded. Order follows ``rungs``. Raises ValueError on an empty ladder or a non-positive size."""
    if not rungs:
        raise ValueError("the ladder has no rungs")
    if source_width <= 0 or source_height <= 0:
        raise ValueError(f"invalid source size {source_width}x{source_height}")
    planned: list[RungSpec] = []
    seen_sizes: set[tuple[int, int]] = set()
    for rung in rungs:
        width, height = fit_size(rung.width, rung.height, source_width, source_height)
        if width > source_width or height > source_height or (width, height) in seen_sizes:
            continue
        seen_sizes.add((width, height))
        planned.append(RungSpec(rung.name, width, height, rung.video_bitrate, rung.max_frame_rate))
    if planned:
        return planned
    return [_fallback_rung(rungs, source_width, source_height)]


def replan_ladder(rungs: Sequence[RungSpec], listed: Set[str], source_width: int,
                  source_height: int) -> list[RungSpec]:
    """The rungs to encode for a source that changed size to ``source_width`` x ``source_height``,
    when the rungs named in ``listed`` were already announced: ``plan_ladder``'s rungs, plus every
    listed rung it leaves out, at its fitted size capped at the source's (never upscaled, even,
    the source's aspect), with its configured bitrate and frame-rate cap. Order follows ``rungs``;
    two rungs may then have the same size. With nothing listed, this is ``plan_ladder``."""
    planned = {rung.name: rung for rung in plan_ladder(rungs, source_width, source_height)}
    replanned: list[RungSpec] = []
    for rung in rungs:
        if rung.name in planned:
            replanned.append(planned[rung.name])
        elif rung.name in listed:
            width, height = fit_size(rung.width, rung.height, source_width, source_height)
            if width > source_width or height > source_height:
                width, height = _even(source_width), _even(source_height)
            replanned.append(RungSpec(rung.name, width, height, rung.video_bitrate,
                                      rung.max_frame_rate))
    return replanned


def fit_size(box_width: int, box_height: int, source_width: int, source_height: int) -> tuple[int, int]:
    """The even size that fits a source of the given size inside the box, keeping the source's aspect
    ratio (or the box itself when its aspect matches the source's within ``ASPECT_TOLERANCE``)."""
    source_aspect = source_width / source_height
    box_aspect = box_width / box_height
    if abs(box_aspect - source_aspect) / source_aspect <= ASPECT_TOLERANCE:
        return _even(box_width), _even(box_height)
    scale = min(box_width / source_width, box_height / source_height)
    return _even(round(source_width * scale)), _even(round(source_height * scale))


def _fallback_rung(rungs: Sequence[RungSpec], source_width: int, source_height: int) -> RungSpec:
    smallest = min(rungs, key=lambda rung: rung.width * rung.height)
    width, height = _even(source_width), _even(source_height)
    pixel_ratio = (width * height) / (smallest.width * smallest.height)
    bitrate = max(MIN_FALLBACK_BITRATE, round(smallest.video_bitrate * pixel_ratio))
    return RungSpec(smallest.name, width, height, min(bitrate, smallest.video_bitrate),
                    smallest.max_frame_rate)


def _even(value: int) -> int:
    return max(2, value - value % 2)
