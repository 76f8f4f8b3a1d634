"""`make demo`: the pipeline end to end at small size on built-in demo data.

Stages run in order; each is skipped when its output already exists, so re-running resumes.
So far: Meta-World scripted demos -> shards -> validation -> loader throughput -> LAQ training with
DeepSpeed on 2 CPU ranks -> labelling every frame pair with its latent action. Later stages (latent
pretraining, finetuning, closed-loop evaluation) append themselves here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lapa_dist.parallel.distributed import deepspeed_launcher

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> None:
    """Run a python script of this repository, or a full command when the first word is a path to a program."""
    argv = list(command) if Path(command[0]).is_absolute() else [sys.executable, *command]
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)


def stage_data(out: Path, episodes: int) -> Path:
    shards = out / "metaworld_mt10"
    if (shards / "manifest.json").is_file():
        print(f"[data] {shards} exists, skipping generation")
    else:
        run(
            "tools/make_shards.py",
            "--source",
            "metaworld",
            "--tasks",
            "MT10",
            "--episodes",
            str(episodes),
            "--resolution",
            "64",
            "--seed",
            "0",
            "--processes",
            "2",
            "--units-per-shard",
            "2",
            "--output",
            str(shards),
        )
    run("tools/check_shards.py", str(shards), "--offset-frames", "3")
    return shards


def stage_loader_throughput(shards: Path, out: Path) -> None:
    report = out / "loader_throughput.md"
    run(
        "tools/profile_data.py",
        "--shards",
        str(shards),
        "--offset-frames",
        "3",
        "--image-size",
        "64",
        "--seconds",
        "2",
        "--rounds",
        "1",
        "--markdown",
        str(report),
    )



def stage_laq(shards: Path, out: Path, steps: int) -> Path:
    """Train a small LAQ (resumes if interrupted), then label every frame pair of the demo data."""
    run_dir, labelled = out / "laq", out / "labelled"
    run(
        *deepspeed_launcher(2, 29561),
        "launch/train_laq.py",
        "--config",
        "configs/laq/metaworld.json",
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.datasets.0.path={shards}",
        "--set",
        f"train.steps={steps}",
        "--set",
        f"train.save_every={steps}",
        "--set",
        "logging.log_every=25",
        # a short run: replace dead codes every 10 steps throughout (measured at 200 steps: 6 of 8 codes
        # used instead of 1 with the reference schedule, which is every 100 steps after step 100)
        "--set",
        "model.nsvq.replace_schedule=[[1000000000,10]]",
    )
    run(
        *deepspeed_launcher(2, 29562),
        "launch/label.py",
        "--laq",
        str(run_dir),
        "--input",
        str(shards),
        "--output",
        str(labelled),
        "--set",
        "offset_frames=3",
    )
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="Directory for everything the demo writes.")
    parser.add_argument("--episodes", type=int, default=4, help="Meta-World episodes per MT10 task.")
    parser.add_argument("--laq-steps", type=int, default=200, help="LAQ training steps.")
    args = parser.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    shards = stage_data(out, args.episodes)
    stage_loader_throughput(shards, out)
    run_dir = stage_laq(shards, out, args.laq_steps)
    manifest = json.loads((shards / "manifest.json").read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    stats = json.loads((out / "labelled" / "label_stats.json").read_text())
    print(f"\ndemo done in {time.time() - start:.0f} s")
    print(f"  data:   {manifest['clips']} Meta-World clips, {manifest['frames']} frames in {shards}")
    print(f"  loader: {out / 'loader_throughput.md'}")
    print(
        f"  LAQ:    step {last['step']}, loss {last['loss']:.4f}, "
        f"PSNR on changed pixels {last['psnr_next_changed']:.2f} dB (copy x_t: {last['psnr_copy_changed']:.2f} dB), "
        f"codes used {last['codes_used']}/8 ({run_dir})"
    )
    print(
        f"  labels: {stats['pairs']} frame pairs, {stats['distinct_latent_actions']} distinct latent actions "
        f"({out / 'labelled'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
