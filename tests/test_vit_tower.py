"""ViT tower: shapes, features equal to the HF model's hidden states, freezing, checkpoint round trips, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lapa_dist.models.vit_tower import ViTTower, ViTTowerConfig, read_vision_config

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8, "image_size": 32}
HF_CONFIGS = {
    "siglip": {**TINY, "intermediate_size": 64},
    "dinov2": {**TINY, "mlp_ratio": 2},
}
LLM_HIDDEN = 48
MEAN_STD = {"siglip": ((0.5,) * 3, (0.5,) * 3), "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
"""The families' preprocessor_config.json statistics, written out independently of the module."""


def tower_config(family: str, **overrides) -> ViTTowerConfig:
    return ViTTowerConfig(**{"family": family, "hf_config": HF_CONFIGS[family], "image_size": 32, **overrides})


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, 3, S, S]


def normalise(family: str, x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD[family])
    return (x - mean) / std


def reference_model(family: str, hf_config: dict):
    """A whole HF model of the family, eval mode, random weights."""
    if family == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**hf_config)).eval()
    return Dinov2Model(Dinov2Config(**hf_config)).eval()


def copy_tower_weights(tower: ViTTower, model) -> None:
    """Give the tower's kept ViT parts the whole HF model's weights."""
    tower.vit.embeddings.load_state_dict(model.embeddings.state_dict())
    layers = model.encoder.layers if hasattr(model.encoder, "layers") else model.encoder.layer
    for ours, theirs in zip(tower.vit.layers, layers, strict=False):
        ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_output_shape_and_num_tokens(family):
    tower = tower_config(family)
    model = ViTTower(tower, llm_hidden=LLM_HIDDEN)
    out = model(images(3))
    assert model.num_tokens == (32 // 8) ** 2 == 16
    assert out.shape == (3, 16, LLM_HIDDEN)
    assert len(model.vit.layers) == 1  # feature_layer -2 of a 2-layer ViT: the last layer is not kept
    assert model.projector[0].out_features == LLM_HIDDEN  # projector_hidden None -> the LLM's width
    wide = ViTTower(tower_config(family, projector_hidden=40), llm_hidden=LLM_HIDDEN)
    assert wide.projector[0].out_features == 40 and wide(images()).shape == (2, 16, LLM_HIDDEN)


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 1, 0])
def test_features_equal_hf_hidden_states(family, feature_layer):
    model = ViTTower(tower_config(family, feature_layer=feature_layer), llm_hidden=LLM_HIDDEN)
    reference = reference_model(family, HF_CONFIGS[family])
    copy_tower_weights(model, reference)
    x = images()
    with torch.no_grad():
        hidden = reference(normalise(family, x), output_hidden_states=True).hidden_states[feature_layer]
    expected = hidden[:, 1:] if family == "dinov2" else hidden  # DINOv2: drop CLS
    features = model.vision_features(x)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    first, second = model.projector[0], model.projector[2]
    projected = F.linear(F.gelu(F.linear(expected, first.weight, first.bias)), second.weight, second.bias)
    torch.testing.assert_close(model(x), projected, rtol=1e-5, atol=1e-5)


def test_dinov2_cls_token_kept_and_registers_dropped():
    hf_config = {**HF_CONFIGS["dinov2"], "model_type": "dinov2_with_registers", "num_register_tokens": 4}
    reference = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**HF_CONFIGS["dinov2"], num_register_tokens=4))
    x = images()
    with torch.no_grad():
        hidden = reference.eval()(normalise("dinov2", x), output_hidden_states=True).hidden_states[-2]  # [B, 21, D]
    assert hidden.shape[1] == 1 + 4 + 16
    patches = ViTTower(tower_config("dinov2", hf_config=hf_config), llm_hidden=LLM_HIDDEN)
    copy_tower_weights(patches, reference)
    torch.testing.assert_close(patches.vision_features(x), hidden[:, 5:], rtol=1e-5, atol=1e-5)
    with_cls = ViTTower(tower_config("dinov2", hf_config=hf_config, use_cls_token=True), llm_hidden=LLM_HIDDEN)
    copy_tower_weights(with_cls, reference)
    assert with_cls.num_tokens == 17
    expected = torch.cat([hidden[:, :1], hidden[:, 5:]], dim=1)
    torch.testing.assert_close(with_cls.vision_features(x), expected, rtol=1e-5, atol=1e-5)
    assert with_cls(x).shape == (2, 17, LLM_HIDDEN)


