"""A tiny LLaMA-style tokenizer built offline: WordLevel over a few sentences, ``<unk>``=0, ``<s>``=1, ``</s>``=2.

Saved as a ``PreTrainedTokenizerFast`` to a directory, so tests load it from a local path like users will. The
pre-tokenizer splits punctuation from words, so markers such as ``<vision>`` become several pieces, as they do
with the LLaMA SentencePiece model.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

TRAINING_SENTENCES = [
    "You are a helpful assistant. USER: What action should the robot take to `pick up the red block` ASSISTANT:",
    "<vision> </vision> <delta> </delta> <action> </action>",
    "push the blue cube to the left, open the drawer, close the gripper",
]


def save_tiny_tokenizer(directory: Path) -> Path:
    """Train the tiny tokenizer and save it under ``directory``; returns the directory."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    backend.train_from_iterator(TRAINING_SENTENCES, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    wrapped.save_pretrained(str(directory))
    return directory


def load_tiny_tokenizer(directory: Path):
    """Build, save and reload the tiny tokenizer from a local path."""
    return AutoTokenizer.from_pretrained(str(save_tiny_tokenizer(directory)))
