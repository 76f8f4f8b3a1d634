"""Validate a shard set: every clip parsed and fully decoded; problems counted by reason.

    python tools/check_shards.py DIR [--offset-frames H]

Exit 0 when every clip is sound, 1 when any problem was found, 2 when DIR is not a shard set.
"""

import argparse
import sys

from lapa_dist.data.check import check_shard_set


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--offset-frames", type=int, default=1, help="Clips need at least H + 1 frames.")
    parser.add_argument("--verbose", action="store_true", help="Print every bad clip.")
    args = parser.parse_args(argv)
    try:
        report = check_shard_set(args.directory, args.offset_frames)
    except (FileNotFoundError, ValueError) as error:
        print(f"check_shards: {error}", file=sys.stderr)
        return 2
    print(report.summary(verbose=args.verbose))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
