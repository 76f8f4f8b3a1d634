"""LAQ: latent action quantization — an inverse-dynamics encoder and a world-model decoder.

Encoder (x_t, x_next) -> code_indices: both frames are cut into patches and embedded; a spatial
transformer runs on each frame, a temporal transformer across the two frames at each patch; the
difference of the two frames' tokens is projected to quant_dim, reduced by a small CNN from the
patch grid to code_seq_len vectors and quantized by NSVQ to a codebook of codebook_size codes.

Decoder (x_t, codes) -> x_next: the (detached) patch embeddings of x_t are the queries of a spatial
transformer that cross-attends to the code_seq_len latent-action tokens; a Linear maps back to pixels.
With ``predict_residual`` the decoder predicts x_next − x_t from a zero-initialised output layer,
so an untrained model already copies x_t and the latent action only has to explain the change.

Images are float [B, C, S, S] in [0, 1]. The loss is MSE(prediction, x_next), nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from lapa_dist.config import StrictModel
from lapa_dist.models.attention import ContinuousPositionBias, Transformer
from lapa_dist.models.nsvq import NSVQ, NSVQConfig


def reducer_plan(grid: int, code_side: int) -> tuple[int, int]:
    """(number of stride-2 convs, padding of the last 3×3 conv) that take a grid×grid map to code_side².

    Stride-2 3×3 convs (padding 1) halve the grid, rounding up, until it is code_side + 2 (then a 3×3
    conv without padding ends the stack) or code_side (then a 3×3 conv with padding 1). The reference
    8×8 -> 2×2 is one stride-2 conv (8 -> 4) and one unpadded conv (4 -> 2).
    """
    size, halvings = grid, 0
    while size not in (code_side, code_side + 2) and size > code_side:
        size = (size + 1) // 2
        halvings += 1
    if size == code_side + 2:
        return halvings, 0
    if size == code_side:
        return halvings, 1
    raise ValueError(
        f"the {grid}×{grid} patch grid cannot be reduced to {code_side}×{code_side} codes: stride-2 convs "
        f"take it to {size}×{size}, which is neither {code_side} nor {code_side + 2}"
    )


class KernelsConfig(StrictModel):
    """Implementations of NSVQ and the decoder's cross-attention: Triton kernels or their PyTorch references
    (lapa_dist/kernels/; same math, the kernels are fused). Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

    nsvq: Literal["triton", "torch"] = "triton"
    """Training-mode NSVQ: "triton" runs the fused kernels where Triton can run and the PyTorch reference
    elsewhere (so also on a plain CPU); "torch" always runs the reference."""
    cross_attention: Literal["auto", "triton", "sdpa"] = "auto"
    """Decoder cross-attention: "auto" is Triton on CUDA when the keys (code_seq_len + num_null_kv) fit the
    kernel, SDPA otherwise; "triton" always the kernel (an error where it cannot run); "sdpa" torch SDPA."""


