"""A small word-level HF tokenizer built offline, for demos and tests where no LLaMA tokenizer is on disk.

LLaMA-style special tokens (``<unk>`` = 0 = pad, ``<s>`` = 1, ``</s>`` = 2); the vocabulary is every word and
punctuation mark of the given sentences (the pre-tokenizer splits punctuation from words, so markers such as
``<vision>`` become several pieces, as they do with LLaMA's SentencePiece model). Saved as a
``PreTrainedTokenizerFast`` directory, so runs load it from a local path exactly like a real tokenizer.

    python -m lapa_dist.word_tokenizer OUT_DIR --metaworld     # the prompt, markers and Meta-World's 50 tasks
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
PROMPT_SENTENCES = [
    "You are a helpful assistant. USER: What action should the robot take to `instruction` ASSISTANT:",
    "<vision> </vision> <delta> </delta> <action> </action>",
]


def save_word_tokenizer(directory: str | Path, sentences: Iterable[str]) -> Path:
    """Train a word-level tokenizer on ``sentences`` plus the prompt and markers, save it; returns the directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    backend.train_from_iterator([*PROMPT_SENTENCES, *sentences], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    wrapped.save_pretrained(str(directory))
    return Path(directory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--metaworld", action="store_true", help="add Meta-World's 50 task instructions")
    parser.add_argument("--sentences", nargs="*", default=[], help="more sentences to take words from")
    args = parser.parse_args(argv)
    sentences = list(args.sentences)
    if args.metaworld:
        from lapa_dist.envs.metaworld import INSTRUCTIONS

        sentences += list(INSTRUCTIONS.values())
    directory = save_word_tokenizer(args.out_dir, sentences)
    print(f"tokenizer written to {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
