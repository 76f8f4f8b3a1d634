"""Configuration of the video loader (the ``data`` section of every stage's config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lapa_dist.config import StrictModel


class FrameOffset(StrictModel):
    """The frame offset H between x_t and x_next, given in frames or in seconds (exactly one)."""

    offset_frames: int | None = Field(default=None, ge=1)
    """Frame offset H between x_t and x_next, in frames (SSv2 in the reference: 30)."""
    offset_seconds: float | None = Field(default=None, gt=0)
    """Frame offset H in seconds, converted with each clip's fps (Open-X / Bridge: 0.6)."""

    @model_validator(mode="after")
    def _one_offset(self) -> FrameOffset:
        if (self.offset_frames is None) == (self.offset_seconds is None):
            raise ValueError("set exactly one of offset_frames and offset_seconds")
        return self

    def offset_for(self, fps: float) -> int:
        """H in frames for a clip recorded at ``fps``."""
        if self.offset_frames is not None:
            return self.offset_frames
        return max(1, round(self.offset_seconds * fps))


class DatasetSpec(FrameOffset):
    """One shard set in the mixture."""

    name: str = Field(min_length=1)
    """Name used in logs and metrics."""
    path: str = Field(min_length=1)
    """Directory of the shard set (holds manifest.json)."""
    weight: float = Field(default=1.0, gt=0)
    """Relative sampling weight in the mixture (per clip)."""


class AugmentConfig(StrictModel):
    """Augmentation applied identically to both frames of a pair."""

    enabled: bool = False
    crop_scale: float = Field(default=0.9, gt=0, le=1)
    """Random crop covering this fraction of the (square-resized) frame area."""
    brightness: float = Field(default=0.2, ge=0, le=1)
    contrast: float = Field(default=0.2, ge=0, le=1)
    saturation: float = Field(default=0.2, ge=0, le=1)


class DataConfig(StrictModel):
    """How frames are read, sampled and batched."""

    datasets: list[DatasetSpec] = Field(min_length=1)
    view: Literal["pairs", "frames"] = "pairs"
    """pairs: (x_t, x_next) for LAQ; frames: (x_t, instruction, target) for the VLA stages."""
    target: Literal["none", "actions", "latents"] = "none"
    """frames view: the per-frame target; clips without it are skipped and counted."""
    image_size: int = Field(default=64, ge=8, le=4096)
    """Frames are resized (shorter side) and centre-cropped to image_size x image_size."""
    samples_per_clip: int = Field(default=8, ge=1)
    """Pairs (or frames) sampled from each decoded clip."""
    shuffle_block_clips: int = Field(default=8, ge=1)
    """Clips decoded together whose samples are shuffled before batching."""
    batch_size: int = Field(default=16, ge=1)
    """Per-rank batch size."""
    num_workers: int = Field(default=2, ge=0)
    decoder: Literal["pyav", "dali"] = "pyav"
    """pyav: CPU decoding in loader workers; dali: NVIDIA DALI (GPU H.264, CPU VP9)."""
    dali_device: Literal["cpu", "mixed"] = "mixed"
    """DALI video decoding device: mixed = GPU (H.264, VP9), cpu = VP9/VP8/MJPEG only."""
    seed: int = 0
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    """Stop with an error when more than this fraction of clips read is bad."""
    bad_check_after: int = Field(default=100, ge=1)
    """Clips read before max_bad_fraction is enforced."""
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must be unique, got {names}")
        if self.view == "pairs" and self.target != "none":
            raise ValueError("target applies to view 'frames' only")
        if self.decoder == "dali" and self.num_workers:
            # DALI runs its own threads (and CUDA), which cannot live in forked DataLoader workers;
            # num_workers also fixes the reader layout, so it is not silently changed.
            raise ValueError(
                f"decoder 'dali' decodes in the main process: set num_workers to 0 (got {self.num_workers})"
            )
        return self
