"""From one raw clip to training samples, in three steps so that decoding can be batched:

1. ``plan_clip``: parse and validate the clip, pick the start frames t and the frame indices to decode;
2. a :class:`FrameDecoder` decodes the frames of a whole block of plans (PyAV one by one on CPU, or
   DALI in one batch);
3. ``assemble_samples``: crop/augment and attach instruction and targets.

view "pairs": x_t, x_next = frame t + H, actions [H, action_dim] taking t to t + H, latents[t].
view "frames": x_t with a per-frame target (actions[t] or latents[t]) for the VLA stages.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lapa_dist.data.config import DataConfig, DatasetSpec
from lapa_dist.data.format import ClipMeta
from lapa_dist.data.reader import BadSample, RawSample, decode_sample_frames, parse_arrays, parse_meta
from lapa_dist.data.transforms import decode_size, square_frames


@dataclass
class ClipPlan:
    raw: RawSample
    meta: ClipMeta
    dataset: str
    offset: int  # H in frames
    starts: np.ndarray  # [k] sorted start frames t
    indices: list[int]  # frames to decode: starts, then starts + H for pairs
    size: tuple[int, int]  # (width, height) to decode at
    rng: np.random.Generator
    actions: np.ndarray | None
    latents: np.ndarray | None


class FrameDecoder(Protocol):
    def decode(self, plans: list[ClipPlan]) -> list[np.ndarray | BadSample]:
        """Frames [len(plan.indices), height, width, 3] uint8 for each plan, or why it failed."""


class PyAVDecoder:
    """CPU decoding, one clip at a time, in the loader worker."""

    def decode(self, plans: list[ClipPlan]) -> list[np.ndarray | BadSample]:
        results: list[np.ndarray | BadSample] = []
        for plan in plans:
            try:
                results.append(decode_sample_frames(plan.raw, plan.indices, plan.size))
            except BadSample as bad:
                results.append(bad)
        return results


def clip_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """The random stream of one clip in one epoch: independent of worker layout and resumption."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), epoch])


def valid_starts(config: DataConfig, meta: ClipMeta, offset: int, num_latent_rows: int | None) -> int:
    """How many start frames t the clip offers for the configured view and target."""
    if config.view == "pairs":
        return meta.num_frames - offset
    if config.target == "actions":
        return meta.num_frames - 1
    if config.target == "latents":
        return num_latent_rows or 0
    return meta.num_frames


def plan_clip(config: DataConfig, spec: DatasetSpec, raw: RawSample, epoch: int) -> ClipPlan:
    """Parse, validate and choose frames; raises BadSample for a bad clip."""
    meta = parse_meta(raw)
    actions, latents = parse_arrays(raw, meta)
    offset = spec.offset_for(meta.fps)
    if config.target == "actions" and actions is None:
        raise BadSample(raw.key, "bad_actions", "the config asks for actions; the clip has none")
    if config.target == "latents" and latents is None:
        raise BadSample(raw.key, "bad_latents", "the config asks for latents; the clip has none")
    num_starts = valid_starts(config, meta, offset, None if latents is None else latents.shape[0])
    if num_starts < 1:
        raise BadSample(raw.key, "too_short", f"{meta.num_frames} frames, offset H = {offset}")
    rng = clip_rng(config.seed, raw.key, epoch)
    starts = np.sort(rng.choice(num_starts, min(config.samples_per_clip, num_starts), replace=False))
    indices = np.concatenate([starts, starts + offset]) if config.view == "pairs" else starts
    size = decode_size(meta.width, meta.height, config.image_size, config.augment)
    return ClipPlan(raw, meta, spec.name, offset, starts, indices.tolist(), size, rng, actions, latents)


def assemble_samples(config: DataConfig, plan: ClipPlan, frames: np.ndarray) -> list[dict]:
    """Samples of one planned clip from its decoded frames [len(plan.indices), h, w, 3]."""
    samples = []
    num_starts = len(plan.starts)
    for i, t in enumerate(plan.starts.tolist()):
        sample = {"instruction": plan.meta.instruction, "key": plan.raw.key, "dataset": plan.dataset, "t": t}
        if config.view == "pairs":
            pair = square_frames(frames[i :: num_starts], config.image_size, config.augment, plan.rng)  # [2, S, S, 3]
            sample.update(x_t=pair[0], x_next=pair[1], offset=plan.offset)
            if plan.actions is not None:
                sample["actions"] = plan.actions[t : t + plan.offset]  # [H, action_dim]
            latents = plan.latents
            if latents is not None and t < latents.shape[0] and plan.meta.latent_offset == plan.offset:
                sample["latents"] = latents[t]
        else:
            sample["x_t"] = square_frames(frames[i : i + 1], config.image_size, config.augment, plan.rng)[0]
            if config.target == "actions":
                sample["target"] = plan.actions[t]
            elif config.target == "latents":
                sample["target"] = plan.latents[t]
        samples.append(sample)
    return samples
