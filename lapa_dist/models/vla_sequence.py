"""VLA sequence layout: one (instruction, image codes, latent actions) example -> token ids, streams, loss masks.

Layout of one training example (T positions), segments in order::

    text   template(instruction) + " <vision>"      e.g. "<s> You are a helpful assistant. USER: What action
                                                     should the robot take to `{instruction}` ASSISTANT: <vision>"
    image  256 VQGAN codes (raster order), then end-of-vision code 8193     (257 image positions)
    text   "</vision> <delta>"
    latent s latent-action codes (s = 4, vocabulary |C| = 8)
    text   "</delta>" then EOS

What LWM.md specifies and this module follows:
  * Image codes are NOT offset into the text vocabulary; each position carries a stream tag and the model embeds
    it with the table of its stream (text ``wte``, image ``vte``, latent ``dte``), like LWM's ``vision_mask``.
  * One image = text ``<vision>``, 256 codes, the end-of-vision code 8193 (image stream), text ``</vision>``.
  * ``<vision>``, ``</vision>``, ``<delta>``, ``</delta>`` are ordinary text (possibly several pieces), not added
    tokens. The literal ``<s>`` in the template is the tokenizer's BOS; the tokenizer adds no extra BOS
    (``add_special_tokens=False``). Each text segment is encoded separately, like the reference processors.
  * Loss = 0.99 * latent (delta) cross-entropy + 0.01 * text cross-entropy.

Choices where LWM.md is silent (documented here):
  * Single BOS by default. The reference inference prompt starts with a doubled ``<s> <s>``; set
    ``prompt_template`` to reproduce it for converted LAPA weights.
  * EOS after ``</delta>`` (the processors add EOS explicitly; where exactly is not stated).
  * Image and latent positions hold ``placeholder_token_id`` (0 = unk = pad in LLaMA) in ``input_ids``; their
    real code lives in ``stream_ids``.
  * Which predictions carry loss (causal shift: the token at position p predicts position p+1):
      - target at p+1 is latent -> latent loss (this includes ``<delta>``'s last piece predicting latent 0);
      - target at p+1 is text and position p is not image -> text loss (prompt tokens predicting their next
        token, the markers, ``</delta>`` predicted from the last latent, EOS), when ``text_loss_on_text`` is on;
      - target at p+1 is image, or position p is image -> no loss (frozen VQGAN codes are inputs only, so
        ``</vision>`` predicted from the end-of-vision code is not trained either).
  * Weights are normalised per example: each stream's weights sum to its configured loss weight, so
    ``sum(loss_weight * CE)`` is 0.99 * mean latent CE + 0.01 * mean text CE for that example. (The reference
    averages text CE over all text tokens of a batch; with fixed-length latent blocks the latent term is equal.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator

from lapa_dist.config import StrictModel

STREAM_TEXT = 0
STREAM_IMAGE = 1
STREAM_LATENT = 2
IGNORE_INDEX = -100

REFERENCE_PROMPT = (
    "<s> You are a helpful assistant. USER: What action should the robot take to `{instruction}` ASSISTANT:"
)


class SequenceConfig(StrictModel):
    """How a VLA example is laid out as a token sequence."""

    prompt_template: str = REFERENCE_PROMPT
    """Text before the image; must contain ``{instruction}``. A literal ``<s>`` is the tokenizer's BOS."""
    vision_start: str = "<vision>"
    """Text marker before the image codes."""
    vision_end: str = "</vision>"
    """Text marker after the image codes."""
    latent_start: str = "<delta>"
    """Text marker before the latent-action codes."""
    latent_end: str = "</delta>"
    """Text marker after the latent-action codes."""
    append_eos: bool = True
    """Append the tokenizer's EOS after the latent end marker."""
    num_image_tokens: int = Field(default=256, ge=1)
    """VQGAN codes per image (16 x 16, raster order)."""
    image_codebook_size: int = Field(default=8192, ge=1)
    """Valid image codes are 0 .. image_codebook_size - 1."""
    end_of_vision_id: int | None = Field(default=8193, ge=0)
    """Image-stream id appended after the codes (LWM: 8193); None appends nothing."""
    latent_length: int = Field(default=4, ge=1)
    """Latent-action tokens per example (s)."""
    latent_vocab_size: int = Field(default=8, ge=1)
    """Latent-action vocabulary |C|."""
    action_tokens_per_action: int = Field(default=7, ge=1)
    """Discrete action tokens per action (D) for action finetuning."""
    latent_loss_weight: float = Field(default=0.99, ge=0)
    """Weight of the latent-action cross-entropy."""
    text_loss_weight: float = Field(default=0.01, ge=0)
    """Weight of the text cross-entropy."""
    text_loss_on_text: bool = True
    """Train text targets (prompt tokens predicting their next token, markers, EOS) with the text loss."""
    placeholder_token_id: int = Field(default=0, ge=0)
    """``input_ids`` value at image and latent positions (LLaMA unk = pad = 0)."""

    @model_validator(mode="after")
    def _template_has_instruction(self) -> SequenceConfig:
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{instruction}'")
        return self


