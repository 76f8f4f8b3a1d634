"""Writing shard sets: one tar per shard, written to a temporary name and renamed when complete."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from lapa_dist.data.format import (
    VIDEO_MEMBER,
    Clip,
    ShardInfo,
    npy_bytes,
    sidecar_path,
    write_json_atomic,
)
from lapa_dist.data.video import encode_video

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def validate_clip(clip: Clip) -> None:
    """Raise ValueError naming the clip and the problem if the clip breaks the shard format."""
    meta = clip.meta
    where = f"clip {clip.key!r}"
    if not KEY_PATTERN.match(clip.key):
        raise ValueError(f"{where}: key may hold only letters, digits, '_' and '-'")
    if clip.video_bytes is None:
        shape = clip.frames.shape
        if clip.frames.dtype != np.uint8 or clip.frames.ndim != 4 or shape[-1] != 3:
            raise ValueError(f"{where}: frames must be uint8 [T, H, W, 3], got {clip.frames.dtype} {shape}")
        if (shape[0], shape[1], shape[2]) != (meta.num_frames, meta.height, meta.width):
            raise ValueError(
                f"{where}: frames {shape[:3]} disagree with json num_frames/height/width "
                f"({meta.num_frames}, {meta.height}, {meta.width})"
            )
    if clip.actions is not None:
        actions = clip.actions
        if actions.dtype != np.float32 or actions.ndim != 2 or actions.shape[0] != meta.num_frames - 1:
            raise ValueError(
                f"{where}: actions must be float32 [num_frames - 1 = {meta.num_frames - 1}, action_dim], "
                f"got {actions.dtype} {actions.shape}"
            )
        if meta.action_dim != actions.shape[1]:
            raise ValueError(f"{where}: json action_dim {meta.action_dim} != actions.shape[1] {actions.shape[1]}")
        if not np.isfinite(actions).all():
            raise ValueError(f"{where}: actions hold NaN or inf")
    if clip.latents is not None:
        if meta.latent_offset is None:
            raise ValueError(f"{where}: latents given without latent_offset in the json")
        expected = meta.num_frames - meta.latent_offset
        if clip.latents.dtype != np.int16 or clip.latents.ndim != 2 or clip.latents.shape[0] != expected:
            raise ValueError(
                f"{where}: latents must be int16 [num_frames - latent_offset = {expected}, code_seq_len], "
                f"got {clip.latents.dtype} {clip.latents.shape}"
            )


class ShardWriter:
    """Writes clips into ``shard_path`` (via a temporary file); ``close()`` makes it visible
    together with its sidecar. A writer that is not closed leaves no shard behind."""

    def __init__(self, shard_path: str | os.PathLike, codec: str = "h264", crf: int = 18):
        self.shard_path = Path(shard_path)
        self.codec = codec
        self.crf = crf
        self._tmp_path = self.shard_path.with_name(f".{self.shard_path.name}.tmp{os.getpid()}")
        self._tar = tarfile.open(self._tmp_path, "w")
        self._keys: list[str] = []
        self._clip_frames: list[int] = []
        self.skipped: Counter = Counter()  # clips the producer could not convert, by reason

    @property
    def num_clips(self) -> int:
        return len(self._keys)

    def write(self, clip: Clip) -> None:
        validate_clip(clip)
        if clip.key in self._keys:
            raise ValueError(f"clip {clip.key!r}: key written twice in {self.shard_path.name}")
        meta = clip.meta
        if clip.video_bytes is None:
            video = encode_video(clip.frames, meta.fps, self.codec, self.crf)
            meta = meta.model_copy(update={"codec": self.codec})
        else:
            video = clip.video_bytes
        members = {
            VIDEO_MEMBER: video,
            "json": json.dumps(meta.model_dump(exclude_none=True)).encode(),
        }
        if clip.actions is not None:
            members["actions.npy"] = npy_bytes(clip.actions)
        if clip.latents is not None:
            members["latents.npy"] = npy_bytes(clip.latents)
        self.write_members(clip.key, members)
        self._clip_frames[-1] = meta.num_frames

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Write a sample given as raw members (extension -> bytes); the json must hold num_frames."""
        now = int(time.time())
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), now, 0o644  # int mtime: no pax header per member
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.append(key)
        self._clip_frames.append(int(json.loads(members["json"])["num_frames"]))

    def close(self) -> ShardInfo:
        self._tar.close()
        info = ShardInfo(
            name=self.shard_path.name,
            clips=len(self._keys),
            frames=sum(self._clip_frames),
            keys=self._keys,
            clip_frames=self._clip_frames,
            skipped=dict(self.skipped),
        )
        os.replace(self._tmp_path, self.shard_path)
        write_json_atomic(sidecar_path(self.shard_path), info.model_dump())
        return info

    def abort(self) -> None:
        self._tar.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
