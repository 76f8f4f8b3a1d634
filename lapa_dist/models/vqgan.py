"""LWM's VQGAN image tokenizer in PyTorch: a 256x256 RGB image <-> 16x16 = 256 codes of an 8192-entry codebook.

The architecture is LWM's (lwm/vqgan.py, identical in LAPA), so its released weights convert
(``lapa_dist.models.lwm_convert``). Facts kept from it (docs in /work/shared/LWM.md §2-3):

  * Input pixels are scaled x/127.5 - 1 in LWM, i.e. [0, 1] -> [-1, 1]; ``encode`` takes [0, 1] and does
    2x - 1 itself. ``decode`` clips the decoder output to [-1, 1] as LWM does, then maps back to [0, 1].
  * Encoder: conv 3->128, five levels of 128 * (1, 2, 2, 4, 6) channels with 2 ResNet blocks each and a
    stride-2 downsample after every level but the last (256 -> 16), a middle of 2 ResNet blocks, then
    GroupNorm -> SiLU -> conv 768->64. A 1x1 ``quant_conv`` 64->64 gives the latents.
  * Decoder: 1x1 ``post_quant_conv`` 64->64, conv 64->768, 2 middle ResNet blocks, the levels in reverse with
    3 ResNet blocks each and a nearest x2 upsample + 3x3 conv after every level but level 0, then
    GroupNorm -> SiLU -> conv 128->3.
  * No attention anywhere (LWM: ``attn_resolutions=()``, ``no_attn_mid_block=True``); dropout 0.
  * ResNet block: GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus a 1x1 shortcut conv when channels change.
  * GroupNorm has 32 groups and eps 1e-6 (Flax's default; torch's is 1e-5). Convs are 'SAME' with bias.
  * Downsample pads bottom/right by one, then a 3x3 stride-2 conv without padding.
  * Quantizer: nearest codebook row by squared L2 distance (no normalisation); decoding is a row lookup.
  * Codes are the (16, 16) index grid flattened row-major (raster order), as LWM feeds them to the LM.
  * 146,244,675 parameters with the defaults (585 MB in fp32).

Module names follow taming-transformers (conv_in, down[i], mid, up[level], norm_out, conv_out, shortcut for
the 1x1 conv); ``lwm_convert`` maps Flax's auto-generated names (``DownsamplingBlock_i/ResnetBlock_j/...``)
onto them. ``save_pretrained``/``from_pretrained`` use a directory with ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lapa_dist.config import StrictModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class VQGANConfig(StrictModel):
    """Shape of the VQGAN. The defaults are LWM's (``VQGANConfig`` in lwm/vqgan.py)."""

    resolution: int = Field(default=256, ge=1)
    """Height and width of the (square) input images; LWM accepts no other size."""
    num_channels: int = Field(default=3, ge=1)
    """Image channels in and out."""
    hidden_channels: int = Field(default=128, ge=1)
    """Base width: level i has hidden_channels * channel_mult[i] channels."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
    """Per-level channel multipliers; len(channel_mult) - 1 stride-2 downsamples (256 -> 16 for LWM)."""
    num_res_blocks: int = Field(default=2, ge=1)
    """ResNet blocks per encoder level; decoder levels have one more (LWM: 2 and 3)."""
    z_channels: int = Field(default=64, ge=1)
    """Channels of the encoder output and of the decoder input."""
    embed_dim: int = Field(default=64, ge=1)
    """Width of a codebook row (LWM's ``quantized_embed_dim``)."""
    codebook_size: int = Field(default=8192, ge=1)
    """Rows of the codebook (LWM's ``num_embeddings``)."""
    norm_groups: int = Field(default=32, ge=1)
    """GroupNorm groups (Flax's default)."""
    norm_eps: float = Field(default=1e-6, gt=0)
    """GroupNorm epsilon (Flax's default 1e-6, not torch's 1e-5)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> VQGANConfig:
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty positive integers (got {self.channel_mult})")
        for channels in (self.hidden_channels, *(self.hidden_channels * m for m in self.channel_mult)):
            if channels % self.norm_groups:
                raise ValueError(f"{channels} channels are not divisible by norm_groups {self.norm_groups}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling factor "
                             f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the code grid (16 for LWM)."""
        return self.resolution // self.downsample_factor


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)  # Flax 'SAME' for a 3x3 stride-1 conv


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), the skip through a 1x1 conv when channels change."""

    def __init__(self, cin: int, cout: int, config: VQGANConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(config.norm_groups, cin, eps=config.norm_eps)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = nn.GroupNorm(config.norm_groups, cout, eps=config.norm_eps)
        self.conv2 = _conv3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, kernel_size=1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, cin, H, W] -> [B, cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Pad bottom and right by one, then a 3x3 stride-2 conv without padding: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks, then an optional resampling (``None`` at the ends)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Images [B, 3, R, R] in [-1, 1] -> latents [B, z_channels, R/f, R/f] (f = 16 for LWM)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = _conv3(config.num_channels, config.hidden_channels)
        levels, cin = [], config.hidden_channels
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(cin, width, config))
                cin = width
            levels.append(Level(blocks, Downsample(width) if i != last else None))
        self.down = nn.ModuleList(levels)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, config), ResnetBlock(cin, cin, config))
        self.norm_out = nn.GroupNorm(config.norm_groups, cin, eps=config.norm_eps)
        self.conv_out = _conv3(cin, config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latents [B, z_channels, R/f, R/f] -> images [B, 3, R, R] (unclipped)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        cin = widths[-1]
        self.conv_in = _conv3(config.z_channels, cin)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, config), ResnetBlock(cin, cin, config))
        levels: list[Level | None] = [None] * len(widths)
        for i in reversed(range(len(widths))):  # built deepest first, like LWM, but stored by level
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, widths[i], config))
                cin = widths[i]
            levels[i] = Level(blocks, Upsample(widths[i]) if i != 0 else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(config.norm_groups, cin, eps=config.norm_eps)
        self.conv_out = _conv3(cin, config.num_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook [codebook_size, embed_dim]: latents -> nearest-row codes, codes -> rows."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B, D, h, w] -> codes [B, h*w] (raster order), argmin of squared L2 distances in fp32."""
        batch, dim = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim).float()  # [B*h*w, D], row-major over (h, w)
        book = self.embedding.weight.float()  # [K, D]
        distances = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)[None, :] - 2 * flat @ book.T  # [N, K]
        return distances.argmin(dim=1).view(batch, -1)

    def lookup(self, codes: torch.Tensor, side: int) -> torch.Tensor:
        """Codes [B, side*side] (raster order) -> codebook rows as latents [B, D, side, side]."""
        rows = self.embedding(codes)  # [B, side*side, D]
        return rows.view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    """LWM's image tokenizer: ``encode`` images -> codes, ``decode`` codes -> images."""

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = config = config or VQGANConfig()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)
        self.decoder = Decoder(config)

    @property
    def num_tokens(self) -> int:
        """Codes per image: latent_size ** 2 (256 for LWM)."""
        return self.config.latent_size ** 2

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [0, 1] -> pre-quantization latents [B, embed_dim, h, w]."""
        size = self.config.resolution
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"images must be [B, {self.config.num_channels}, {size}, {size}] "
                             f"(got {list(images.shape)})")
        x = images.to(self.quant_conv.weight.dtype) * 2 - 1  # LWM's x / 127.5 - 1 on [0, 255] pixels
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] float in [0, 1] -> codes [B, h*w] int64, raster order (no gradients)."""
        return self.quantize.codes(self.latents(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h*w] in [0, codebook_size) -> images [B, 3, R, R] in [0, 1]."""
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"codes must be [B, {self.num_tokens}] (got {list(codes.shape)})")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}) (got {int(codes.min())}.."
                             f"{int(codes.max())}); LWM's 8192/8193 are frame markers, not codes")
        z = self.quantize.lookup(codes, self.config.latent_size)  # [B, D, h, w]
        pixels = self.decoder(self.post_quant_conv(z))  # [B, 3, R, R]
        return (pixels.clamp(-1.0, 1.0) + 1) / 2

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tensors as they are, dtype included)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2) + "\n")
        tensors = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQGAN:
        """A VQGAN from a ``save_pretrained`` directory, in the dtype its weights were stored in."""
        directory = Path(directory)
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / file).is_file():
                raise FileNotFoundError(f"{directory}: no {file} (expected a VQGAN.save_pretrained directory)")
        config = VQGANConfig.model_validate(json.loads((directory / CONFIG_FILE).read_text()))
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        tensors = {}
        with safe_open(directory / WEIGHTS_FILE, framework="pt", device=str(device)) as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name not in expected:
                    raise ValueError(f"{directory / WEIGHTS_FILE}: unexpected tensor {name!r} for this config")
                tensor = reader.get_tensor(name)
                if tensor.shape != expected[name].shape:
                    raise ValueError(f"{directory / WEIGHTS_FILE}: {name} has shape {list(tensor.shape)}, "
                                     f"the config needs {list(expected[name].shape)}")
                tensors[name] = tensor
        missing = sorted(expected.keys() - tensors.keys())
        if missing:
            raise ValueError(f"{directory / WEIGHTS_FILE}: {len(missing)} tensors missing, e.g. {missing[:3]}")
        model.load_state_dict(tensors, assign=True)
        return model.eval()
