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

BACKBONE = Path(__file__).resolve().parents[1] / "configs" / "vla" / "backbone_tiny.json"
NUM_IMAGE_TOKENS = 16  # short sequences keep the tests fast; the layout is otherwise the reference one
LATENTS = (torch.tensor([7, 0, 3, 5]), torch.tensor([2, 2, 6, 1]))  # [4] each
INSTRUCTIONS = ("pick up the red block", "push the blue cube to the left")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def make_config(**sequence) -> VLAConfig:
    backbone = LlamaConfig(**json.loads(BACKBONE.read_text()))
    return VLAConfig(backbone=backbone, sequence=SequenceConfig(num_image_tokens=NUM_IMAGE_TOKENS, **sequence))


def image_codes(seed: int) -> torch.Tensor:
    return torch.randint(0, 8192, (NUM_IMAGE_TOKENS,), generator=torch.Generator().manual_seed(seed))


def make_batch(tokenizer, config: VLAConfig, count: int = 2) -> dict[str, torch.Tensor]:
    examples = [build_example(tokenizer, INSTRUCTIONS[i], image_codes(i), LATENTS[i], config.sequence)
                for i in range(count)]
    return collate_examples(examples, pad_token_id=tokenizer.pad_token_id)


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
    assert model.image_embed.weight.shape == (8194, 64)
    assert model.latent_embed.weight.shape == (8, 64) and model.latent_head.weight.shape == (8, 64)
    # LeCun normal: std 1/sqrt(hidden) = 0.125, far from the backbone's 0.02
    assert model.latent_head.weight.std().item() == pytest.approx(0.125, rel=0.3)
    batch = make_batch(tokenizer, config)
    output = model(batch)
    assert output.loss.shape == () and output.latent_logits.shape == (*batch["input_ids"].shape, 8)
    assert 0.0 <= output.latent_accuracy.item() <= 1.0
    # at init the latent head is near uniform: CE ~ log 8
    assert output.latent_loss.item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=0.3)


def test_freeze_sets_requires_grad():
    model = VLA(make_config().model_copy(update={"freeze": ["image_embed", "latent_head"]}))
    assert not model.image_embed.weight.requires_grad and not model.latent_head.weight.requires_grad
    assert model.latent_embed.weight.requires_grad and model.llm.embed_tokens.weight.requires_grad
    frozen = VLA(make_config().model_copy(update={"freeze": ["backbone"]}))
    assert not any(p.requires_grad for p in frozen.llm.parameters())
    assert frozen.image_embed.weight.requires_grad
    with pytest.raises(ValueError, match="freeze"):
        VLAConfig(freeze=["vision_tower"])


@pytest.mark.parametrize("table, stream_tag", [("image_embed", STREAM_IMAGE), ("latent_embed", STREAM_LATENT)])
def test_embedding_selected_by_stream(tokenizer, table, stream_tag):
    torch.manual_seed(0)
    model = VLA(make_config())
    batch = make_batch(tokenizer, model.config)
    args = (batch["input_ids"], batch["stream"], batch["stream_ids"])
    before = model.embed(*args)  # [B, T, D]
    in_stream = batch["stream"] == stream_tag
    weight = getattr(model, table).weight
    assert torch.equal(before[in_stream], weight[batch["stream_ids"][in_stream]])
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
    args = (batch["input_ids"], batch["stream"], batch["stream_ids"])
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
    prompts = [build_prompt(tokenizer, INSTRUCTIONS[0], image_codes(seed), model.config.sequence) for seed in (0, 9)]
    batched = {key: torch.stack([p[key] for p in prompts]) for key in prompts[0]}  # same instruction: same length
    codes = model.predict_latent(batched)
    assert codes.shape == (2, 4) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < 8)).all()
    train(model, make_batch(tokenizer, model.config, count=1), steps=40, lr=1e-2)
    assert torch.equal(model.predict_latent(prompts[0]), LATENTS[0].view(1, 4))


def test_predict_latent_rejects_padded_prompts(tokenizer):
    model = VLA(make_config())
    prompt = build_prompt(tokenizer, INSTRUCTIONS[0], image_codes(0), model.config.sequence)
    padded = {**prompt, "attention_mask": torch.ones_like(prompt["input_ids"])}
    padded["attention_mask"][-1] = 0
    with pytest.raises(ValueError, match="unpadded"):
        model.predict_latent(padded)
