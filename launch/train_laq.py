"""Train the latent action quantizer (stage 1).

    deepspeed --num_gpus N launch/train_laq.py --config configs/laq/metaworld.json --run-dir runs/laq [--set k=v]

Re-running the same command on the same --run-dir resumes from its newest complete checkpoint.
"""

import argparse
import sys

from lapa_dist.config import ConfigError, add_config_arguments, config_from_args
from lapa_dist.train.laq import LAQRunConfig, LAQTrainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run-dir", required=True, help="Directory for config.json, metrics.jsonl, checkpoints/.")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    try:
        config = config_from_args(LAQRunConfig, args)
        trainer = LAQTrainer(config, args.run_dir)
    except ConfigError as error:
        print(f"train_laq: {error}", file=sys.stderr)
        return 2
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
