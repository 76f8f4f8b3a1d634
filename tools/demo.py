"""`make demo`: the pipeline end to end at small size on built-in demo data.

Stages run in order; each is skipped when its output already exists, so re-running resumes.
So far: Meta-World scripted demos -> shards -> validation -> loader throughput. Later stages (LAQ
training, labelling, latent pretraining, finetuning, closed-loop evaluation) append themselves here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT)


def stage_data(out: Path, episodes: int) -> Path:
    shards = out / "metaworld_mt10"
    if (shards / "manifest.json").is_file():
        print(f"[data] {shards} exists, skipping generation")
    else:
        run("tools/make_shards.py", "--source", "metaworld", "--tasks", "MT10", "--episodes", str(episodes),
            "--resolution", "64", "--seed", "0", "--processes", "2", "--units-per-shard", "2",
            "--output", str(shards))
    run("tools/check_shards.py", str(shards), "--offset-frames", "3")
    return shards


def stage_loader_throughput(shards: Path, out: Path) -> None:
    report = out / "loader_throughput.md"
    run("tools/profile_data.py", "--shards", str(shards), "--offset-frames", "3", "--image-size", "64",
        "--seconds", "5", "--markdown", str(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="Directory for everything the demo writes.")
    parser.add_argument("--episodes", type=int, default=4, help="Meta-World episodes per MT10 task.")
    args = parser.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    shards = stage_data(out, args.episodes)
    stage_loader_throughput(shards, out)
    manifest = json.loads((shards / "manifest.json").read_text())
    print(f"\ndemo done in {time.time() - start:.0f} s: {manifest['clips']} Meta-World clips, "
          f"{manifest['frames']} frames in {shards}; loader throughput in {out / 'loader_throughput.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
