"""VLA sequence layout: exact positions, causal targets, loss weights, collation and input validation."""

from __future__ import annotations

import pytest
import torch

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

INSTRUCTION = "pick up the red block"
IMAGE = torch.arange(256) * 31 % 8192  # [256] distinct-ish codes
LATENT = torch.tensor([7, 0, 3, 5])  # [4]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture()
def config():
    return SequenceConfig()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def expected_layout(tokenizer):
    """Independently assembled (stream_ids, stream) for INSTRUCTION, IMAGE, LATENT."""
    prefix = encode(
        tokenizer,
        "<s> You are a helpful assistant. USER: What action should the robot take to "
        f"`{INSTRUCTION}` ASSISTANT: <vision>",
    )
    middle = encode(tokenizer, "</vision> <delta>")
    suffix = encode(tokenizer, "</delta>") + [tokenizer.eos_token_id]
    image = IMAGE.tolist() + [8193]
    ids = prefix + image + middle + LATENT.tolist() + suffix
    streams = (
        [STREAM_TEXT] * len(prefix) + [STREAM_IMAGE] * 257 + [STREAM_TEXT] * len(middle)
        + [STREAM_LATENT] * 4 + [STREAM_TEXT] * len(suffix)
    )
    return ids, streams, len(prefix), len(middle)


def test_exact_layout(tokenizer, config):
    example = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    ids, streams, prefix_length, middle_length = expected_layout(tokenizer)
    assert example["stream_ids"].tolist() == ids
    assert example["stream"].tolist() == streams
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"].tolist())
    assert tokens[0] == "<s>" and tokens.count("<s>") == 1
    assert tokens[prefix_length - 3 : prefix_length] == ["<", "vision", ">"]
    image_end = prefix_length + 257
    assert example["stream_ids"][prefix_length:image_end].tolist() == IMAGE.tolist() + [8193]
    assert (example["input_ids"][prefix_length:image_end] == config.placeholder_token_id).all()
    assert tokens[image_end : image_end + middle_length] == ["</", "vision", ">", "<", "delta", ">"]
    latent_begin = image_end + middle_length
    assert example["stream"][latent_begin : latent_begin + 4].tolist() == [STREAM_LATENT] * 4
    assert example["stream_ids"][latent_begin : latent_begin + 4].tolist() == LATENT.tolist()
    assert tokens[latent_begin + 4 :] == ["</", "delta", ">", "</s>"]
    text = example["stream"] == STREAM_TEXT
    assert torch.equal(example["input_ids"][text], example["stream_ids"][text])


def test_targets_are_next_position_in_next_stream(tokenizer, config):
    example = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    stream, stream_ids, targets = example["stream"], example["stream_ids"], example["targets"]
    assert torch.equal(example["target_stream"][:-1], stream[1:])
    assert example["target_stream"][-1] == -1 and targets[-1] == IGNORE_INDEX
    in_loss = targets != IGNORE_INDEX
    positions = torch.nonzero(in_loss).squeeze(1)
    assert torch.equal(targets[positions], stream_ids[positions + 1])
    latent_positions = torch.nonzero(stream == STREAM_LATENT).squeeze(1)
    # '>' of <delta> predicts latent 0; latents 0..2 predict 1..3; latent 3 predicts the text '</'.
    predictors = latent_positions - 1
    assert torch.equal(targets[predictors], LATENT)
    assert (example["target_stream"][predictors] == STREAM_LATENT).all()
    assert example["target_stream"][latent_positions[-1]] == STREAM_TEXT
    assert targets[latent_positions[-1]] == encode(tokenizer, "</")[0]


def test_image_positions_never_in_loss(tokenizer, config):
    example = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    image = example["stream"] == STREAM_IMAGE
    predicts_image = example["target_stream"] == STREAM_IMAGE
    for mask in (image, predicts_image):
        assert (example["targets"][mask] == IGNORE_INDEX).all()
        assert (example["loss_weight"][mask] == 0).all()
    assert ((example["loss_weight"] > 0) == (example["targets"] != IGNORE_INDEX)).all()


@pytest.mark.parametrize("latent_weight, text_weight", [(0.99, 0.01), (0.5, 2.0)])
def test_weights_sum_per_stream(tokenizer, latent_weight, text_weight):
    config = SequenceConfig(latent_loss_weight=latent_weight, text_loss_weight=text_weight)
    example = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    weight, target_stream = example["loss_weight"], example["target_stream"]
    assert int((weight[target_stream == STREAM_LATENT] > 0).sum()) == 4
    assert weight[target_stream == STREAM_LATENT].sum().item() == pytest.approx(latent_weight)
    assert weight[target_stream == STREAM_TEXT].sum().item() == pytest.approx(text_weight)


