"""Convert a dataset into lapa_dist shards.

    python tools/make_shards.py --source {videos,ssv2,rlds,lerobot,metaworld} [source options] --output DIR

`python tools/make_shards.py --source NAME --help` lists the options of one source.
Re-running the same command skips the shards already finished.
"""

import argparse
import logging
import sys

from lapa_dist.data.convert import convert
from lapa_dist.data.sources import SOURCES, source_class


def main(argv=None) -> int:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--source", choices=list(SOURCES), required=True)
    known, _ = first.parse_known_args(argv)
    cls = source_class(known.source)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=list(SOURCES), required=True)
    parser.add_argument("--output", required=True, help="Directory of the shard set (created if missing).")
    parser.add_argument("--processes", type=int, default=1, help="Worker processes converting shards.")
    parser.add_argument("--units-per-shard", type=int, default=None,
                        help="Work units (videos, files, episodes) per shard; default per source.")
    parser.add_argument("--codec", choices=["h264", "vp9"], default="h264")
    parser.add_argument("--crf", type=int, default=18, help="Encoder quality (lower is better).")
    group = parser.add_argument_group(f"{known.source} options")
    cls.add_arguments(group)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        source = cls.from_args(args)
        manifest = convert(source, args.output, args.units_per_shard, args.processes, args.codec, args.crf)
    except (ValueError, FileNotFoundError) as error:
        print(f"make_shards: {error}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(manifest.shards)} shards, {manifest.clips} clips, {manifest.frames} frames"
          + (f", skipped {manifest.skipped}" if manifest.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
