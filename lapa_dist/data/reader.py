"""Reading shards back: tar members grouped into samples, and samples parsed into clips.

Problems are reported as :class:`BadSample` with a reason from :data:`BAD_REASONS`, so that the
loader and tools/check_shards.py count them the same way.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from lapa_dist.data.format import VIDEO_MEMBER, Clip, ClipMeta, Manifest, npy_load
from lapa_dist.data.video import VideoDecodeError, decode_frames

BAD_REASONS = (
    "truncated_tar",  # the tar ends inside a member or has a corrupt header
    "missing_video",
    "missing_json",
    "invalid_json",  # not JSON, or does not satisfy ClipMeta
    "undecodable_video",
    "empty_video",
    "too_short",  # fewer than H + 1 frames for the pair offset asked for
    "bad_actions",  # wrong dtype, shape or length, or not finite
    "bad_latents",
)


class BadSample(ValueError):
    def __init__(self, key: str, reason: str, detail: str = ""):
        assert reason in BAD_REASONS, reason
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.key, self.reason, self.detail = key, reason, detail


@dataclass
class RawSample:
    """One sample's members as bytes, keyed by extension ("mp4", "json", "actions.npy", ...)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    shard: str = ""


def iter_raw_samples(shard_path: str | Path, skip: int = 0) -> Iterator[RawSample | BadSample]:
    """Samples of a shard in order; the first ``skip`` samples are passed over without reading
    their payload. A truncated or corrupt tar ends the shard with one BadSample("truncated_tar")."""
    shard_path = Path(shard_path)
    current: RawSample | None = None
    seen = 0
    try:
        with tarfile.open(shard_path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, extension = info.name.rpartition("/")[2].partition(".")
                if current is not None and key != current.key:
                    if seen >= skip:
                        yield current
                    seen += 1
                    current = None
                if current is None:
                    current = RawSample(key=key, shard=shard_path.name)
                if seen >= skip:
                    handle = tar.extractfile(info)
                    data = handle.read() if handle is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} truncated")
                    current.members[extension] = data
    except (tarfile.TarError, OSError, EOFError) as error:
        key = current.key if current is not None else f"{shard_path.name}:<header>"
        yield BadSample(key, "truncated_tar", f"{shard_path.name}: {error}")
        return
    if current is not None and seen >= skip:
        yield current


def parse_meta(sample: RawSample) -> ClipMeta:
    if VIDEO_MEMBER not in sample.members:
        raise BadSample(sample.key, "missing_video")
    if "json" not in sample.members:
        raise BadSample(sample.key, "missing_json")
    try:
        return ClipMeta.model_validate(json.loads(sample.members["json"]))
    except (ValueError, ValidationError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadSample(sample.key, "invalid_json", first_line) from None


def parse_arrays(sample: RawSample, meta: ClipMeta) -> tuple[np.ndarray | None, np.ndarray | None]:
    """actions [num_frames - 1, action_dim] float32 and latents [num_frames - H, s] int16, or None."""
    actions = latents = None
    if "actions.npy" in sample.members:
        try:
            actions = npy_load(sample.members["actions.npy"])
        except ValueError as error:
            raise BadSample(sample.key, "bad_actions", str(error)) from None
        if (
            actions.ndim != 2
            or actions.shape[0] != meta.num_frames - 1
            or not np.issubdtype(actions.dtype, np.floating)
        ):
            raise BadSample(
                sample.key, "bad_actions", f"shape {actions.shape} {actions.dtype}, expected [{meta.num_frames - 1}, d]"
            )
        if not np.isfinite(actions).all():
            raise BadSample(sample.key, "bad_actions", "NaN or inf")
        actions = actions.astype(np.float32, copy=False)
    if "latents.npy" in sample.members:
        try:
            latents = npy_load(sample.members["latents.npy"])
        except ValueError as error:
            raise BadSample(sample.key, "bad_latents", str(error)) from None
        offset = meta.latent_offset
        if offset is None or latents.ndim != 2 or latents.shape[0] != meta.num_frames - offset:
            raise BadSample(sample.key, "bad_latents", f"shape {latents.shape}, latent_offset {offset}")
    return actions, latents


@dataclass
class ParsedSample:
    """A sample whose json and arrays are parsed and checked; its video is still undecoded bytes."""

    sample: RawSample
    meta: ClipMeta
    actions: np.ndarray | None  # [num_frames - 1, action_dim] float32
    latents: np.ndarray | None  # [num_frames - latent_offset, code_seq_len] int16

    @property
    def key(self) -> str:
        return self.sample.key


def iter_parsed_samples(directory: str | Path, skipped: Counter, shards: Container[str] | None = None,
                        keys: Container[str] | None = None) -> Iterator[ParsedSample]:
    """The samples of the shard set in ``directory`` in manifest order, parsed without decoding video.

    ``shards`` and ``keys`` (names and clip keys) restrict what is read; a sample that fails to parse is
    passed over and counted in ``skipped`` by its :data:`BAD_REASONS` reason."""
    directory = Path(directory)
    for shard in Manifest.read(directory).shards:
        if shards is not None and shard.name not in shards:
            continue
        for sample in iter_raw_samples(directory / shard.name):
            if isinstance(sample, BadSample):
                skipped[sample.reason] += 1
                continue
            if keys is not None and sample.key not in keys:
                continue
            try:
                meta = parse_meta(sample)
                actions, latents = parse_arrays(sample, meta)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            yield ParsedSample(sample, meta, actions, latents)


def decode_sample_frames(sample: RawSample, indices=None, size=None) -> np.ndarray:
    """Decode frames of the sample's video; failures become BadSample (empty or undecodable)."""
    try:
        return decode_frames(sample.members[VIDEO_MEMBER], indices, size)
    except VideoDecodeError as error:
        reason = "empty_video" if error.frames_seen == 0 else "undecodable_video"
        raise BadSample(sample.key, reason, str(error)) from None


def decode_clip(sample: RawSample, indices=None, size=None) -> Clip:
    """Parse and decode a whole sample (all frames unless ``indices``); raises BadSample."""
    meta = parse_meta(sample)
    actions, latents = parse_arrays(sample, meta)
    frames = decode_sample_frames(sample, indices, size)
    return Clip(key=sample.key, frames=frames, meta=meta, actions=actions, latents=latents)


def read_shard_clips(shard_path: str | Path) -> Iterator[Clip]:
    """Every clip of a shard, decoded in full (tests and tools; the loader decodes selectively)."""
    for sample in iter_raw_samples(shard_path):
        if isinstance(sample, BadSample):
            raise sample
        yield decode_clip(sample)
