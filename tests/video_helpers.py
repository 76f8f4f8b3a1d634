"""Test helpers for the converters: codec-friendly synthetic frames, video files written with PyAV,
and converting a source into a shard set and reading it back."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lapa_dist.data.convert import Source, convert
from lapa_dist.data.format import Clip, Manifest
from lapa_dist.data.reader import read_shard_clips

# Encoder settings that keep the small test videos close to their frames and quick to write.
ENCODER_OPTIONS = {
    "libx264": {"crf": "10", "preset": "ultrafast"},
    "libvpx-vp9": {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libsvtav1": {"crf": "20", "preset": "12"},
}


def smooth_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB [num_frames, height, width, 3]: a gradient whose colours depend on ``seed`` and a
    soft blob moving one pixel per frame, so clips are told apart and compress with little error."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    slope = rng.uniform(-1, 1, (2, 3)).astype(np.float32) * 40
    background = base + slope[0] * (xs[..., None] / width) + slope[1] * (ys[..., None] / height)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        cx, cy = (width / 4 + t) % width, height / 2
        blob = 60 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * (min(height, width) / 6) ** 2))
        frames[t] = np.clip(background + blob[..., None], 0, 255).astype(np.uint8)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: float, codec: str = "libx264", gop: int | None = None) -> Path:
    """Write uint8 RGB frames [T, H, W, 3] to ``path``; the container follows the extension
    (.mp4, .webm, .mkv). Frame t gets the timestamp t / fps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        options = dict(ENCODER_OPTIONS[codec])
        if gop is not None:
            options["g"] = str(gop)
        stream.options = options
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def convert_and_read(source: Source, output: Path, **options) -> tuple[Manifest, dict[str, Clip]]:
    """Convert ``source`` into ``output`` and read every clip back, by key."""
    manifest = convert(source, output, progress=False, **options)
    clips = {clip.key: clip for shard in manifest.shards for clip in read_shard_clips(output / shard.name)}
    return manifest, clips