class LAQModelConfig(StrictModel):
    """LAQ architecture; the defaults are the reference (paper) model, about 0.34B parameters."""

    image_size: int = Field(default=256, ge=1)
    """Frames are image_size × image_size pixels."""
    patch_size: int = Field(default=32, ge=1, validate_default=True)
    """Square patch side in pixels; the token grid is (image_size / patch_size)²."""
    channels: int = Field(default=3, ge=1)
    """Colour channels of a frame."""
    dim: int = Field(default=1024, ge=1)
    """Token width of every transformer."""
    heads: int = Field(default=16, ge=1)
    """Attention heads."""
    dim_head: int = Field(default=64, ge=1)
    """Width of one attention head."""
    ff_mult: int = Field(default=4, ge=1)
    """Feed-forward size multiplier (GEGLU hidden width is ff_mult · 2/3 · dim)."""
    spatial_depth: int = Field(default=8, ge=1)
    """Blocks of the encoder's spatial transformer (within each frame)."""
    temporal_depth: int = Field(default=8, ge=1)
    """Blocks of the encoder's temporal transformer (across the two frames, not causal)."""
    decoder_depth: int = Field(default=8, ge=1)
    """Blocks of the decoder (self-attention, cross-attention to the latent action, feed-forward)."""
    quant_dim: int = Field(default=32, ge=1)
    """Width of a code vector."""
    codebook_size: int = Field(default=8, ge=2)
    """Codes in the codebook (|C|)."""
    code_seq_len: int = Field(default=4, ge=1, validate_default=True)
    """Codes per latent action: a square number, reached from the patch grid by the conv reducer."""
    num_null_kv: int = Field(default=2, ge=0)
    """Learned null key/value pairs in the decoder's cross-attention."""
    nsvq: NSVQConfig = Field(default_factory=NSVQConfig, validate_default=True)
    """Quantizer noise, dead-code replacement threshold, noise and schedule."""
    predict_residual: bool = False
    """Decoder predicts x_next − x_t (output layer zero-initialised) instead of x_next (reference)."""
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    """Triton kernels or PyTorch references for NSVQ and the decoder's cross-attention."""

    @field_validator("patch_size")
    @classmethod
    def _patch_divides_image(cls, patch_size: int, info: ValidationInfo) -> int:
        image_size = info.data.get("image_size")
        if image_size is not None and image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        return patch_size

    @field_validator("code_seq_len")
    @classmethod
    def _reducible_grid(cls, code_seq_len: int, info: ValidationInfo) -> int:
        side = math.isqrt(code_seq_len)
        if side * side != code_seq_len:
            raise ValueError(f"code_seq_len {code_seq_len} is not a square number (the codes form a grid)")
        if "image_size" in info.data and "patch_size" in info.data:
            reducer_plan(info.data["image_size"] // info.data["patch_size"], side)
        return code_seq_len

    @field_validator("nsvq")
    @classmethod
    def _some_code_alive(cls, nsvq: NSVQConfig, info: ValidationInfo) -> NSVQConfig:
        size = info.data.get("codebook_size")
        if size is not None and nsvq.replace_threshold >= 1 / size:
            raise ValueError(
                f"replace_threshold {nsvq.replace_threshold} must be below 1/codebook_size = {1 / size:.4g}"
            )
        return nsvq

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


def to_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, (S/p)², C·p·p]: patches in row-major order, each flattened as (c, y, x)."""
    b, c, height, width = images.shape
    p = patch_size
    patches = images.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (height // p) * (width // p), c * p * p)


def from_patches(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B, g², C·p·p] -> [B, C, g·p, g·p], the inverse of ``to_patches``."""
    b, n, _ = patches.shape
    g, p = math.isqrt(n), patch_size
    images = patches.reshape(b, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(b, channels, g * p, g * p)


class PatchEmbedding(nn.Module):
    """[B, C, S, S] -> [B, N, D]: patches, LayerNorm -> Linear -> LayerNorm."""

    def __init__(self, channels: int, patch_size: int, dim: int):
        super().__init__()
        patch_dim = channels * patch_size**2
        self.patch_size = patch_size
        self.net = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_patches(images, self.patch_size))


