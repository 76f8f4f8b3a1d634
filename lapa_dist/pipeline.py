"""Steps of multi-stage experiments (the demo, the reproduction), each skipped when its output exists.

Every step runs a script of this repository in a subprocess (training through the DeepSpeed launcher), so a
stage killed half-way resumes from its own checkpoints when the experiment is re-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lapa_dist.parallel.distributed import deepspeed_launcher
from lapa_dist.train.run_dir import checkpoint_tag

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> None:
    """Run a python script (or ``-m module``) of this repository, or a full command when the first word is an
    absolute path to a program; raises when it fails."""
    argv = list(command) if Path(command[0]).is_absolute() else [sys.executable, *command]
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)


def overrides(settings: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for setting in settings for arg in ("--set", setting)]


def finished(run_dir: Path, steps: int) -> bool:
    """Whether a training run directory holds its final checkpoint."""
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text() == checkpoint_tag(steps)


def train(script: str, config: str, run_dir: Path, steps: int, ranks: int, port: int, settings: list[str],
          save_every: int | None = None) -> None:
    """A training launcher (launch/train_laq.py, pretrain.py, finetune.py) on ``ranks`` ranks, unless done."""
    if finished(run_dir, steps):
        print(f"[{run_dir.name}] finished, skipping", flush=True)
        return
    settings = [f"train.steps={steps}", f"train.save_every={save_every or steps}", *settings]
    run(*deepspeed_launcher(ranks, port), script, "--config", config, "--run-dir", str(run_dir), *overrides(settings))


def metaworld_shards(output: Path, tasks: str, episodes: int, seed: int, resolution: int = 64,
                     units_per_shard: int = 2) -> Path:
    """Scripted Meta-World demonstrations ("train" layouts of ``seed``) as a shard set, unless present."""
    if (output / "manifest.json").is_file():
        print(f"[{output.name}] exists, skipping generation", flush=True)
    else:
        run("tools/make_shards.py", "--source", "metaworld", "--tasks", tasks, "--episodes", str(episodes),
            "--resolution", str(resolution), "--seed", str(seed), "--processes", "2", "--units-per-shard",
            str(units_per_shard), "--output", str(output))
    return output


def label(laq_run: Path, shards: Path, output: Path, offset_frames: int, port: int, ranks: int = 2) -> Path:
    """Latent actions for every frame pair (resumable per shard: done shards are skipped)."""
    if not (output / "label_stats.json").is_file():
        run(*deepspeed_launcher(ranks, port), "launch/label.py", "--laq", str(laq_run), "--input", str(shards),
            "--output", str(output), "--set", f"offset_frames={offset_frames}")
    return output


def tokenizer(output: Path) -> Path:
    """The word-level tokenizer over the prompt and Meta-World's instructions."""
    if not (output / "tokenizer.json").is_file():
        run("-m", "lapa_dist.word_tokenizer", str(output), "--metaworld")
    return output


def export(run_dir: Path, policy: Path) -> Path:
    if not (policy / "policy.json").is_file():
        run("tools/export.py", str(run_dir), str(policy))
    return policy


def evaluate(policy: Path, output: Path, tasks: str, episodes: int, max_steps: int, seed: int) -> dict:
    """Closed-loop results (results.json of launch/evaluate.py), evaluated once."""
    if not (output / "results.json").is_file():
        run("launch/evaluate.py", "--policy", str(policy), "--tasks", tasks, "--episodes", str(episodes),
            "--max-steps", str(max_steps), "--processes", "2", "--seed", str(seed), "--out", str(output))
    return json.loads((output / "results.json").read_text())


def last_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