def test_dinov2_other_image_size_interpolates_positions():
    model = ViTTower(tower_config("dinov2", image_size=48), llm_hidden=LLM_HIDDEN)
    reference = reference_model("dinov2", HF_CONFIGS["dinov2"])
    copy_tower_weights(model, reference)
    x = images(size=48)
    with torch.no_grad():
        hidden = reference(normalise("dinov2", x), output_hidden_states=True).hidden_states[-2]
    assert model.num_tokens == 36
    torch.testing.assert_close(model.vision_features(x), hidden[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_frozen_vit_gets_no_grads_and_stays_in_eval(family):
    model = ViTTower(tower_config(family), llm_hidden=LLM_HIDDEN)
    model.train()
    assert not model.vit.training and all(not m.training for m in model.vit.modules())
    assert model.projector.training
    assert all(not p.requires_grad for p in model.vit.parameters())
    model(images()).square().mean().backward()
    assert all(p.grad is None for p in model.vit.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    model.eval()
    model.train(True)
    assert not model.vit.training and model.projector.training
    model.vit.requires_grad_(True)  # unfrozen by mistake from outside: freeze still runs the ViT without autograd
    assert model.vision_features(images()).grad_fn is None


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_unfrozen_vit_trains_with_the_projector(family):
    model = ViTTower(tower_config(family, freeze=False), llm_hidden=LLM_HIDDEN)
    model.train()
    assert model.vit.training
    model(images()).square().mean().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {name for name, _ in model.named_parameters() if not name.endswith("mask_token")}
    for name, p in trainable.items():  # every trainable parameter gets a gradient (DDP rejects unused ones)
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def save_tiny(family: str, directory, full_siglip: bool = False):
    """A tiny checkpoint on disk; returns the HF vision model whose hidden states the tower must reproduce."""
    torch.manual_seed(0)
    if full_siglip:  # the layout of the released google/siglip-* checkpoints: text and vision towers
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 64, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 1}
        full = SiglipModel(SiglipConfig(vision_config=HF_CONFIGS["siglip"], text_config=text))
        full.save_pretrained(directory)
        return full.vision_model.eval()
    model = reference_model(family, HF_CONFIGS[family])
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize(("family", "full_siglip"), [("siglip", False), ("siglip", True), ("dinov2", False)])
def test_round_trip_through_a_local_directory(tmp_path, family, full_siglip):
    reference = save_tiny(family, tmp_path, full_siglip)
    from_config = ViTTower(tower_config(family), llm_hidden=LLM_HIDDEN)
    copy_tower_weights(from_config, reference)
    from_path = ViTTower(ViTTowerConfig(family=family, path=str(tmp_path), image_size=32), llm_hidden=LLM_HIDDEN)
    from_path.projector.load_state_dict(from_config.projector.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(from_path(x), from_config(x))
        hidden = reference(normalise(family, x), output_hidden_states=True).hidden_states[-2]
    expected = hidden[:, 1:] if family == "dinov2" else hidden
    assert torch.equal(from_path.vision_features(x), expected)


@pytest.mark.parametrize(("family", "full_siglip"), [("siglip", True), ("dinov2", False)])
def test_checkpoint_config_as_hf_config(tmp_path, family, full_siglip):
    """read_vision_config(...).to_dict() describes the same tower: its state dict loads strictly, outputs agree."""
    save_tiny(family, tmp_path, full_siglip)
    from_path = ViTTower(ViTTowerConfig(family=family, path=str(tmp_path), image_size=32), llm_hidden=LLM_HIDDEN)
    hf_config = read_vision_config(from_path.config).to_dict()
    rebuilt = ViTTower(ViTTowerConfig(family=family, hf_config=hf_config, image_size=32), llm_hidden=LLM_HIDDEN)
    rebuilt.load_state_dict(from_path.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), from_path(x))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ViTTower(ViTTowerConfig(family="siglip", path=str(tmp_path / "nope"), image_size=32), llm_hidden=8)


def test_path_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ViTTower(ViTTowerConfig(family="dinov2", path=str(tmp_path), image_size=32), llm_hidden=8)


def test_path_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIGS["dinov2"], "model_type": "dinov2"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ViTTower(ViTTowerConfig(family="dinov2", path=str(tmp_path), image_size=32), llm_hidden=8)


def test_checkpoint_missing_weights(tmp_path):
    save_tiny("dinov2", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if not name.startswith("encoder.layer.0.")}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the checkpoint lacks \d+ Dinov2Model weights \(e.g. \['encoder.layer.0"):
        ViTTower(ViTTowerConfig(family="dinov2", path=str(tmp_path), image_size=32), llm_hidden=8)


def test_checkpoint_of_the_wrong_family(tmp_path):
    save_tiny("dinov2", tmp_path)
    with pytest.raises(ValueError, match="model_type 'dinov2' is not a siglip vision model"):
        ViTTower(ViTTowerConfig(family="siglip", path=str(tmp_path), image_size=32), llm_hidden=8)


def test_hf_config_of_the_wrong_family():
    with pytest.raises(ValidationError, match="hf_config: model_type 'siglip_vision_model' is not a dinov2"):
        ViTTowerConfig(family="dinov2", hf_config={**HF_CONFIGS["siglip"], "model_type": "siglip_vision_model"},
                       image_size=32)


def test_image_size_mismatch(tmp_path):
    with pytest.raises(ValidationError, match="image_size 64 does not match the SigLIP config's image_size 32"):
        tower_config("siglip", image_size=64)
    save_tiny("siglip", tmp_path)
    with pytest.raises(ValueError, match="image_size 48 does not match the SigLIP config's image_size 32"):
        ViTTower(ViTTowerConfig(family="siglip", path=str(tmp_path), image_size=48), llm_hidden=8)
    with pytest.raises(ValidationError, match="image_size 36 is not a multiple of the patch size 8"):
        tower_config("dinov2", image_size=36)


def test_config_errors():
    with pytest.raises(ValidationError, match="exactly one of path"):
        ViTTowerConfig(family="siglip", image_size=32)
    with pytest.raises(ValidationError, match="exactly one of path"):
        ViTTowerConfig(family="siglip", path="/x", hf_config=HF_CONFIGS["siglip"], image_size=32)
    with pytest.raises(ValidationError, match="use_cls_token: siglip has no CLS token"):
        tower_config("siglip", use_cls_token=True)
    with pytest.raises(ValidationError, match="feature_layer 3 is out of range for a ViT of 2 layers"):
        tower_config("dinov2", feature_layer=3)
    with pytest.raises(ValidationError, match="std must be positive"):
        tower_config("dinov2", std=(0.2, 0.0, 0.2))


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.rand(3, 32, 32), ValueError, r"got shape \(3, 32, 32\)"),
        (torch.rand(2, 1, 32, 32), ValueError, r"got shape \(2, 1, 32, 32\)"),
        (torch.rand(2, 3, 64, 64), ValueError, r"\[B, 3, 32, 32\].*got shape \(2, 3, 64, 64\)"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "got dtype torch.uint8"),
        (torch.rand(2, 3, 32, 32) * 255, ValueError, r"values must lie in \[0, 1\], got min .* max 2"),
        (torch.rand(2, 3, 32, 32) - 0.5, ValueError, r"values must lie in \[0, 1\], got min -0\.\d+"),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError, "got min nan"),
        ([[0.0]], TypeError, "got list"),
    ],
)
def test_bad_images(bad, error, message):
    model = ViTTower(tower_config("siglip"), llm_hidden=8)
    with pytest.raises(error, match=message):
        model(bad)


def test_range_check_can_be_turned_off():
    model = ViTTower(tower_config("dinov2", check_range=False), llm_hidden=8)
    assert model(images() * 2).shape == (2, 16, 8)
