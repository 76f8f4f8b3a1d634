"""The vision-language-action model: a vision tower and a Llama backbone reading three token streams.

Each position of a ``vla_sequence`` batch carries a stream tag and is embedded with its stream's table:

    text   (stream 0)  the backbone's token embedding ``llm.embed_tokens``, indexed by ``input_ids``
    image  (stream 1)  vqgan tower: ``image_embed`` [image_codebook_size (+ end-of-vision), D] = 8194 rows, indexed
                       by the tower's codes (the first N image positions) and the end-of-vision id;
                       vit tower: the projected ViT features [B, N, D], in order (no end-of-vision position)
    latent (stream 2)  ``latent_embed`` [|C|, D], by ``stream_ids``

The batch carries ``images`` float [B, 3, S, S] in [0, 1]; the tower runs inside ``forward`` (frozen VQGAN: no
gradient), so the image positions of ``stream_ids`` are placeholders filled here.

The same model serves action finetuning: there the "latent" stream holds the D action tokens of an
``ActionTokenizer`` (``sequence.latent_length`` = D, ``latent_vocab_size`` = its vocabulary), and
``latent_embed``/``latent_head`` are the new action embedding and head.

The three lookups are merged with masks (``torch.where``), never a loop over positions. Two heads read the
final hidden state: the backbone's LM head (text targets) and ``latent_head`` [D -> |C|] (latent targets);
the head used at a position is chosen by ``target_stream``. Image positions are inputs only (no image head).

Loss: ``sum over positions of loss_weight * CE`` per example, averaged over the examples of the batch; with
``vla_sequence``'s per-example weights that is 0.99 * mean latent CE + 0.01 * mean text CE per example.

Choices (documented):
  * ``latent_embed`` and ``latent_head`` are initialised LeCun-normal (std 1/sqrt(fan_in), plain normal).
    The head's fan_in is D. For the embedding fan_in is also taken as D (its row width), so latent embeddings
    start at the scale of the token embeddings (1/sqrt(4096) ~ 0.016 at 7B) rather than 1/sqrt(|C|) ~ 0.35.
  * ``image_embed`` is LWM's vision-token embedding inside the LM, trained by default like the rest of the
    LM (the paper freezes the VQGAN tower, which lives outside this model). ``freeze`` can still freeze it.
  * ``attention_mask`` is not used: padding is on the right and attention is causal, so real positions never
    see padding, and padding carries no loss.
  * Tensor parallelism: ``parallelize(vla.llm, layout)`` swaps the backbone only (its plan matches leaf names
    ``embed_tokens``, ``lm_head``, ...). The new tables keep names outside the plan and stay replicated
    (|C| = 8 columns and 8194 rows do not split evenly); text CE goes through ``llm.cross_entropy`` so the
    vocab-parallel one is used under TP.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lapa_dist.config import StrictModel
from lapa_dist.models.llama import Llama, LlamaConfig
from lapa_dist.models.vision import VisionConfig, build_vision_tower
from lapa_dist.models.vla_sequence import (
    IGNORE_INDEX,
    STREAM_IMAGE,
    STREAM_LATENT,
    STREAM_TEXT,
    SequenceConfig,
)

FreezablePart = Literal["backbone", "text_embed", "image_embed", "latent_embed", "latent_head", "vision"]


class VLAConfig(StrictModel):
    """Backbone shape, sequence layout and which parts are frozen."""

    backbone: LlamaConfig = Field(default_factory=LlamaConfig)
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)
    vision: VisionConfig
    freeze: list[FreezablePart] = Field(default_factory=list)
    """Parts whose parameters get requires_grad=False. Default: everything trains (latent pretraining trains
    the whole LM, image-token embedding included; the frozen VQGAN tower is not part of this model).
    ``backbone`` is the whole Llama (blocks, norms, text embedding and LM head); ``vision`` the ViT tower and its
    projector (a VQGAN tower is always frozen)."""

    @model_validator(mode="after")
    def _check_placeholder(self) -> VLAConfig:
        if self.sequence.placeholder_token_id >= self.backbone.vocab_size:
            raise ValueError(f"placeholder_token_id {self.sequence.placeholder_token_id} is outside the backbone "
                             f"vocabulary of {self.backbone.vocab_size}")
        if self.vision.tower == "vit" and self.sequence.end_of_vision_id is not None:
            raise ValueError("sequence.end_of_vision_id must be null with the vit tower (it has no image-code table)")
        return self

    @property
    def image_vocab_size(self) -> int:
        """Rows of the image table: the codebook plus the end-of-vision id (8192 + 2 = 8194 for LWM)."""
        end_of_vision = self.sequence.end_of_vision_id
        return max(self.sequence.image_codebook_size, -1 if end_of_vision is None else end_of_vision + 1)


class VLAOutput(NamedTuple):
    """A named tuple, so DeepSpeed's ZeRO-3 module hooks can find the tensors in it."""

    loss: torch.Tensor
    """Scalar weighted loss to backpropagate."""
    latent_loss: torch.Tensor
    """Mean latent CE over latent targets (detached; NaN-free 0 when the batch has none)."""
    text_loss: torch.Tensor
    """Mean text CE over text targets (detached)."""
    latent_accuracy: torch.Tensor
    """Fraction of latent targets whose argmax is right (detached)."""
    latent_logits: torch.Tensor
    """[B, T, |C|] latent-head logits at every position."""


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """In-place normal init with std 1/sqrt(fan_in)."""
    with torch.no_grad():
        return weight.normal_(0.0, 1.0 / math.sqrt(fan_in))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, T] where mask [B, T] is set, 0 when nothing is."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class VLA(nn.Module):
    def __init__(self, config: VLAConfig, backbone_device: torch.device | str | None = None):
        """``backbone_device="meta"`` builds the Llama without storage (a 7B backbone whose weights will be loaded:
        ``parallelize`` then ``materialize`` it, then load, so it is never whole on one rank)."""
        super().__init__()
        self.config = config
        hidden = config.backbone.hidden_size
        latent_vocab = config.sequence.latent_vocab_size
        self.vision = build_vision_tower(config.vision, hidden)
        if self.vision.num_tokens != config.sequence.num_image_tokens:
            raise ValueError(f"sequence.num_image_tokens is {config.sequence.num_image_tokens} but the vision tower "
                             f"gives {self.vision.num_tokens} tokens per image")
        if self.vision.discrete and self.vision.codebook_size != config.sequence.image_codebook_size:
            raise ValueError(f"sequence.image_codebook_size is {config.sequence.image_codebook_size} but the VQGAN "
                             f"has {self.vision.codebook_size} codes")
        with torch.device(backbone_device) if backbone_device is not None else contextlib.nullcontext():
            self.llm = Llama(config.backbone)
        self.image_embed = nn.Embedding(config.image_vocab_size, hidden) if self.vision.discrete else None
        self.latent_embed = nn.Embedding(latent_vocab, hidden)
        self.latent_head = nn.Linear(hidden, latent_vocab, bias=False)
        if self.image_embed is not None:
            with torch.no_grad():
                self.image_embed.weight.normal_(0.0, config.backbone.init_std)
        lecun_normal_(self.latent_embed.weight, fan_in=hidden)
        lecun_normal_(self.latent_head.weight, fan_in=hidden)
        self._apply_freeze(config.freeze)

    def _apply_freeze(self, parts: list[str]) -> None:
        modules = {"backbone": self.llm, "text_embed": self.llm.embed_tokens, "image_embed": self.image_embed,
                   "latent_embed": self.latent_embed, "latent_head": self.latent_head, "vision": self.vision}
        for part in parts:
            if modules[part] is None:
                raise ValueError(f"freeze: {part!r} does not exist with the {self.config.vision.tower} tower")
            modules[part].requires_grad_(False)

    @property
    def image_size(self) -> int:
        """Side S of the square images the tower reads."""
        return self.vision.image_size

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's output for images float [B, 3, S, S] in [0, 1]: codes [B, N] or embeddings [B, N, D]."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {list(images.shape)}")
        return self.vision(images)

    def embed(self, input_ids: torch.Tensor, stream: torch.Tensor, stream_ids: torch.Tensor,
              image_tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B, T, D]: each position from its stream's table. ``input_ids``, ``stream`` and
        ``stream_ids`` are int [B, T]; ``image_tokens`` is ``self.image_tokens(images)``."""
        is_image = (stream == STREAM_IMAGE).unsqueeze(-1)  # [B, T, 1]
        is_latent = (stream == STREAM_LATENT).unsqueeze(-1)  # [B, T, 1]
        # The first N image positions of each row hold the image's tokens, in order (then end-of-vision, if any).
        is_image_token = is_image[..., 0] & (is_image[..., 0].cumsum(dim=1) <= self.config.sequence.num_image_tokens)
        if int(is_image_token.sum()) != image_tokens.shape[0] * self.config.sequence.num_image_tokens:
            raise ValueError("every example must hold exactly one image of sequence.num_image_tokens positions")
        text = self.llm.embed(input_ids)  # [B, T, D]; placeholders at image/latent positions
        latent = self.latent_embed(stream_ids.masked_fill(~is_latent[..., 0], 0))  # [B, T, D]
        if self.vision.discrete:
            image_ids = stream_ids.masked_scatter(is_image_token, image_tokens.to(stream_ids.dtype))  # [B, T]
            image = self.image_embed(image_ids.masked_fill(~is_image[..., 0], 0))  # [B, T, D]
        else:
            image = torch.zeros_like(text).masked_scatter(is_image_token.unsqueeze(-1), image_tokens.to(text.dtype))
        return torch.where(is_image, image, torch.where(is_latent, latent, text))

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] of a batch with input_ids, stream, stream_ids [B, T] and images."""
        h = self.embed(batch["input_ids"], batch["stream"], batch["stream_ids"], self.image_tokens(batch["images"]))
        return self.llm.forward_embeddings(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> VLAOutput:
        """Loss of a ``collate_examples`` batch (targets, target_stream, loss_weight [B, T]) plus ``images``."""
        hidden = self.hidden_states(batch)  # [B, T, D]
        targets, target_stream = batch["targets"], batch["target_stream"]
        in_loss = targets != IGNORE_INDEX
        latent_mask = in_loss & (target_stream == STREAM_LATENT)  # [B, T]
        text_mask = in_loss & (target_stream == STREAM_TEXT)  # [B, T]
        latent_logits = self.latent_head(hidden)  # [B, T, C]
        latent_ce = F.cross_entropy(latent_logits.float().flatten(0, 1),
                                    targets.masked_fill(~latent_mask, 0).flatten(),
                                    reduction="none").view_as(targets)  # [B, T]
        # Under TP the vocab-parallel CE overwrites these (vocab-split) logits in place.
        text_ce = self.llm.cross_entropy(self.llm.logits(hidden), targets.masked_fill(~text_mask, 0))  # [B, T]
        per_position = torch.where(latent_mask, latent_ce, torch.where(text_mask, text_ce, 0.0))  # [B, T]
        loss = (batch["loss_weight"] * per_position).sum() / targets.shape[0]
        with torch.no_grad():
            correct = latent_logits.argmax(-1) == targets
            return VLAOutput(
                loss=loss,
                latent_loss=_masked_mean(latent_ce, latent_mask),
                text_loss=_masked_mean(text_ce, text_mask),
                latent_accuracy=_masked_mean(correct.float(), latent_mask),
                latent_logits=latent_logits,
            )

    @torch.no_grad()
    def predict_latent(self, prompt: dict[str, torch.Tensor], images: torch.Tensor,
                       valid_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy latent (or action) tokens [B, s] after ``build_prompt`` prefixes (input_ids, stream, stream_ids:
        [B, T] or [T]) of images float [B, 3, S, S] in [0, 1].

        ``valid_tokens`` bool [s, |C|] restricts token i to the ids allowed at position i (an ActionTokenizer's
        ``valid_token_mask``). Prompts in a batch must have the same length (no padding). One full forward pass
        per token.
        """
        keys = ("input_ids", "stream", "stream_ids")
        input_ids, stream, stream_ids = (torch.atleast_2d(prompt[key]) for key in keys)  # [B, T] each
        if "attention_mask" in prompt and not bool(prompt["attention_mask"].all()):
            raise ValueError("predict_latent needs unpadded prompts of equal length")
        image_tokens = self.image_tokens(images)
        placeholder = self.config.sequence.placeholder_token_id
        codes = []
        for position in range(self.config.sequence.latent_length):
            hidden = self.llm.forward_embeddings(self.embed(input_ids, stream, stream_ids, image_tokens))  # [B, T, D]
            logits = self.latent_head(hidden[:, -1]).float()  # [B, |C|]
            if valid_tokens is not None:
                logits = logits.masked_fill(~valid_tokens[position].to(logits.device), float("-inf"))
            code = logits.argmax(-1, keepdim=True)  # [B, 1]
            codes.append(code)
            input_ids = torch.cat([input_ids, torch.full_like(code, placeholder)], dim=1)
            stream = torch.cat([stream, torch.full_like(code, STREAM_LATENT)], dim=1)
            stream_ids = torch.cat([stream_ids, code], dim=1)
        return torch.cat(codes, dim=1)  # [B, s]
