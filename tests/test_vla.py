"""VLA model: per-stream embeddings, weighted two-head loss against a hand computation, training, greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lapa_dist.models.llama import LlamaConfig
from lapa_dist.models.vla import VLA, VLAConfig
from lapa_dist.models.vla_sequence import (
    IGNORE_INDEX,
    STREAM_IMAGE,
    STREAM_LATENT,
    STREAM_TEXT,
    SequenceConfig,
    build_example,
    build_prompt,
    collate_examples,
)
from tests.tiny_tokenizer import load_tiny_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vla"
BACKBONE = CONFIGS / "backbone_tiny.json"
TINY_VQGAN = json.loads((CONFIGS / "tiny_pretrain.json").read_text())["model"]["vision"]  # 32 px -> 4 x 4 codes
NUM_IMAGE_TOKENS = 16  # short sequences keep the tests fast; the layout is otherwise the reference one
IMAGE_CODES = 64
TINY_VIT = {"family": "siglip", "image_size": 32,
            "hf_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
                          "image_size": 32, "intermediate_size": 64}}
LATENTS = (torch.tensor([7, 0, 3, 5]), torch.tensor([2, 2, 6, 1]))  # [4] each
INSTRUCTIONS = ("pick up the red block", "push the blue cube to the left")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def make_config(vision: dict = TINY_VQGAN, **sequence) -> VLAConfig:
    backbone = LlamaConfig(**json.loads(BACKBONE.read_text()))
    end_of_vision = IMAGE_CODES + 1 if vision["tower"] == "vqgan" else None
    sequence = SequenceConfig(num_image_tokens=NUM_IMAGE_TOKENS, image_codebook_size=IMAGE_CODES,
                              end_of_vision_id=end_of_vision, **sequence)
    return VLAConfig(backbone=backbone, sequence=sequence, vision=vision)


PLACEHOLDER = torch.zeros(NUM_IMAGE_TOKENS, dtype=torch.long)  # image codes come from the tower


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # [B, 3, S, S]


def make_batch(tokenizer, config: VLAConfig, count: int = 2) -> dict[str, torch.Tensor]:
    examples = [build_example(tokenizer, INSTRUCTIONS[i], PLACEHOLDER, LATENTS[i], config.sequence)
                for i in range(count)]
    batch = collate_examples(examples, pad_token_id=tokenizer.pad_token_id)
    batch["images"] = images(count)
    return batch


def embed_args(model: VLA, batch: dict) -> tuple:
    return batch["input_ids"], batch["stream"], batch["stream_ids"], model.image_tokens(batch["images"])


def image_token_positions(batch: dict) -> torch.Tensor:
    """[B, T] True at the first NUM_IMAGE_TOKENS image positions of each row."""
    is_image = batch["stream"] == STREAM_IMAGE
    return is_image & (is_image.cumsum(1) <= NUM_IMAGE_TOKENS)


def train(model: VLA, batch, steps: int, lr: float) -> list:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    outputs = []
    for _ in range(steps):
        output = model(batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        outputs.append(output)
    return outputs


def test_config_and_shapes(tokenizer):
    torch.manual_seed(0)
    config = make_config()
    model = VLA(config)
    assert model.image_embed.weight.shape == (IMAGE_CODES + 2, 64)  # codes + end-of-vision id
    assert model.latent_embed.weight.shape == (8, 64) and model.latent_head.weight.shape == (8, 64)
    # LeCun normal: std 1/sqrt(hidden) = 0.125, far from the backbone's 0.02
    assert model.latent_head.weight.std().item() == pytest.approx(0.125, rel=0.3)
    batch = make_batch(tokenizer, config)
    output = model(batch)
    assert output.loss.shape == () and output.latent_logits.shape == (*batch["input_ids"].shape, 8)
    assert 0.0 <= output.latent_accuracy.item() <= 1.0
    # at init the logits have about unit spread (LeCun head on RMS-normalised states): CE ~ log 8 + var / 2
    assert 2.0 < output.latent_loss.item() < 2.0 + 1.0


def test_freeze_sets_requires_grad():
    model = VLA(make_config().model_copy(update={"freeze": ["image_embed", "latent_head"]}))
    assert not model.image_embed.weight.requires_grad and not model.latent_head.weight.requires_grad
    assert model.latent_embed.weight.requires_grad and model.llm.embed_tokens.weight.requires_grad
    frozen = VLA(make_config().model_copy(update={"freeze": ["backbone"]}))
    assert not any(p.requires_grad for p in frozen.llm.parameters())
    assert frozen.image_embed.weight.requires_grad
    with pytest.raises(ValueError, match="freeze"):
        VLAConfig(freeze=["vision_tower"], vision=TINY_VQGAN)
    with pytest.raises(ValueError, match="'image_embed' does not exist with the vit tower"):
        VLA(make_config(vision={"tower": "vit", "vit": TINY_VIT}).model_copy(update={"freeze": ["image_embed"]}))


def test_tower_and_sequence_must_agree():
    with pytest.raises(ValueError, match="num_image_tokens is 9 but the vision tower gives 16"):
        VLA(make_config().model_copy(update={"sequence": SequenceConfig(num_image_tokens=9, image_codebook_size=64,
                                                                          end_of_vision_id=65)}))
    with pytest.raises(ValueError, match="image_codebook_size is 8192 but the VQGAN has 64"):
        VLA(make_config().model_copy(update={"sequence": SequenceConfig(num_image_tokens=16)}))
    with pytest.raises(ValueError, match="end_of_vision_id must be null with the vit tower"):
        VLAConfig(vision={"tower": "vit", "vit": TINY_VIT}, sequence=SequenceConfig(num_image_tokens=16))


@pytest.mark.parametrize("table, stream_tag", [("image_embed", STREAM_IMAGE), ("latent_embed", STREAM_LATENT)])
def test_embedding_selected_by_stream(tokenizer, table, stream_tag):
    torch.manual_seed(0)
    model = VLA(make_config())
    batch = make_batch(tokenizer, model.config)
    args = embed_args(model, batch)
    before = model.embed(*args)  # [B, T, D]
    in_stream = batch["stream"] == stream_tag
    weight = getattr(model, table).weight
    ids = batch["stream_ids"].masked_scatter(image_token_positions(batch), args[3])  # the tower's codes
    assert torch.equal(before[in_stream], weight[ids[in_stream]])
    with torch.no_grad():
        weight.zero_()
    after = model.embed(*args)
    changed = (after != before).any(-1)  # [B, T]
    assert torch.equal(changed, in_stream)
    assert (after[in_stream] == 0).all()


def test_text_embedding_uses_input_ids_at_text_positions(tokenizer):
    torch.manual_seed(0)
    model = VLA(make_config())
    batch = make_batch(tokenizer, model.config)
    args = embed_args(model, batch)
    before = model.embed(*args)
    text = batch["stream"] == STREAM_TEXT
    assert torch.equal(before[text], model.llm.embed_tokens.weight[batch["input_ids"][text]])
    with torch.no_grad():
        model.llm.embed_tokens.weight.zero_()
    changed = (model.embed(*args) != before).any(-1)
    assert torch.equal(changed, text)


def hand_loss(model: VLA, batch) -> torch.Tensor:
    """Python loop over positions: weight * -log softmax of the head named by target_stream, mean over rows."""
    hidden = model.hidden_states(batch)
    heads = {STREAM_TEXT: model.llm.lm_head.weight, STREAM_LATENT: model.latent_head.weight}
    total = torch.zeros(())
    rows, length = batch["targets"].shape
    for b in range(rows):
        for t in range(length):
            target = int(batch["targets"][b, t])
            if target == IGNORE_INDEX:
                continue
            logits = heads[int(batch["target_stream"][b, t])] @ hidden[b, t]
            total = total - batch["loss_weight"][b, t] * torch.log_softmax(logits, -1)[target]
    return total / rows


@pytest.mark.parametrize("weights", [(0.99, 0.01), (0.3, 2.0)])
def test_loss_matches_hand_computation(tokenizer, weights):
    torch.manual_seed(1)
    config = make_config(latent_loss_weight=weights[0], text_loss_weight=weights[1])
    model = VLA(config)
    batch = make_batch(tokenizer, config)  # two rows of different lengths: padding carries no loss
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        output = model(batch)
        expected = hand_loss(model, batch)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # per example the weights sum to each stream's weight, so the loss splits into the two means
    one = make_batch(tokenizer, config, count=1)
    with torch.no_grad():
        single = model(one)
    split = weights[0] * single.latent_loss + weights[1] * single.text_loss
    assert single.loss.item() == pytest.approx(split.item(), rel=1e-5)


def test_latent_loss_and_accuracy_metrics(tokenizer):
    torch.manual_seed(2)
    model = VLA(make_config())
    batch = make_batch(tokenizer, model.config)
    with torch.no_grad():
        output = model(batch)
    mask = batch["target_stream"] == STREAM_LATENT
    logits, targets = output.latent_logits[mask], batch["targets"][mask]  # [8, C], [8]
    assert logits.shape == (8, 8)
    assert output.latent_loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    accuracy = (logits.argmax(-1) == targets).float().mean()
    assert output.latent_accuracy.item() == pytest.approx(accuracy.item())


def test_adamw_steps_lower_total_and_latent_loss(tokenizer):
    torch.manual_seed(3)
    model = VLA(make_config())
    batch = make_batch(tokenizer, model.config)
    outputs = train(model, batch, steps=15, lr=3e-3)
    final = model(batch)
    assert final.loss.item() < 0.7 * outputs[0].loss.item()
    assert final.latent_loss.item() < 0.7 * outputs[0].latent_loss.item()


def test_predict_latent_in_range_then_reproduces_overfit_example(tokenizer):
    torch.manual_seed(4)
    model = VLA(make_config())
    prompt = build_prompt(tokenizer, INSTRUCTIONS[0], PLACEHOLDER, model.config.sequence)
    batched = {key: torch.stack([value, value]) for key, value in prompt.items()}  # same instruction: same length
    codes = model.predict_latent(batched, torch.cat([images(1, seed=0), images(1, seed=9)]))
    assert codes.shape == (2, 4) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < 8)).all()
    train(model, make_batch(tokenizer, model.config, count=1), steps=40, lr=1e-2)
    assert torch.equal(model.predict_latent(prompt, images(1)), LATENTS[0].view(1, 4))
    only_odd = torch.zeros(4, 8, dtype=torch.bool)
    only_odd[:, 1::2] = True  # restrict every position to odd ids, as an action tokenizer's mask does
    assert (model.predict_latent(prompt, images(1), only_odd) % 2 == 1).all()


def test_predict_latent_rejects_padded_prompts(tokenizer):
    model = VLA(make_config())
    prompt = build_prompt(tokenizer, INSTRUCTIONS[0], PLACEHOLDER, model.config.sequence)
    padded = {**prompt, "attention_mask": torch.ones_like(prompt["input_ids"])}
    padded["attention_mask"][-1] = 0
    with pytest.raises(ValueError, match="unpadded"):
        model.predict_latent(padded, images(1))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
        model.predict_latent(prompt, images(1)[:, :, :16])


def test_vit_tower_features_fill_the_image_positions_in_order(tokenizer):
    torch.manual_seed(5)
    model = VLA(make_config(vision={"tower": "vit", "vit": TINY_VIT}))
    assert model.image_embed is None
    batch = make_batch(tokenizer, model.config)
    features = model.vision(batch["images"])  # [B, N, D]
    embedded = model.embed(*embed_args(model, batch))  # [B, T, D]
    positions = image_token_positions(batch)
    assert torch.equal(positions, batch["stream"] == STREAM_IMAGE)  # no end-of-vision position
    for row in range(2):
        assert torch.allclose(embedded[row][positions[row]], features[row])
    output = model(batch)
    output.loss.backward()
    assert model.vision.projector[0].weight.grad is not None  # the projector trains
    assert all(p.grad is None for p in model.vision.vit.parameters())  # the ViT is frozen
