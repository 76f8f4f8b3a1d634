"""LAQ diagnostics: are the latent actions actions, or just compression?

    python tools/laq_report.py --laq RUN_DIR --shards LABELLED_DIR --out DIR [--max-clips N] [--seed S]

Writes DIR/report.md, DIR/report.json, reconstructions.png, atlas.png and, where the shards carry true actions,
actions_by_latent.png (lapa_dist/eval/laq_report.py says what each holds). Exit 0 when the report was written,
2 when the inputs cannot be read.
"""

import argparse
import sys

from lapa_dist.eval.laq_report import VERDICT_QUESTIONS, build_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--laq", required=True, help="LAQ run directory (its newest complete checkpoint is used).")
    parser.add_argument("--shards", required=True, help="Shard set labelled with that LAQ (launch/label.py).")
    parser.add_argument("--out", required=True, help="Directory for the report and its figures.")
    parser.add_argument("--max-clips", type=int, default=256, help="Random clips read for the probes and pairs.")
    parser.add_argument("--pairs", type=int, default=256, help="Random pairs for the reconstruction metrics.")
    parser.add_argument("--top-k", type=int, default=8, choices=range(2, 17), metavar="{2..16}",
                        help="Most frequent latent actions in the atlas, the plot and the purity bins.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_clips < 1 or args.pairs < 1:
        parser.error("--max-clips and --pairs must be at least 1")
    try:
        report = build_report(args.laq, args.shards, args.out, args.max_clips, args.pairs, args.top_k, args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"laq_report: {error}", file=sys.stderr)
        return 2
    marks = {True: "PASS", False: "FAIL", None: "n/a "}
    for name, verdict in report["verdicts"].items():
        print(f"{marks[verdict['pass']]}  {VERDICT_QUESTIONS[name]} {verdict['detail']}")
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