class GridReducer(nn.Module):
    """[B, grid², quant_dim] -> [B, code_side², quant_dim] by the convolutions of ``reducer_plan``."""

    def __init__(self, quant_dim: int, grid: int, code_side: int):
        super().__init__()
        halvings, last_padding = reducer_plan(grid, code_side)
        layers: list[nn.Module] = []
        for _ in range(halvings):
            layers += [nn.Conv2d(quant_dim, quant_dim, 3, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(quant_dim, quant_dim, 3, padding=last_padding))
        self.grid = grid
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # [B, quant_dim, g, g]
        return self.convs(z).flatten(2).transpose(1, 2)  # [B, code_side², quant_dim]


@dataclass
class LAQOutput:
    loss: torch.Tensor
    """[]: MSE(prediction, x_next), the training loss."""
    prediction: torch.Tensor
    """[B, C, S, S]: predicted x_next (not clamped)."""
    code_indices: torch.Tensor
    """[B, code_seq_len] long: the latent action of each pair."""
    code_counts: torch.Tensor
    """[codebook_size] long: uses of each code in this batch."""
    quantization_error: torch.Tensor
    """[]: mean ‖z − q‖ (detached)."""
    copy_loss: torch.Tensor
    """[]: MSE(x_t, x_next) (detached), the copy baseline the loss should beat."""


class LAQ(nn.Module):
    """Latent action quantizer: ``forward`` trains, ``encode`` labels, ``decode``/``imagine`` predict frames."""

    def __init__(self, config: LAQModelConfig):
        super().__init__()
        c = config
        self.config = config
        grid = (c.grid_size, c.grid_size)
        width = {"dim": c.dim, "heads": c.heads, "dim_head": c.dim_head, "ff_mult": c.ff_mult}
        self.patch_embed = PatchEmbedding(c.channels, c.patch_size, c.dim)
        self.position_bias = ContinuousPositionBias(c.dim, c.heads, grid)  # encoder and decoder share it
        self.spatial = Transformer(c.spatial_depth, grid=grid, **width)
        self.temporal = Transformer(c.temporal_depth, grid=(2,), **width)
        self.to_quant = nn.Linear(c.dim, c.quant_dim)
        self.reducer = GridReducer(c.quant_dim, c.grid_size, math.isqrt(c.code_seq_len))
        self.quantizer = NSVQ(c.codebook_size, c.quant_dim, c.nsvq, backend=c.kernels.nsvq)
        self.from_quant = nn.Linear(c.quant_dim, c.dim)
        # tells the decoder which slot a code is in, so the code_seq_len codes are a sequence, not a set
        self.action_position = nn.Parameter(0.02 * torch.randn(c.code_seq_len, c.dim))
        self.decoder = Transformer(
            c.decoder_depth, grid=grid, cross=True, num_null_kv=c.num_null_kv,
            cross_attention=c.kernels.cross_attention, **width,
        )
        self.to_pixels = nn.Linear(c.dim, c.channels * c.patch_size**2)
        if c.predict_residual:
            nn.init.zeros_(self.to_pixels.weight)
            nn.init.zeros_(self.to_pixels.bias)

    def forward(self, x_t: torch.Tensor, x_next: torch.Tensor) -> LAQOutput:
        # x_t, x_next [B, C, S, S] in [0, 1]
        bias = self.position_bias()  # [H, N, N], once for the encoder and the decoder
        queries, z = self._encode(x_t, x_next, bias)
        quantized = self.quantizer(z)
        action_tokens = self._action_tokens(quantized.quantized)
        prediction = self._decode(x_t, queries, action_tokens, bias)
        return LAQOutput(
            loss=F.mse_loss(prediction, x_next),
            prediction=prediction,
            code_indices=quantized.code_indices,
            code_counts=quantized.code_counts,
            quantization_error=quantized.quantization_error,
            copy_loss=F.mse_loss(x_t, x_next).detach(),
        )

    @torch.no_grad()
    def encode(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Inverse dynamics: the hard latent action [B, code_seq_len] of each pair (no noise, no counting)."""
        _, z = self._encode(x_t, x_next, self.position_bias())
        return self.quantizer.nearest(z)

    def decode(self, x_t: torch.Tensor, code_indices: torch.Tensor) -> torch.Tensor:
        """World model: predicted x_next [B, C, S, S] from x_t and a latent action [B, code_seq_len]."""
        return self._decode_codes(x_t, code_indices, self.position_bias())

    def imagine(self, x_t: torch.Tensor, code_indices_sequence: torch.Tensor) -> torch.Tensor:
        """Closed-loop rollout: x_t [B, C, S, S], latent actions [B, T, code_seq_len] -> frames [B, T, C, S, S].

        Each prediction, clamped to [0, 1], is the next step's x_t.
        """
        bias = self.position_bias()
        frames = []
        for code_indices in code_indices_sequence.unbind(dim=1):
            x_t = self._decode_codes(x_t, code_indices, bias).clamp(0, 1)
            frames.append(x_t)
        return torch.stack(frames, dim=1)

    def _encode(
        self, x_t: torch.Tensor, x_next: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder up to the quantizer: (x_t patch embeddings [B, N, D], z [B, code_seq_len, quant_dim])."""
        b = x_t.shape[0]
        embedded = self.patch_embed(torch.cat([x_t, x_next]))  # [2B, N, D], x_t first
        tokens = self.spatial(embedded, bias)  # [2B, N, D], each frame on its own
        n, d = tokens.shape[1:]
        tokens = tokens.unflatten(0, (2, b)).permute(1, 2, 0, 3).reshape(b * n, 2, d)  # [(B N), 2, D]
        tokens = self.temporal(tokens).unflatten(0, (b, n))  # [B, N, 2, D]
        delta = tokens[:, :, 1] - tokens[:, :, 0]  # [B, N, D]
        z = self.reducer(self.to_quant(delta))  # [B, code_seq_len, quant_dim]
        return embedded[:b], z

    def _action_tokens(self, quantized: torch.Tensor) -> torch.Tensor:
        # [B, code_seq_len, quant_dim] -> [B, code_seq_len, D]
        return self.from_quant(quantized) + self.action_position

    def _decode_codes(self, x_t: torch.Tensor, code_indices: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.codebook[code_indices]  # [B, code_seq_len, quant_dim]
        return self._decode(x_t, self.patch_embed(x_t), self._action_tokens(codes), bias)

    def _decode(
        self, x_t: torch.Tensor, queries: torch.Tensor, action_tokens: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        # queries [B, N, D] (x_t patch embeddings, detached as in the reference),
        # action_tokens [B, code_seq_len, D] -> [B, C, S, S]
        tokens = self.decoder(queries.detach(), bias, context=action_tokens)  # [B, N, D]
        prediction = from_patches(self.to_pixels(tokens), self.config.patch_size, self.config.channels)
        return x_t + prediction if self.config.predict_residual else prediction
