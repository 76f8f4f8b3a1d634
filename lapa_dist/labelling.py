"""Labelling: the trained LAQ encoder gives every (t, t + H) pair of every clip its latent action.

The one place where the data pipeline and the LAQ model meet. Output shards copy every member of the
input (video bytes unchanged) and add ``<key>.latents.npy`` (int16 [num_frames - H, code_seq_len]) and
``latent_offset`` = H in the json. Shards are split over ranks (shard i -> rank i % world); a shard
whose output sidecar exists is skipped, so re-running resumes. Clips that cannot be labelled (bad
video, shorter than H + 1) are copied without latents and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from lapa_dist.data.config import FrameOffset
from lapa_dist.data.format import ClipMeta, Manifest, npy_bytes, npy_load, sidecar_path
from lapa_dist.data.reader import BadSample, RawSample, decode_sample_frames, iter_raw_samples, parse_meta
from lapa_dist.data.transforms import crop_square, resized_size
from lapa_dist.data.writer import ShardWriter
from lapa_dist.models.laq import LAQ

log = logging.getLogger(__name__)


class LabelConfig(FrameOffset):
    """H (offset_frames or offset_seconds, exactly one) and the encoder batch size."""

    batch_size: int = Field(default=64, ge=1)
    """Frame pairs per encoder forward."""


def clip_frames(sample: RawSample, image_size: int) -> torch.Tensor:
    """All frames of a clip as float [T, 3, S, S] in [0, 1], resized and centre-cropped as the loader does."""
    meta = parse_meta(sample)
    frames = decode_sample_frames(sample, None, resized_size(meta.width, meta.height, image_size))
    frames = np.ascontiguousarray(crop_square(frames, image_size, None))
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def encode_clip(model: LAQ, frames: torch.Tensor, offset: int, batch_size: int, device: torch.device) -> np.ndarray:
    """Latent actions of every pair (t, t + H): int16 [T - H, code_seq_len]."""
    codes = []
    for start in range(0, frames.shape[0] - offset, batch_size):
        stop = min(start + batch_size, frames.shape[0] - offset)
        x_t = frames[start:stop].to(device)
        x_next = frames[start + offset : stop + offset].to(device)
        codes.append(model.encode(x_t, x_next).cpu())
    return torch.cat(codes).numpy().astype(np.int16)


def relabel_shard(input_path: Path, output_path: Path, label: Callable[[RawSample, ClipMeta], dict[str, bytes]],
                  counts: Counter) -> None:
    """Copy a shard clip by clip with the members ``label(sample, meta)`` returns added or replaced (video bytes
    unchanged). A clip that ``label`` rejects with BadSample is copied as it is (dropped when its json is
    unreadable); ``counts`` gets the reason, ``clips_labelled`` and ``clips_copied_unlabelled``."""
    with ShardWriter(output_path) as writer:
        for sample in iter_raw_samples(input_path):
            if isinstance(sample, BadSample):  # truncated tar: nothing more to copy from this shard
                counts[sample.reason] += 1
                log.warning("%s: %s", input_path.name, sample)
                break
            meta = None
            try:
                meta = parse_meta(sample)
                members = {**sample.members, **label(sample, meta)}
            except BadSample as bad:
                counts[bad.reason] += 1
                log.warning("not labelled%s: %s", "" if meta else " (dropped)", bad)
                if meta is not None:  # a readable clip is copied unchanged
                    writer.write_members(sample.key, dict(sample.members))
                    counts["clips_copied_unlabelled"] += 1
                continue
            writer.write_members(sample.key, members)
            counts["clips_labelled"] += 1


def label_shard(
    model: LAQ, config: LabelConfig, input_path: Path, output_path: Path, device: torch.device, counts: Counter
) -> None:
    image_size = model.config.image_size

    def latent_members(sample: RawSample, meta: ClipMeta) -> dict[str, bytes]:
        offset = config.offset_for(meta.fps)
        if meta.num_frames < offset + 1:
            raise BadSample(sample.key, "too_short", f"{meta.num_frames} frames, H = {offset}")
        latents = encode_clip(model, clip_frames(sample, image_size), offset, config.batch_size, device)
        if latents.shape[0] != meta.num_frames - offset:
            raise BadSample(sample.key, "undecodable_video", "fewer frames than the json says")
        labelled = meta.model_copy(update={"latent_offset": offset})
        return {"json": labelled.model_dump_json(exclude_none=True).encode(), "latents.npy": npy_bytes(latents)}

    relabel_shard(input_path, output_path, latent_members, counts)


def label_shard_set(
    model: LAQ, config: LabelConfig, input_dir: Path, output_dir: Path, rank: int, world_size: int, device: torch.device
) -> Counter:
    """Label this rank's shards (shard i -> rank i % world_size); returns the clip counts (labelled, copied
    unlabelled, and problems by reason)."""
    manifest = Manifest.read(input_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    for index, shard in enumerate(manifest.shards):
        output_path = output_dir / shard.name
        if index % world_size == rank and not sidecar_path(output_path).is_file():
            label_shard(model, config, input_dir / shard.name, output_path, device, counts)
    return counts


def latent_distribution(output_dir: Path, top: int = 20) -> dict:
    """Distribution of latent actions over a labelled set (reads only latents.npy members)."""
    manifest = Manifest.read(output_dir)
    actions: Counter = Counter()
    per_position: list[Counter] = []
    for shard in manifest.shards:
        for sample in iter_raw_samples(output_dir / shard.name):
            if isinstance(sample, BadSample) or "latents.npy" not in sample.members:
                continue
            latents = npy_load(sample.members["latents.npy"])  # [T - H, s]
            actions.update(map(tuple, latents.tolist()))
            while len(per_position) < latents.shape[1]:
                per_position.append(Counter())
            for position, counter in enumerate(per_position):
                counter.update(latents[:, position].tolist())
    total = sum(actions.values())
    return {
        "pairs": total,
        "distinct_latent_actions": len(actions),
        "top": [{"latent_action": list(a), "fraction": n / total} for a, n in actions.most_common(top)],
        "per_position_code_fraction": [{int(c): n / total for c, n in sorted(p.items())} for p in per_position],
    }
