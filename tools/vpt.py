"""The VPT baseline: train an inverse-dynamics model (IDM) on labelled demos, then pseudo-label videos with it.

    python tools/vpt.py train --labelled DIR --out IDM_DIR [--config FILE] [--set k=v ...]
    python tools/vpt.py label --idm IDM_DIR --input VIDEOS --output OUT

train: re-running on the same --out resumes; IDM_DIR/val_metrics.json then holds the held-out R² and MSE per
action dimension (lapa_dist/baselines/vpt.py describes the model and the directory). label: writes OUT as a copy
of VIDEOS whose clips carry the IDM's actions.npy; re-running skips the shards already done.
Exit 0 on success, 2 on a bad config or input.
"""

import argparse
import json
import sys

from lapa_dist.baselines.vpt import IDMConfig, VPTInputError, pseudo_label_shard_set, train_idm
from lapa_dist.config import ConfigError, add_config_arguments, config_from_args
from lapa_dist.data.loader import DataQualityError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train an IDM on a shard set with actions.npy.")
    add_config_arguments(train)
    train.add_argument("--labelled", required=True, help="Shard set whose clips carry true actions.")
    train.add_argument("--out", required=True, help="IDM directory (config, weights, metrics, checkpoints).")
    train.add_argument("--device", default="cpu")
    label = commands.add_parser("label", help="Pseudo-label a shard set with a trained IDM.")
    label.add_argument("--idm", required=True, help="IDM directory written by `train`.")
    label.add_argument("--input", required=True, help="Shard set to label (its actions.npy, if any, is replaced).")
    label.add_argument("--output", required=True, help="Pseudo-labelled shard set to write.")
    label.add_argument("--batch-size", type=int, default=256, help="Frame pairs per IDM forward.")
    label.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            result = train_idm(config_from_args(IDMConfig, args), args.labelled, args.out, args.device)
        else:
            result = pseudo_label_shard_set(args.idm, args.input, args.output, args.batch_size, args.device)
    except (ConfigError, VPTInputError, DataQualityError) as error:
        print(f"vpt {args.command}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
