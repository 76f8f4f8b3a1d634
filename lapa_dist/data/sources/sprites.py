"""Synthetic sprite clips with known actions: coloured squares moving on a textured background.

Every step the agent square moves by one of 8 directions (the action, [dx, dy] in pixels); the
direction changes every few steps. Cheap to make at any size, so tests, benchmarks and the
quick-start use it where a simulator would be slow; the true actions make latent probes meaningful.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from lapa_dist.data.convert import Source
from lapa_dist.data.format import Clip, ClipMeta

DIRECTIONS = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)], np.float32)
DIRECTION_NAMES = ["right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right"]


def make_sprite_clip(
    index: int, num_frames: int = 24, size: int = 64, speed: int = 2, hold: int = 6, seed: int = 0
) -> Clip:
    """Clip ``index`` of the synthetic set; a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    ys, xs = np.mgrid[0:size, 0:size]
    background = (
        96 + 40 * np.sin(xs[..., None] / (5 + 3 * rng.random(3))) * np.cos(ys[..., None] / (7 + 3 * rng.random(3)))
    ).astype(np.uint8)
    side = max(4, size // 8)
    colour = rng.integers(150, 256, 3).astype(np.uint8)
    position = rng.integers(side, size - 2 * side, 2).astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    actions = np.empty((num_frames - 1, 2), np.float32)
    direction = int(rng.integers(8))
    for t in range(num_frames):
        frame = background.copy()
        x, y = position.astype(int)
        frame[y : y + side, x : x + side] = colour
        frames[t] = frame
        if t == num_frames - 1:
            break
        if t % hold == 0:
            direction = int(rng.integers(8))
        step = DIRECTIONS[direction] * speed
        new_position = np.clip(position + step, 0, size - side)
        actions[t] = new_position - position
        position = new_position
    meta = ClipMeta(
        instruction=f"move the square {DIRECTION_NAMES[direction]}",
        fps=10.0,
        num_frames=num_frames,
        width=size,
        height=size,
        source="sprites",
        episode_id=str(index),
        camera="top",
        action_dim=2,
    )
    return Clip(key=f"sprites-{index:08d}", frames=frames, meta=meta, actions=actions)


class SpriteSource(Source):
    name = "sprites"
    default_units_per_shard = 16

    def __init__(self, clips: int, num_frames: int = 24, size: int = 64, seed: int = 0):
        if clips < 1 or num_frames < 2 or size < 16:
            raise ValueError("sprites: need clips >= 1, frames >= 2, size >= 16")
        self.num_clips, self.num_frames, self.size, self.seed = clips, num_frames, size, seed

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clips", type=int, default=64)
        parser.add_argument("--frames", type=int, default=24)
        parser.add_argument("--size", type=int, default=64)
        parser.add_argument("--seed", type=int, default=0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SpriteSource:
        return cls(args.clips, args.frames, args.size, args.seed)

    def work_units(self) -> list[int]:
        return list(range(self.num_clips))

    def clips(self, unit: int) -> Iterator[Clip]:
        yield make_sprite_clip(unit, self.num_frames, self.size, seed=self.seed)
