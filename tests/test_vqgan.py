"""The VQGAN image tokenizer: LWM's shape by default, code shapes and ranges, raster order, decode, and
save_pretrained/from_pretrained round trips. Tiny random configs; the LWM weights' conversion is in
tests/test_convert_lwm.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from lapa_dist.models.vqgan import VQGAN, VQGANConfig

TINY = dict(resolution=16, hidden_channels=8, channel_mult=(1, 2, 3), num_res_blocks=1, z_channels=4,
            embed_dim=4, codebook_size=32, norm_groups=4)


def tiny_model(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(**TINY)).eval()


def test_defaults_are_lwm_vqgan():
    config = VQGANConfig()
    assert (config.resolution, config.channel_mult, config.num_res_blocks) == (256, (1, 2, 2, 4, 6), 2)
    assert (config.z_channels, config.embed_dim, config.codebook_size, config.norm_eps) == (64, 64, 8192, 1e-6)
    with torch.device("meta"):
        model = VQGAN(config)
    assert (model.num_tokens, model.codebook_size, config.latent_size) == (256, 8192, 16)
    assert sum(p.numel() for p in model.parameters()) == 146_244_675  # LWM.md: the 585 MB fp32 release
    assert not any("attn" in name for name, _ in model.named_parameters())  # no attention anywhere


def test_encode_gives_raster_codes_of_nearest_rows():
    model = tiny_model()
    images = torch.rand(2, 3, 16, 16)
    codes = model.encode(images)
    assert codes.shape == (2, model.num_tokens) == (2, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    latents = model.latents(images)  # [B, D, 4, 4]
    book = model.quantize.embedding.weight
    for row in range(4):
        for col in range(4):
            distances = torch.cdist(latents[:, :, row, col], book, compute_mode="donot_use_mm_for_euclid_dist")
            assert torch.equal(codes[:, row * 4 + col], distances.argmin(dim=1))
    assert len(codes.unique()) > 1  # a degenerate tokenizer would make the checks above trivial


def test_encode_scales_pixels_to_minus_one_one():
    model = tiny_model()
    images = torch.rand(1, 3, 16, 16)
    expected = model.quant_conv(model.encoder(images * 2 - 1))
    torch.testing.assert_close(model.latents(images), expected, rtol=0, atol=0)


def test_decode_reads_codes_in_raster_order():
    model = tiny_model()
    codes = torch.randint(0, model.codebook_size, (2, 16))
    with torch.no_grad():
        images = model.decode(codes)
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    book = model.quantize.embedding.weight
    grid = torch.stack([torch.stack([book[codes[:, r * 4 + c]] for c in range(4)], dim=-1) for r in range(4)],
                       dim=-2)  # [B, D, 4, 4] with grid[b, :, r, c] = book[codes[b, r * 4 + c]]
    with torch.no_grad():
        raw = model.decoder(model.post_quant_conv(grid))
    torch.testing.assert_close(images, (raw.clamp(-1, 1) + 1) / 2)


def test_save_and_load_round_trip_is_bitwise(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "fp32")
    loaded = VQGAN.from_pretrained(tmp_path / "fp32")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.encode(images), loaded.encode(images))
    codes = torch.randint(0, 32, (2, 16))
    assert torch.equal(model.decode(codes), loaded.decode(codes))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert VQGAN.from_pretrained(tmp_path / "bf16").quant_conv.weight.dtype == torch.bfloat16


def test_bad_inputs_and_files_fail_clearly(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        model.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 16), 32))
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValidationError, match="norm_groups"):
        VQGANConfig(**{**TINY, "hidden_channels": 6})
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["quantize.embedding.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        VQGAN.from_pretrained(tmp_path)