def _encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of one text segment, no special tokens added (a literal ``<s>`` still maps to BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _check_codes(name: str, codes, length: int, vocab_size: int) -> torch.Tensor:
    """Validate a 1-D integer code vector of a fixed length and range; returns it as int64 [length]."""
    tensor = torch.as_tensor(codes)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be integer codes, got dtype {tensor.dtype}")
    if tensor.ndim != 1 or tensor.numel() != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(tensor.shape)}")
    out_of_range = (tensor < 0) | (tensor >= vocab_size)
    if bool(out_of_range.any()):
        bad = tensor[out_of_range][0].item()
        raise ValueError(f"{name} ids must be in [0, {vocab_size}), got {bad}")
    return tensor.long()


def _check_instruction(instruction: str) -> str:
    """The instruction with surrounding whitespace removed; empty or non-string is an error."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
    return instruction.strip()


def _segments(tokenizer, instruction: str, image_tokens, latent_tokens, config: SequenceConfig):
    """The example as (stream, ids) segments; the latent block and what follows only when latents are given."""
    instruction = _check_instruction(instruction)
    image = _check_codes("image_tokens", image_tokens, config.num_image_tokens, config.image_codebook_size)
    image_ids = image.tolist() + ([] if config.end_of_vision_id is None else [config.end_of_vision_id])
    prefix = config.prompt_template.format(instruction=instruction) + " " + config.vision_start
    segments = [
        (STREAM_TEXT, _encode_text(tokenizer, prefix)),
        (STREAM_IMAGE, image_ids),
        (STREAM_TEXT, _encode_text(tokenizer, f"{config.vision_end} {config.latent_start}")),
    ]
    if latent_tokens is None:
        return segments
    latent = _check_codes("latent_tokens", latent_tokens, config.latent_length, config.latent_vocab_size)
    suffix = _encode_text(tokenizer, config.latent_end)
    if config.append_eos:
        suffix.append(tokenizer.eos_token_id)
    segments += [(STREAM_LATENT, latent.tolist()), (STREAM_TEXT, suffix)]
    return segments


def _flatten(segments, placeholder_id: int) -> dict[str, torch.Tensor]:
    """Concatenate segments into ``input_ids``, ``stream``, ``stream_ids`` (each int64 [T])."""
    input_ids, stream, stream_ids = [], [], []
    for stream_tag, ids in segments:
        stream += [stream_tag] * len(ids)
        stream_ids += ids
        input_ids += ids if stream_tag == STREAM_TEXT else [placeholder_id] * len(ids)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "stream": torch.tensor(stream, dtype=torch.long),
        "stream_ids": torch.tensor(stream_ids, dtype=torch.long),
    }


def build_prompt(tokenizer, instruction: str, image_tokens, config: SequenceConfig) -> dict[str, torch.Tensor]:
    """Inference prefix up to and including ``<delta>``; the s latent tokens are generated after it.

    Returns ``input_ids``, ``stream``, ``stream_ids`` (int64 [T_prompt]); a prefix of ``build_example``'s output.
    """
    segments = _segments(tokenizer, instruction, image_tokens, None, config)
    return _flatten(segments, config.placeholder_token_id)


def _shifted_targets(stream: torch.Tensor, stream_ids: torch.Tensor, config: SequenceConfig):
    """Causal shift: position p's target is position p+1's stream id, tagged with p+1's stream.

    Returns ``targets`` [T] (-100 where no loss), ``target_stream`` [T] (-1 at the last position) and
    ``loss_weight`` [T] float32 (per stream summing to that stream's configured weight).
    """
    next_stream = torch.cat([stream[1:], stream.new_full((1,), -1)])  # [T]
    next_ids = torch.cat([stream_ids[1:], stream_ids.new_full((1,), IGNORE_INDEX)])  # [T]
    latent_target = next_stream == STREAM_LATENT
    text_target = (next_stream == STREAM_TEXT) & (stream != STREAM_IMAGE)
    if not config.text_loss_on_text:
        text_target = torch.zeros_like(text_target)
    loss_weight = torch.zeros(stream.shape, dtype=torch.float32)
    for mask, weight in ((latent_target, config.latent_loss_weight), (text_target, config.text_loss_weight)):
        if bool(mask.any()):
            loss_weight[mask] = weight / int(mask.sum())
    targets = torch.where(latent_target | text_target, next_ids, torch.full_like(next_ids, IGNORE_INDEX))
    return targets, next_stream, loss_weight


def build_example(tokenizer, instruction: str, image_tokens, latent_tokens, config: SequenceConfig) -> dict:
    """One training example (see the module docstring for the layout and loss rules).

    ``image_tokens``: int [num_image_tokens] VQGAN codes; ``latent_tokens``: int [latent_length] or None
    (None gives the prompt only, with no targets in the loss). Returns int64 [T] ``input_ids``, ``stream``,
    ``stream_ids``, ``targets``, ``target_stream`` and float32 [T] ``loss_weight``.
    """
    segments = _segments(tokenizer, instruction, image_tokens, latent_tokens, config)
    example = _flatten(segments, config.placeholder_token_id)
    targets, target_stream, loss_weight = _shifted_targets(example["stream"], example["stream_ids"], config)
    if latent_tokens is None:
        targets.fill_(IGNORE_INDEX)
        loss_weight.zero_()
    example.update(targets=targets, target_stream=target_stream, loss_weight=loss_weight)
    return example


_PAD_VALUES = {
    "input_ids": 0,
    "stream": STREAM_TEXT,
    "stream_ids": 0,
    "targets": IGNORE_INDEX,
    "target_stream": -1,
    "loss_weight": 0.0,
}


def collate_examples(examples: Sequence[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one.

    Returns every example field as [B, T_max] plus ``attention_mask`` [B, T_max] (1 real, 0 padding) and the
    per-stream targets ``text_targets`` / ``latent_targets`` [B, T_max] (-100 outside that stream's loss).
    Padding carries no loss (targets -100, weight 0).
    """
    if not examples:
        raise ValueError("collate_examples needs at least one example")
    max_length = max(int(example["input_ids"].numel()) for example in examples)
    batch = {}
    for key, pad_value in _PAD_VALUES.items():
        pad_value = pad_token_id if key == "input_ids" else pad_value
        rows = [_right_pad(example[key], max_length, pad_value) for example in examples]
        batch[key] = torch.stack(rows)  # [B, T_max]
    lengths = torch.tensor([int(example["input_ids"].numel()) for example in examples])
    batch["attention_mask"] = (torch.arange(max_length)[None, :] < lengths[:, None]).long()  # [B, T_max]
    for name, stream_tag in (("text_targets", STREAM_TEXT), ("latent_targets", STREAM_LATENT)):
        in_stream = batch["target_stream"] == stream_tag
        batch[name] = torch.where(in_stream, batch["targets"], torch.full_like(batch["targets"], IGNORE_INDEX))
    return batch


def _right_pad(values: torch.Tensor, length: int, pad_value) -> torch.Tensor:
    """[t] -> [length], filled with ``pad_value`` after the data."""
    padded = values.new_full((length,), pad_value)
    padded[: values.numel()] = values
    return padded
