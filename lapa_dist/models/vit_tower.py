"""A continuous vision tower: a Hugging Face ViT (SigLIP or DINOv2) and a gelu-MLP projector into the LM width.

This is the Prismatic/OpenVLA/LLaVA way of seeing, next to the LWM VQGAN's discrete image tokens: each image
becomes N feature vectors in the language model's embedding space, one per ViT patch.

    images  [B, 3, S, S] float in [0, 1]          (S = image_size; the tower resizes nothing)
    pixels  (images - mean) / std                  the family's standard preprocessing, per channel
    h       ViT hidden_states[feature_layer]       [B, prefix + (S/p)^2, D_vit], p = patch size
    tokens  patch tokens (CLS optional for DINOv2)  [B, N, D_vit]
    out     Linear -> GELU -> Linear                [B, N, llm_hidden]

Facts used:
  * SigLIP (``google/siglip-so400m-patch14-224``: 27 layers, width 1152, patch 14, 224 px -> 16 x 16 = 256 tokens)
    has no CLS token; its preprocessing maps [0, 1] to [-1, 1] with mean = std = 0.5. Its learned position table
    is fixed to the checkpoint's grid, so ``image_size`` must equal the checkpoint's. Released checkpoints are
    full SigLIP models (model_type ``siglip``, text tower included); only the vision weights are loaded.
  * DINOv2 (``facebook/dinov2-base``: 12 layers, width 768, patch 14) puts a CLS token (and, in the
    ``dinov2_with_registers`` variant, register tokens) before the patches and uses ImageNet normalisation,
    mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). Its config says 518 px (its training resolution), but
    the model interpolates its position table bicubically to any grid; Prismatic/OpenVLA run it at 224 px
    (256 tokens). So for DINOv2 ``image_size`` only has to be a multiple of the patch size.
  * ``feature_layer = -2``: LLaVA (``mm_vision_select_layer=-2``) and Prismatic (timm ``get_intermediate_layers``
    with n = depth - 2) feed the LM the second-to-last layer's output, before the final LayerNorm: the last layer
    is shaped most by the pretraining objective, the one before it keeps more general spatial features.
    ``hidden_states[0]`` is the patch embedding, ``hidden_states[i]`` the output of layer i.
  * Projector: Prismatic's "gelu-mlp", Linear(D_vit, H) -> GELU -> Linear(H, llm_hidden), H = llm_hidden.

Only what the features need is kept: the embeddings and the first layers up to ``feature_layer``. Later layers,
the final LayerNorm and SigLIP's pooling head are dropped after loading, so they cost neither compute nor memory,
and an unfrozen tower has no parameter without a gradient (which DDP would reject).

Frozen (the default): the ViT's parameters have requires_grad=False, it runs under no_grad and stays in eval mode
even when ``train()`` is called on the tower or a parent; the projector trains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
import transformers
from pydantic import Field, model_validator
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lapa_dist.config import StrictModel

logger = logging.getLogger(__name__)

Family = Literal["siglip", "dinov2"]
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
"""google/siglip-* preprocessor_config.json: image_mean = image_std = [0.5, 0.5, 0.5] ([0, 1] -> [-1, 1])."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""facebook/dinov2-* preprocessor_config.json: the ImageNet channel statistics."""
_DEFAULT_NORM = {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "dinov2": (IMAGENET_MEAN, IMAGENET_STD)}
_MODEL_TYPES = {"siglip": ("siglip", "siglip_vision_model"), "dinov2": ("dinov2", "dinov2_with_registers")}
"""config.json model_type values each family accepts ("siglip" is a full checkpoint; its vision part is used)."""
_DEFAULT_TYPE = {"siglip": "siglip_vision_model", "dinov2": "dinov2"}
"""model_type assumed for an hf_config dict without one."""
_HF_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
    "dinov2": (Dinov2Config, Dinov2Model),
    "dinov2_with_registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel),
}


