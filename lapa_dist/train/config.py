"""Config sections shared by every training stage: optimisation, DeepSpeed and the run length."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lapa_dist.config import StrictModel


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(default=0.0, ge=0)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=0.5, ge=0)
    """Global gradient-norm clip (0 disables)."""
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """cosine: the final learning rate as a fraction of lr."""


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_accumulation: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step; the global batch is data.batch_size x ranks x this."""


class TrainConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    """Optimizer steps of the whole run."""
    save_every: int = Field(default=500, ge=1)
    """Checkpoint every this many steps; the last step is always saved."""
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Keep an exponential moving average of the weights (used for labelling when present)."""


RESUMABLE_CHANGES = (
    "train.steps", "train.save_every", "train.keep_checkpoints", "logging", "data.num_workers",
    "model.kernels",  # same maths, another implementation
)
"""Config keys a re-run on an existing run directory may change (everything else must match)."""
