"""The VLA's vision tower, chosen in config: what turns an image into the image positions of the sequence.

    vqgan  LWM's VQGAN (frozen): image [B, 3, S, S] -> codes [B, N] (N = 256 for 256 x 256), embedded in the LM
           by the VLA's image-token table, followed by the end-of-vision code (LWM's layout).
    vit    a transformers ViT (SigLIP / DINOv2, frozen by default) + MLP projector: image -> embeddings
           [B, N, D] placed directly at the image positions; no end-of-vision code.

Both take images as float [B, 3, S, S] in [0, 1]; ``discrete`` says which kind of output a tower gives.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from lapa_dist.config import StrictModel
from lapa_dist.models.vit_tower import ViTTower, ViTTowerConfig
from lapa_dist.models.vqgan import VQGAN, VQGANConfig


class VisionConfig(StrictModel):
    """Which tower reads the image, and its shape or weights."""

    tower: Literal["vqgan", "vit"] = "vqgan"
    vqgan: VQGANConfig | None = None
    """vqgan: shape of a randomly initialised VQGAN (tests, demo); exclusive with vqgan_path."""
    vqgan_path: str | None = None
    """vqgan: a ``VQGAN.save_pretrained`` directory, e.g. tools/convert_lwm.py's ``vqgan/`` output."""
    vit: ViTTowerConfig | None = None
    """vit: the ViT and projector."""

    @model_validator(mode="after")
    def _one_source(self) -> VisionConfig:
        if self.tower == "vqgan":
            if (self.vqgan is None) == (self.vqgan_path is None):
                raise ValueError("vision: tower 'vqgan' needs exactly one of vqgan (a shape) and vqgan_path")
            if self.vit is not None:
                raise ValueError("vision: vit is set but tower is 'vqgan'")
        elif self.vit is None:
            raise ValueError("vision: tower 'vit' needs the vit section")
        elif self.vqgan is not None or self.vqgan_path is not None:
            raise ValueError("vision: vqgan/vqgan_path are set but tower is 'vit'")
        return self


class VQGANTower(nn.Module):
    """A frozen VQGAN used as an image tokenizer: images [B, 3, S, S] in [0, 1] -> codes [B, N]."""

    discrete = True

    def __init__(self, vqgan: VQGAN):
        super().__init__()
        self.vqgan = vqgan.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> VQGANTower:
        return super().train(False)  # frozen: always in eval mode

    @property
    def num_tokens(self) -> int:
        return self.vqgan.num_tokens

    @property
    def image_size(self) -> int:
        return self.vqgan.config.resolution

    @property
    def codebook_size(self) -> int:
        return self.vqgan.codebook_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(images)  # [B, N] int64


def build_vision_tower(config: VisionConfig, llm_hidden: int) -> VQGANTower | ViTTower:
    """The tower of ``config``; both kinds have ``discrete``, ``num_tokens`` and ``image_size``."""
    if config.tower == "vit":
        return ViTTower(config.vit, llm_hidden)
    vqgan = VQGAN.from_pretrained(config.vqgan_path) if config.vqgan_path else VQGAN(config.vqgan)
    return VQGANTower(vqgan)