class ViTTowerConfig(StrictModel):
    """Which ViT, where its weights come from, which features it hands over, and the projector's width."""

    family: Family
    """``siglip`` (SigLIP vision model) or ``dinov2`` (DINOv2, with or without registers)."""
    path: str | None = None
    """Local directory of a Hugging Face checkpoint (config.json + *.safetensors), e.g. a downloaded
    google/siglip-so400m-patch14-224 or facebook/dinov2-base. Exactly one of path and hf_config."""
    hf_config: dict | None = None
    """A transformers vision config as a dict (SiglipVisionConfig / Dinov2Config keys; ``model_type`` optional),
    randomly initialised: for tests and shape experiments. Exactly one of path and hf_config."""
    image_size: int = Field(ge=1)
    """Side S of the square input images. SigLIP: must equal the checkpoint's image_size; DINOv2: a multiple
    of the patch size (position embeddings are interpolated)."""
    feature_layer: int = -2
    """Index into the ViT's hidden_states (0 = patch embedding, i = output of layer i, negative from the end);
    -2 (second-to-last layer, before the final norm) as LLaVA and Prismatic do."""
    use_cls_token: bool = False
    """DINOv2 only: also hand over the CLS token (first of the N tokens). Register tokens are always dropped;
    SigLIP has no CLS token."""
    freeze: bool = True
    """Freeze the ViT (no gradients, eval mode); the projector always trains."""
    projector_hidden: int | None = Field(default=None, ge=1)
    """Width of the projector's hidden layer; None = the language model's hidden size (Prismatic)."""
    mean: tuple[float, float, float] | None = None
    """Per-channel mean subtracted from [0, 1] images; None = the family's: SigLIP 0.5, DINOv2 ImageNet
    (0.485, 0.456, 0.406)."""
    std: tuple[float, float, float] | None = None
    """Per-channel std dividing the centred images; None = the family's: SigLIP 0.5, DINOv2 ImageNet
    (0.229, 0.224, 0.225)."""
    check_range: bool = True
    """Check in forward that image values lie in [0, 1] (costs one host sync per call)."""

    @model_validator(mode="after")
    def _check(self) -> ViTTowerConfig:
        if (self.path is None) == (self.hf_config is None):
            raise ValueError("set exactly one of path (a checkpoint directory) and hf_config (a random-init config)")
        if self.use_cls_token and self.family == "siglip":
            raise ValueError("use_cls_token: siglip has no CLS token (only dinov2 has)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive per channel (got {self.std})")
        if self.hf_config is not None:
            check_vision_config(self, vision_config_from_dict(self.family, self.hf_config, "hf_config"))
        return self

    @property
    def pixel_mean(self) -> tuple[float, float, float]:
        return self.mean if self.mean is not None else _DEFAULT_NORM[self.family][0]

    @property
    def pixel_std(self) -> tuple[float, float, float]:
        return self.std if self.std is not None else _DEFAULT_NORM[self.family][1]


def vision_config_from_dict(family: Family, raw: dict, where: str) -> PretrainedConfig:
    """The transformers vision config in ``raw`` (a config.json's content), checked to belong to ``family``."""
    model_type = raw.get("model_type", _DEFAULT_TYPE[family])
    if model_type not in _MODEL_TYPES[family]:
        raise ValueError(f"{where}: model_type {model_type!r} is not a {family} vision model "
                         f"(expected one of {list(_MODEL_TYPES[family])}); is family right?")
    if model_type == "siglip":  # a full SigLIP checkpoint: the vision tower's config is nested
        raw, model_type = raw.get("vision_config") or {}, "siglip_vision_model"
    config_class, _ = _HF_CLASSES[model_type]
    try:
        return config_class.from_dict({key: value for key, value in raw.items() if key != "model_type"})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a valid {config_class.__name__}: {error}") from error


def _side(value: int | list | tuple, name: str, where: str) -> int:
    """A square size from an int or an (h, w) pair."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"{where}: only square {name}s are supported (got {value})")


def check_vision_config(config: ViTTowerConfig, vision: PretrainedConfig) -> None:
    """Raise when config.image_size / feature_layer do not fit the ViT described by ``vision``."""
    where = config.path or "hf_config"
    size = _side(vision.image_size, "image_size", where)
    patch = _side(vision.patch_size, "patch_size", where)
    if vision.num_channels != 3:
        raise ValueError(f"{where}: num_channels is {vision.num_channels}; the tower reads RGB images (3)")
    if config.family == "siglip" and config.image_size != size:
        raise ValueError(f"image_size {config.image_size} does not match the SigLIP config's image_size {size} "
                         f"({where}); SigLIP's position table is fixed to its grid, set image_size to {size}")
    if config.image_size % patch:
        raise ValueError(f"image_size {config.image_size} is not a multiple of the patch size {patch} ({where})")
    layers = vision.num_hidden_layers
    if not -(layers + 1) <= config.feature_layer <= layers:
        raise ValueError(f"feature_layer {config.feature_layer} is out of range for a ViT of {layers} layers "
                         f"({layers + 1} hidden states: {-(layers + 1)}..{layers})")


def read_vision_config(config: ViTTowerConfig) -> PretrainedConfig:
    """The checked transformers vision config: from ``path``/config.json or from ``hf_config``."""
    if config.hf_config is not None:
        vision = vision_config_from_dict(config.family, config.hf_config, "hf_config")
    else:
        directory = Path(config.path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"path {config.path!r}: no such directory (expected a Hugging Face "
                                    "checkpoint directory: config.json + *.safetensors)")
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"path {config.path!r}: no config.json (expected a Hugging Face checkpoint "
                                    "directory: config.json + *.safetensors)")
        vision = vision_config_from_dict(config.family, json.loads((directory / "config.json").read_text()),
                                         str(directory / "config.json"))
    check_vision_config(config, vision)
    return vision


def load_hf_vit(config: ViTTowerConfig, vision: PretrainedConfig) -> PreTrainedModel:
    """The whole HF vision model: random init from ``hf_config``, or the fp32 weights under ``path``."""
    model_class = _HF_CLASSES[vision.model_type][1]
    if config.path is None:
        return model_class(vision)
    directory = Path(config.path).expanduser()
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"path {config.path!r}: no *.safetensors weights next to config.json")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a full SigLIP checkpoint lists its whole text tower as unexpected
    try:
        model, info = model_class.from_pretrained(directory, config=vision, local_files_only=True,
                                                  use_safetensors=True, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"path {config.path!r}: the checkpoint lacks {len(missing)} {model_class.__name__} "
                         f"weights (e.g. {missing[:3]}); is it a {config.family} checkpoint?")
    foreign = [key for key in info["unexpected_keys"] if not key.startswith(("text_model.", "logit_"))]
    if foreign:
        logger.warning("%s: %d checkpoint tensors not used by %s (e.g. %s)", config.path, len(foreign),
                       model_class.__name__, sorted(foreign)[:3])
    return model


class _ViTTrunk(nn.Module):
    """The HF ViT's embeddings and its first ``depth`` layers: pixels [B, 3, S, S] -> hidden [B, T, D_vit]."""

    def __init__(self, vit: PreTrainedModel, depth: int):
        super().__init__()
        self.embeddings = vit.embeddings
        layers = vit.encoder.layers if hasattr(vit.encoder, "layers") else vit.encoder.layer  # SigLIP / DINOv2
        self.layers = nn.ModuleList(layers[:depth])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixels)  # [B, T, D_vit]; DINOv2 interpolates positions when S differs
        for layer in self.layers:
            hidden = layer(hidden, None)  # no attention mask: every token sees every token
        return hidden


