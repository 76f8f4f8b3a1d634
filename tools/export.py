"""Export a VLA training run as a self-contained policy directory (see lapa_dist/policy.py).

    python tools/export.py RUN_DIR OUT_DIR [--tag step-00001000] [--dtype bfloat16]
"""

import argparse
import sys

import torch

from lapa_dist.policy import export_policy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--tag", help="Checkpoint to export (default: the newest complete one).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="Weight precision (default: bfloat16 for bf16 runs, else float32).")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        out = export_policy(args.run_dir, args.out_dir, args.tag, dtype)
    except (FileNotFoundError, ValueError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    print(f"policy written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
