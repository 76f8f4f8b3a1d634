"""The body of every training launcher (launch/train_laq.py, pretrain.py, finetune.py): arguments, config, trainer.

    --config FILE [--set key.path=value ...] --run-dir DIR     (--local_rank comes from the deepspeed launcher)

A bad config, missing input (init weights, data, tokenizer) or a config of another stage stops the launcher
before training with one message and exit status 2; re-running on the same --run-dir resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pydantic import BaseModel

from lapa_dist.config import ConfigError, add_config_arguments, config_from_args


def run_trainer(name: str, description: str, config_class: type[BaseModel], trainer_class: Callable,
                argv: list[str] | None = None, check: Callable[[BaseModel], None] | None = None) -> int:
    """Parse, build ``trainer_class(config, run_dir)`` and train; ``check(config)`` may raise ConfigError."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run-dir", required=True, help="Directory for config.json, metrics.jsonl, checkpoints/.")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    try:
        config = config_from_args(config_class, args)
        if check is not None:
            check(config)
        trainer = trainer_class(config, args.run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as error:  # bad config, init weights, data or tokenizer
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    trainer.train()
    return 0
