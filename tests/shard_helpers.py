"""Building small shard sets for tests: clips whose frames encode their own index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapa_dist.data.format import Clip, ClipMeta, Manifest
from lapa_dist.data.writer import ShardWriter

LEVEL_STEP = 6  # frame i is a flat grey of level LEVEL_STEP * i (+ a small fixed texture)


def index_clip(key: str, num_frames: int, size: int = 32, action_dim: int | None = 2, instruction: str = "") -> Clip:
    """A clip where frame i has mean level ~ LEVEL_STEP * i, so tests can read frame indices back."""
    levels = (np.arange(num_frames) * LEVEL_STEP + 8).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3)).copy()
    actions = None
    if action_dim:
        actions = np.stack([np.arange(num_frames - 1, dtype=np.float32) + d * 1000 for d in range(action_dim)], 1)
    meta = ClipMeta(
        instruction=instruction or f"instruction of {key}", fps=10, num_frames=num_frames, width=size, height=size,
        source="test", episode_id=key, action_dim=action_dim,
    )
    return Clip(key=key, frames=frames, meta=meta, actions=actions)


def frame_index(frames) -> np.ndarray:
    """Recover frame indices from decoded index_clip frames [..., 3, S, S] uint8."""
    means = frames.float().mean(dim=(-1, -2, -3)).numpy()
    return np.rint((means - 8) / LEVEL_STEP).astype(int)


def write_set(directory: Path, shards: list[list[Clip]], codec: str = "h264", source: str = "test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, clips in enumerate(shards):
        with ShardWriter(directory / f"shard-{index:06d}.tar", codec=codec) as writer:
            for clip in clips:
                writer.write(clip)
    Manifest.gather(directory, source).write(directory)
    return directory


def index_set(directory: Path, num_shards: int, clips_per_shard: int, num_frames: int = 12, prefix: str = "c",
              size: int = 32, codec: str = "h264") -> Path:
    shards = [
        [index_clip(f"{prefix}{s:03d}_{c:03d}", num_frames, size) for c in range(clips_per_shard)]
        for s in range(num_shards)
    ]
    return write_set(directory, shards, codec)
