"""The on-disk shard format (docs/data.md): WebDataset tars of clips plus a manifest.

One clip = one WebDataset sample with the key ``<key>`` and the members
``<key>.mp4`` (H.264 by default; VP9 allowed, also in MP4), ``<key>.json`` (:class:`ClipMeta`), and optionally
``<key>.actions.npy`` (float32 [num_frames - 1, action_dim]; action t takes frame t to t+1) and
``<key>.latents.npy`` (int16 [num_frames - latent_offset, code_seq_len], written by labelling).

A shard set is a directory of ``shard-NNNNNN.tar`` files, one ``shard-NNNNNN.tar.json`` sidecar per
finished shard (its clip keys and frame counts; written last, so it marks the shard complete) and
``manifest.json`` that gathers the sidecars, so samplers never decode to count.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = "lapa_dist.shards/1"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:06d}.tar"
VIDEO_MEMBER = "mp4"  # H.264 or VP9, always in an MP4 container; the json names the codec


class ClipMeta(BaseModel):
    """Contents of ``<key>.json``: everything about a clip except its pixels and arrays."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(description="Natural-language task description; may be empty.")
    fps: float = Field(gt=0, description="Frame rate of the stored video.")
    num_frames: int = Field(ge=1, description="Frames stored in the video.")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    source: str = Field(min_length=1, description="Converter that produced the clip (rlds, ssv2, ...).")
    episode_id: str = Field(description="Episode identifier in the source dataset.")
    camera: str = Field(default="", description="Camera name in the source dataset.")
    codec: str = Field(default="h264", description="Video codec: h264 or vp9.")
    action_dim: int | None = Field(default=None, ge=1, description="Set when actions.npy is present.")
    latent_offset: int | None = Field(
        default=None, ge=1, description="Frame offset H of latents.npy (set by labelling)."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Source-specific fields (task name, success flag, ...)."
    )


@dataclass
class Clip:
    """A clip in memory, as converters produce it and the shard writer consumes it."""

    key: str  # unique within the shard set; [A-Za-z0-9_-] only (WebDataset splits keys on dots)
    frames: np.ndarray  # uint8 [num_frames, height, width, 3], RGB
    meta: ClipMeta
    actions: np.ndarray | None = None  # float32 [num_frames - 1, action_dim]
    latents: np.ndarray | None = None  # int16 [num_frames - latent_offset, code_seq_len]
    video_bytes: bytes | None = field(default=None, repr=False)  # pass-through, skips re-encoding


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sidecar_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + ".json")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


class ShardInfo(BaseModel):
    """One finished shard: what a sampler needs without opening the tar."""

    model_config = ConfigDict(extra="forbid")

    name: str
    clips: int
    frames: int
    keys: list[str]
    clip_frames: list[int]
    skipped: dict[str, int] = Field(default_factory=dict, description="Clips the converter skipped, by reason.")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT_VERSION
    source: str
    shards: list[ShardInfo]
    clips: int
    frames: int
    skipped: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def gather(cls, directory: Path, source: str) -> Manifest:
        """Build the manifest from the sidecars of the finished shards in ``directory``."""
        shards = []
        for sidecar in sorted(directory.glob("shard-*.tar.json")):
            shards.append(ShardInfo.model_validate_json(sidecar.read_text()))
        skipped: Counter = Counter()
        for shard in shards:
            skipped.update(shard.skipped)
        return cls(
            source=source,
            shards=shards,
            clips=sum(s.clips for s in shards),
            frames=sum(s.frames for s in shards),
            skipped=dict(skipped),
        )

    def write(self, directory: Path) -> None:
        write_json_atomic(directory / MANIFEST_NAME, self.model_dump())

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no manifest; is {directory} a shard set written by tools/make_shards.py?"
            )
        manifest = cls.model_validate_json(path.read_text())
        if manifest.format != FORMAT_VERSION:
            raise ValueError(f"{path}: format {manifest.format!r}, expected {FORMAT_VERSION!r}")
        return manifest
