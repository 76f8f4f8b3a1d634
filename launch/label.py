"""Label every frame pair of a shard set with the trained LAQ's latent actions (stage 2).

    deepspeed --num_gpus N launch/label.py --config configs/label/metaworld.json --laq RUN_DIR \\
        --input SHARDS --output LABELLED_SHARDS

Shards are split over ranks; re-running skips the shards already labelled. Rank 0 then writes the
output manifest and prints (and saves as label_stats.json) the distribution of latent actions.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from lapa_dist.config import ConfigError, add_config_arguments, config_from_args
from lapa_dist.data.format import Manifest
from lapa_dist.labelling import LabelConfig, label_shard_set, latent_distribution
from lapa_dist.parallel.distributed import barrier, gather_objects, init_distributed
from lapa_dist.train.laq import load_trained_laq


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--laq", required=True, help="LAQ run directory (its newest complete checkpoint is used).")
    parser.add_argument("--input", required=True, help="Shard set to label.")
    parser.add_argument("--output", required=True, help="Labelled shard set to write.")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(LabelConfig, args)
    except ConfigError as error:
        print(f"label: {error}", file=sys.stderr)
        return 2
    ctx = init_distributed()
    model, source = load_trained_laq(args.laq, ctx.device)
    if ctx.is_main:
        print(f"labelling {args.input} -> {args.output} with {source}", flush=True)
    counts = label_shard_set(model, config, Path(args.input), Path(args.output), ctx.rank, ctx.world_size, ctx.device)
    all_counts = sum(gather_objects(counts), Counter())
    barrier()
    if ctx.is_main:
        Manifest.gather(Path(args.output), source=f"labelled:{Manifest.read(args.input).source}").write(
            Path(args.output)
        )
        stats = latent_distribution(Path(args.output))
        stats["clips_this_run"] = dict(all_counts)  # labelled, copied unlabelled, problems by reason
        (Path(args.output) / "label_stats.json").write_text(json.dumps(stats, indent=1))
        print(json.dumps({k: stats[k] for k in ("pairs", "distinct_latent_actions")}))
        for row in stats["top"][:10]:
            print(f"  {row['latent_action']}: {row['fraction']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
