"""From one raw clip to training samples: pick frame indices, decode once, crop, attach targets.

view "pairs": x_t, x_next = frame t + H, actions [H, action_dim] taking t to t + H, latents[t].
view "frames": x_t with a per-frame target (actions[t] or latents[t]) for the VLA stages.
"""

from __future__ import annotations

import zlib

import numpy as np

from lapa_dist.data.config import DataConfig, DatasetSpec
from lapa_dist.data.format import ClipMeta
from lapa_dist.data.reader import BadSample, RawSample, decode_sample_frames, parse_arrays, parse_meta
from lapa_dist.data.transforms import decode_size, square_frames


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


def build_samples(config: DataConfig, spec: DatasetSpec, raw: RawSample, epoch: int) -> list[dict]:
    """Samples of one clip (``samples_per_clip`` at most); raises BadSample for a bad clip."""
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
    frames = decode_sample_frames(raw, indices.tolist(), size)  # [len(indices), h, w, 3]
    samples = []
    for i, t in enumerate(starts.tolist()):
        common = {"instruction": meta.instruction, "key": raw.key, "dataset": spec.name, "t": t}
        if config.view == "pairs":
            pair = square_frames(frames[[i, i + len(starts)]], config.image_size, config.augment, rng)
            sample = {"x_t": pair[0], "x_next": pair[1], "offset": offset, **common}
            if actions is not None:
                sample["actions"] = actions[t : t + offset]  # [H, action_dim]
            if latents is not None and t < latents.shape[0] and meta.latent_offset == offset:
                sample["latents"] = latents[t]
        else:
            sample = {"x_t": square_frames(frames[i : i + 1], config.image_size, config.augment, rng)[0], **common}
            if config.target == "actions":
                sample["target"] = actions[t]
            elif config.target == "latents":
                sample["target"] = latents[t]
        samples.append(sample)
    return samples