def test_text_loss_can_be_switched_off(tokenizer):
    config = SequenceConfig(text_loss_on_text=False)
    example = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    in_loss = example["targets"] != IGNORE_INDEX
    assert (example["target_stream"][in_loss] == STREAM_LATENT).all()
    assert int(in_loss.sum()) == 4
    assert example["loss_weight"].sum().item() == pytest.approx(0.99)


def test_collate_pads_right_and_ignores_padding(tokenizer, config):
    short = build_example(tokenizer, "push", IMAGE, LATENT, config)
    long = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    batch = collate_examples([short, long], pad_token_id=tokenizer.pad_token_id)
    length_short, length_long = short["input_ids"].numel(), long["input_ids"].numel()
    assert length_short < length_long
    assert batch["input_ids"].shape == (2, length_long)
    assert batch["attention_mask"][0].tolist() == [1] * length_short + [0] * (length_long - length_short)
    assert batch["attention_mask"][1].all()
    for key in ("input_ids", "stream", "stream_ids", "targets", "target_stream", "loss_weight"):
        assert torch.equal(batch[key][0, :length_short], short[key])
        assert torch.equal(batch[key][1], long[key])
    padding = batch["attention_mask"] == 0
    assert (batch["targets"][padding] == IGNORE_INDEX).all()
    assert (batch["loss_weight"][padding] == 0).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    latent_rows = batch["latent_targets"][batch["latent_targets"] != IGNORE_INDEX].view(2, 4)
    assert torch.equal(latent_rows, LATENT.expand(2, 4))
    text_mask = batch["text_targets"] != IGNORE_INDEX
    assert (batch["target_stream"][text_mask] == STREAM_TEXT).all()
    assert torch.equal(text_mask | (batch["latent_targets"] != IGNORE_INDEX), batch["targets"] != IGNORE_INDEX)


def test_build_prompt_is_prefix_ending_with_delta(tokenizer, config):
    prompt = build_prompt(tokenizer, INSTRUCTION, IMAGE, config)
    example = build_example(tokenizer, INSTRUCTION, IMAGE, LATENT, config)
    length = prompt["input_ids"].numel()
    for key in ("input_ids", "stream", "stream_ids"):
        assert torch.equal(prompt[key], example[key][:length])
    assert example["stream"][length] == STREAM_LATENT
    tail = tokenizer.convert_ids_to_tokens(prompt["input_ids"][-3:].tolist())
    assert tail == ["<", "delta", ">"]


@pytest.mark.parametrize("instruction", ["", "   "])
def test_empty_instruction_is_rejected(tokenizer, config, instruction):
    with pytest.raises(ValueError, match="instruction must be a non-empty string"):
        build_example(tokenizer, instruction, IMAGE, LATENT, config)


@pytest.mark.parametrize(
    "image, latent, message",
    [
        (IMAGE[:255], LATENT, r"image_tokens must have shape \[256\], got \[255\]"),
        (IMAGE.view(16, 16), LATENT, r"image_tokens must have shape \[256\], got \[16, 16\]"),
        (IMAGE.float(), LATENT, "image_tokens must be integer codes"),
        (torch.full((256,), 8192), LATENT, r"image_tokens ids must be in \[0, 8192\), got 8192"),
        (IMAGE, LATENT[:3], r"latent_tokens must have shape \[4\], got \[3\]"),
        (IMAGE, torch.tensor([0, 1, 8, 2]), r"latent_tokens ids must be in \[0, 8\), got 8"),
        (IMAGE, torch.tensor([0, -1, 2, 2]), r"latent_tokens ids must be in \[0, 8\), got -1"),
    ],
)
def test_bad_codes_are_rejected_with_named_errors(tokenizer, config, image, latent, message):
    with pytest.raises(ValueError, match=message):
        build_example(tokenizer, INSTRUCTION, image, latent, config)


def test_template_without_instruction_is_rejected():
    with pytest.raises(ValueError, match=r"prompt_template must contain '\{instruction\}'"):
        SequenceConfig(prompt_template="<s> USER: do it ASSISTANT:")
