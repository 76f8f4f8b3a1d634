"""The LAQ experiment on Meta-World MT10 behind docs/results.md, as resumable stages.

    python tools/laq_metaworld.py --out runs/laq_metaworld [--ranks 2] [--episodes 20] [--steps 6000]

Stages (each skipped when its output exists; training resumes from its newest checkpoint):
1. data:  scripted MT10 demos at 64 px (training layouts, seed 0) -> shards
2. train: deepspeed LAQ training with configs/laq/metaworld.json
3. label: every (t, t + H) pair of the demos labelled with latent actions
4. report: tools/laq_report.py (reconstructions, latent-action atlas, probes of the true actions)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from lapa_dist.parallel.distributed import deepspeed_launcher

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/laq_metaworld")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=20, help="Demos per MT10 task.")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--offset-frames", type=int, default=3)
    parser.add_argument("--port", type=int, default=29870)
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    shards, run_dir, labelled = out / "shards", out / "laq", out / "labelled"
    if not (shards / "manifest.json").is_file():
        run([sys.executable, "tools/make_shards.py", "--source", "metaworld", "--tasks", "MT10", "--episodes",
             str(args.episodes), "--resolution", "64", "--seed", "0", "--processes", "2", "--units-per-shard", "4",
             "--output", str(shards)])
    run([*deepspeed_launcher(args.ranks, args.port), "launch/train_laq.py", "--config", "configs/laq/metaworld.json",
         "--run-dir", str(run_dir), "--set", f"data.datasets.0.path={shards}",
         "--set", f"data.datasets.0.offset_frames={args.offset_frames}", "--set", f"train.steps={args.steps}"])
    run([*deepspeed_launcher(args.ranks, args.port + 1), "launch/label.py", "--laq", str(run_dir),
         "--input", str(shards), "--output", str(labelled), "--set", f"offset_frames={args.offset_frames}"])
    run([sys.executable, "tools/laq_report.py", "--laq", str(run_dir), "--shards", str(labelled),
         "--out", str(out / "report")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
