"""The tests' tiny tokenizer: lapa_dist.word_tokenizer over a few robot sentences, loaded from a local path."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from lapa_dist.word_tokenizer import save_word_tokenizer

SENTENCES = ["pick up the red block", "push the blue cube to the left, open the drawer, close the gripper"]


def save_tiny_tokenizer(directory: Path) -> Path:
    """Train the tiny tokenizer and save it under ``directory``; returns the directory."""
    return save_word_tokenizer(directory, SENTENCES)


def load_tiny_tokenizer(directory: Path):
    """Build, save and reload the tiny tokenizer from a local path."""
    return AutoTokenizer.from_pretrained(str(save_tiny_tokenizer(directory)))
