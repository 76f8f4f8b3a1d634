"""Decoding video files from disk for the converters: optional time window, resize, even sides.

The converters of raw datasets (video folders, Something-Something v2, LeRobot) all read a video
file with PyAV, possibly only the frames of one episode inside a longer file, possibly resized, and
must hand the shard writer frames with even height and width (4:2:0 video needs them). That is all
here, so the sources only deal with their own layouts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from lapa_dist.data.convert import SkipClip
from lapa_dist.data.video import VideoDecodeError


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3], RGB, H and W even
    fps: float | None  # the stream's average frame rate; None when the container does not say
    frames_in_window: int  # frames the window holds; more than T when max_frames cut it short


def check_resize(resize: int | None) -> None:
    """Validate a --resize option (the shorter side in pixels, or None to keep the size)."""
    if resize is not None and resize < 2:
        raise ValueError(f"--resize {resize}: the shorter side must be at least 2 pixels")


def scaled_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side set to ``shorter_side``, aspect ratio kept."""
    scale = shorter_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def crop_to_even(frames: np.ndarray) -> np.ndarray:
    """Drop the last row and/or column of [T, H, W, C] frames where H or W is odd."""
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    if height == 0 or width == 0:
        raise VideoDecodeError(f"frames of {frames.shape[2]}x{frames.shape[1]} are too small to store")
    return frames[:, :height, :width]


def read_video_file(
    path: str | os.PathLike,
    shorter_side: int | None = None,
    max_frames: int | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    count_all: bool = False,
) -> DecodedVideo:
    """Decode the frames of ``path`` whose timestamps lie in [start_s, end_s) (the whole file by
    default), up to ``max_frames`` of them, resized so the shorter side is ``shorter_side`` and
    cropped to even sides. Timestamps are compared with half a frame of slack. With ``count_all``,
    decoding goes on past ``max_frames`` to count the frames of the window.
    Raises VideoDecodeError when the file is not a decodable video or the window holds no frame."""
    windowed = start_s > 0 or end_s is not None
    frames: list[np.ndarray] = []
    in_window = 0
    try:
        with av.open(os.fspath(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            slack = 0.5 / fps if fps else 1e-4
            if start_s > 0:
                container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
            reformatter = av.video.reformatter.VideoReformatter()
            size = None
            for frame in container.decode(stream):
                if windowed:
                    if frame.time is None:
                        raise VideoDecodeError("frames carry no timestamps, cannot select a time window")
                    if frame.time < start_s - slack:
                        continue
                    if end_s is not None and frame.time >= end_s - slack:
                        break
                in_window += 1
                if max_frames is None or len(frames) < max_frames:
                    if size is None:
                        size = scaled_size(frame.width, frame.height, shorter_side) if shorter_side else None
                    frames.append(_to_rgb(reformatter, frame, size))
                elif not count_all:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise VideoDecodeError(f"undecodable video: {error}") from error
    if not frames:
        raise VideoDecodeError(f"no frames from {start_s:.3f} s to {end_s} s" if windowed else "video has no frames")
    return DecodedVideo(crop_to_even(np.stack(frames)), fps, in_window)


def read_clip_video(key: str, path: Path, **options) -> DecodedVideo:
    """:func:`read_video_file` for clip ``key``; a missing or undecodable file raises SkipClip."""
    if not path.is_file():
        raise SkipClip(key, "missing_video", str(path))
    try:
        return read_video_file(path, **options)
    except VideoDecodeError as error:
        raise SkipClip(key, "undecodable_video", f"{path}: {error}") from None


def _to_rgb(reformatter, frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """One frame as uint8 RGB [H, W, 3], resized to ``size`` = (width, height) when given."""
    if size is None:
        return reformatter.reformat(frame, format="rgb24").to_ndarray()
    width, height = size
    interpolation = "AREA" if width < frame.width else "BICUBIC"
    rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation=interpolation)
    return rgb.to_ndarray()
