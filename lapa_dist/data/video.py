"""Video encoding and CPU decoding with PyAV.

Decoding reuses one VideoReformatter per process (a fresh conversion context costs ~1 ms), stops
after the last wanted frame, and can resize in swscale while converting to RGB.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import av
import numpy as np

CODECS = {"h264": "libx264", "vp9": "libvpx-vp9"}  # both stored in an MP4 container


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video, or hold fewer frames than asked for."""

    def __init__(self, message: str, frames_seen: int | None = None):
        super().__init__(message)
        self.frames_seen = frames_seen  # frames decoded before giving up; None if undecodable


def encode_video(frames: np.ndarray, fps: float, codec: str = "h264", crf: int = 18) -> bytes:
    """Encode uint8 RGB frames [T, H, W, 3] (H, W even) as MP4 bytes holding H.264 or VP9."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: expected one of {sorted(CODECS)}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("frames: empty clip")
    if height % 2 or width % 2:
        raise ValueError(f"frames: {width}x{height} has an odd side; 4:2:0 video needs even sides")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(CODECS[codec], rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "h264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        else:
            stream.options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


_REFORMATTERS: dict[int, av.video.reformatter.VideoReformatter] = {}


def _reformatter() -> av.video.reformatter.VideoReformatter:
    """One per process: it caches its swscale context, whose creation (~1 ms) costs more than
    converting a whole short clip. Keyed by pid: a context inherited through fork deadlocks when
    used or freed (its worker threads do not survive the fork), so a forked loader worker builds its
    own and keeps the inherited one referenced, never freeing it."""
    pid = os.getpid()
    if pid not in _REFORMATTERS:
        _REFORMATTERS[pid] = av.video.reformatter.VideoReformatter()
    return _REFORMATTERS[pid]


def decode_frames(
    video: bytes,
    indices: Sequence[int] | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode frames ``indices`` (sorted or not, repeats allowed; all when None) as uint8 RGB
    [len(indices), H, W, 3]. ``size`` = (width, height) resizes during colour conversion."""
    if not video:
        raise VideoDecodeError("empty video (0 bytes)", 0)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    if wanted is not None and wanted and wanted[0] < 0:
        raise VideoDecodeError(f"negative frame index {wanted[0]}")
    decoded: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(video), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            # One thread per decoder: loaders run one decoder per core, and codec threads cost more
            # to start than they save on the few frames decoded per clip (measured in docs/perf.md).
            container.streams.video[0].thread_type = "NONE"
            reformatter = _reformatter()
            width, height = size if size else (None, None)
            frames_seen = 0
            last = wanted[-1] if wanted else None
            next_wanted = 0
            for index, frame in enumerate(container.decode(video=0)):
                frames_seen = index + 1
                if wanted is None or (next_wanted < len(wanted) and index == wanted[next_wanted]):
                    rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24")
                    decoded[index] = rgb.to_ndarray()
                    next_wanted += 1
                if last is not None and index >= last:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise VideoDecodeError(f"undecodable video: {error}") from error
    if wanted is None:
        if not decoded:
            raise VideoDecodeError("video has no frames", 0)
        return np.stack([decoded[i] for i in range(len(decoded))])
    missing = [i for i in wanted if i not in decoded]
    if missing:
        raise VideoDecodeError(f"video has {frames_seen} frames; frame {missing[0]} asked for", frames_seen)
    return np.stack([decoded[int(i)] for i in indices]) if len(indices) else np.zeros((0,), np.uint8)