class ViTTower(nn.Module):
    """Images [B, 3, S, S] in [0, 1] -> visual tokens [B, N, llm_hidden] in the language model's embedding space."""

    discrete = False
    """Gives embeddings, not codes (see lapa_dist/models/vision.py)."""

    def __init__(self, config: ViTTowerConfig, llm_hidden: int):
        super().__init__()
        self.config = config
        vision = read_vision_config(config)
        layers = vision.num_hidden_layers
        depth = config.feature_layer % (layers + 1)  # hidden_states[feature_layer] is the output of layer `depth`
        self.vit = _ViTTrunk(load_hf_vit(config, vision), depth)
        self.vit_hidden = vision.hidden_size
        self.grid = config.image_size // _side(vision.patch_size, "patch_size", "config")
        """Patches per side: S / patch."""
        self.prefix = 0 if config.family == "siglip" else 1 + getattr(vision, "num_register_tokens", 0)
        """Tokens before the patches: DINOv2's CLS and its registers (if any)."""
        hidden = config.projector_hidden or llm_hidden
        self.projector = nn.Sequential(nn.Linear(self.vit_hidden, hidden), nn.GELU(), nn.Linear(hidden, llm_hidden))
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.vit.requires_grad_(not config.freeze)
        mask_token = getattr(self.vit.embeddings, "mask_token", None)
        if mask_token is not None:  # DINOv2's masked-image-modelling token: never used here, so never trained
            mask_token.requires_grad_(False)
        self.train(self.training)

    @property
    def num_tokens(self) -> int:
        """N: (S / patch)^2 patch tokens, plus one when the DINOv2 CLS token is kept."""
        return self.grid**2 + int(self.config.use_cls_token)

    @property
    def image_size(self) -> int:
        """Side S of the square images read."""
        return self.config.image_size

    def train(self, mode: bool = True) -> ViTTower:
        super().train(mode)
        if self.config.freeze:
            self.vit.eval()  # a frozen ViT never runs dropout / drop-path
        return self

    def check_images(self, images: torch.Tensor) -> None:
        """Raise when images are not float [B, 3, S, S] with values in [0, 1]."""
        size = self.config.image_size
        expected = f"float images [B, 3, {size}, {size}] with values in [0, 1]"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a tensor of {expected}, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images: expected {expected}, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected {expected}, got dtype {images.dtype} "
                            "(convert uint8 frames with images.float() / 255)")
        if self.config.check_range and images.numel():
            low, high = torch.stack(torch.aminmax(images.detach())).tolist()  # one host sync per call
            if not (0.0 <= low and high <= 1.0):
                raise ValueError(f"images: values must lie in [0, 1], got min {low:.4g} max {high:.4g} (the tower "
                                 f"normalises with the {self.config.family} mean/std itself; do not pre-normalise)")

    def vision_features(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's hidden_states[feature_layer] at the kept tokens: [B, N, D_vit] (before the projector)."""
        self.check_images(images)
        dtype = next(self.vit.parameters()).dtype
        pixels = ((images.float() - self.mean) / self.std).to(dtype)  # [B, 3, S, S]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze):
            hidden = self.vit(pixels)  # [B, prefix + grid^2, D_vit]
        patches = hidden[:, self.prefix:]  # [B, grid^2, D_vit]
        if self.config.use_cls_token:
            return torch.cat([hidden[:, :1], patches], dim=1)  # [B, 1 + grid^2, D_vit]
        return patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens [B, N, llm_hidden] for images [B, 3, S, S] in [0, 1]."""
        features = self.vision_features(images)  # [B, N, D_vit]
        return self.projector(features.to(self.projector[0].weight.dtype))  # [B, N, llm_hidden]
