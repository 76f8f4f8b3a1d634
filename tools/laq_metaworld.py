"""The LAQ experiment on Meta-World MT10 behind docs/results.md, as resumable stages.

    python tools/laq_metaworld.py --out runs/laq_metaworld [--ranks 2] [--episodes 20] [--steps 6000] \
        [--set model.nsvq.hard_code_fraction=0.5 ...]

Stages (each skipped when its output exists; training resumes from its newest checkpoint):
1. data:  scripted MT10 demos at 64 px (training layouts, seed 0) -> shards
2. train: deepspeed LAQ training with configs/laq/metaworld.json
3. label: every (t, t + H) pair of the demos labelled with latent actions
4. report: tools/laq_report.py (reconstructions, latent-action atlas, probes of the true actions)
"""

from __future__ import annotations

import argparse

from lapa_dist import pipeline
from lapa_dist.pipeline import ROOT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/laq_metaworld")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=20, help="Demos per MT10 task.")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--offset-frames", type=int, default=3)
    parser.add_argument("--port", type=int, default=29870)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Overrides of configs/laq/metaworld.json for the training stage (repeatable).")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    shards = pipeline.metaworld_shards(out / "shards", "MT10", args.episodes, seed=0, units_per_shard=4)
    run_dir = out / "laq"
    pipeline.train("launch/train_laq.py", "configs/laq/metaworld.json", run_dir, args.steps, args.ranks, args.port,
                   [f"data.datasets.0.path={shards}", f"data.datasets.0.offset_frames={args.offset_frames}", *args.set],
                   save_every=500)
    labelled = pipeline.label(run_dir, shards, out / "labelled", args.offset_frames, args.port + 1, args.ranks)
    pipeline.run("tools/laq_report.py", "--laq", str(run_dir), "--shards", str(labelled), "--out", str(out / "report"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
