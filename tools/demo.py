"""`make demo`: the LAPA pipeline end to end at small size on built-in demo data, 2 CPU ranks.

Stages, in order (each is skipped when its output exists, so re-running resumes):
Meta-World scripted demos (MT10, "train" layouts) -> shards -> validation -> loader throughput -> LAQ training
(DeepSpeed, 2 ranks) -> labelling every frame pair with its latent action -> a word-level tokenizer ->
latent pretraining of a small VLA on the labelled videos (actions unused) -> a few labelled demos on fresh
layouts -> action finetuning from the pretrained VLA -> export as a policy directory -> closed-loop evaluation
on the "eval" layouts -> summary table. At this size the policy is far from solving the tasks; the demo shows
every stage running, `make reproduce`-scale runs show what the method does (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lapa_dist.parallel.distributed import deepspeed_launcher
from lapa_dist.train.run_dir import checkpoint_tag

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


def finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text() == checkpoint_tag(steps)


def stage_vla(stage: str, config: str, data: Path, tokenizer: Path, run_dir: Path, steps: int, port: int,
              *overrides: str) -> None:
    if finished(run_dir, steps):
        print(f"[{stage}] {run_dir} finished, skipping")
        return
    settings = [f"data.datasets.0.path={data}", f"tokenizer={tokenizer}", f"train.steps={steps}",
                f"train.save_every={steps}", *overrides]
    run(*deepspeed_launcher(2, port), f"launch/{stage}.py", "--config", config, "--run-dir", str(run_dir),
        *[arg for setting in settings for arg in ("--set", setting)])


def stage_policy(out: Path, labelled: Path, episodes: int, steps: int) -> Path:
    """Tokenizer, latent pretraining, finetuning data, finetuning, export; returns the policy directory."""
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        run("-m", "lapa_dist.word_tokenizer", str(tokenizer), "--metaworld")
    pretrain_dir, finetune_dir, policy = out / "vla_pretrain", out / "vla_finetune", out / "policy"
    stage_vla("pretrain", "configs/vla/metaworld_pretrain.json", labelled, tokenizer, pretrain_dir, steps, 29563)
    finetune_data = out / "metaworld_finetune"
    if not (finetune_data / "manifest.json").is_file():
        run("tools/make_shards.py", "--source", "metaworld", "--tasks", "MT10", "--episodes", str(episodes),
            "--resolution", "64", "--seed", "1", "--processes", "2", "--units-per-shard", "2",
            "--output", str(finetune_data))
    stage_vla("finetune", "configs/vla/metaworld_finetune.json", finetune_data, tokenizer, finetune_dir, steps,
              29564, f"init.run={pretrain_dir}")
    if not (policy / "policy.json").is_file():
        run("tools/export.py", str(finetune_dir), str(policy))
    return policy


def stage_evaluate(policy: Path, out: Path, episodes: int, max_steps: int) -> dict:
    results = out / "eval"
    if not (results / "results.json").is_file():
        run("launch/evaluate.py", "--policy", str(policy), "--tasks", "MT10", "--episodes", str(episodes),
            "--max-steps", str(max_steps), "--processes", "2", "--seed", "0", "--out", str(results))
    return json.loads((results / "results.json").read_text())


def last_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="Directory for everything the demo writes.")
    parser.add_argument("--episodes", type=int, default=4, help="Meta-World episodes per MT10 task (videos).")
    parser.add_argument("--laq-steps", type=int, default=200, help="LAQ training steps.")
    parser.add_argument("--vla-steps", type=int, default=300, help="Latent pretraining and finetuning steps.")
    parser.add_argument("--finetune-episodes", type=int, default=2, help="Labelled demos per task for finetuning.")
    parser.add_argument("--eval-episodes", type=int, default=2, help="Closed-loop episodes per task.")
    parser.add_argument("--eval-max-steps", type=int, default=100, help="Steps per closed-loop episode.")
    args = parser.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    shards = stage_data(out, args.episodes)
    stage_loader_throughput(shards, out)
    run_dir = stage_laq(shards, out, args.laq_steps)
    policy = stage_policy(out, out / "labelled", args.finetune_episodes, args.vla_steps)
    evaluation = stage_evaluate(policy, out, args.eval_episodes, args.eval_max_steps)
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
    pretrain, finetune = last_metrics(out / "vla_pretrain"), last_metrics(out / "vla_finetune")
    print(f"  VLA pretraining: step {pretrain['step']}, latent loss {pretrain['token_loss']:.3f}, "
          f"latent accuracy {pretrain['token_accuracy']:.2f} ({out / 'vla_pretrain'})")
    print(f"  VLA finetuning:  step {finetune['step']}, action-token loss {finetune['token_loss']:.3f}, "
          f"accuracy {finetune['token_accuracy']:.2f} ({out / 'vla_finetune'}); policy in {policy}")
    low, high = evaluation["mean_ci95"]
    print(f"  closed loop (MT10 eval layouts, {args.eval_episodes} episodes/task, {args.eval_max_steps} steps): "
          f"success {evaluation['mean_success_rate']:.1%} [95% CI {low:.1%}, {high:.1%}] ({out / 'eval'})\n")
    print((out / "eval" / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
