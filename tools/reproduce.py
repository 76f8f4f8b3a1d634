"""The Meta-World reproduction of LAPA's claim (docs/results.md), as resumable stages.

    python tools/reproduce.py --out runs/reproduce [--split in_domain|cross_task] [--videos 10] [--demos 5] ...
    python tools/reproduce.py --pool runs/reproduce,runs/reproduce_seed1,... --split in_domain --out runs/pooled

``--pool`` runs nothing: it pools the results of runs with different training seeds (``--seed``, one ``--out``
each) into one table with a column per seed.

Data: actionless "videos" (scripted MT10 episodes on training layouts, seed 0; their actions are used only
by the ACTIONVLA and VPT-IDM baselines) and a few labelled "demos" per task on other training layouts
(seed 1). Every policy is then finetuned on the same demos and evaluated closed-loop on held-out "eval"
layouts:

    SCRATCH    finetune the randomly initialised VLA on the demos;
    LAPA       LAQ trained on the videos labels them with latent actions -> latent pretraining -> finetune;
    ACTIONVLA  pretraining on the videos' true actions (the finetune stage on the videos) -> finetune;
    VPT        an inverse-dynamics model trained on the demos pseudo-labels the videos -> pretraining on
               the pseudo-actions -> finetune.

Splits: ``in_domain`` finetunes on demos of all MT10 tasks and evaluates on all; ``cross_task`` pretrains on
all MT10 videos, finetunes on demos of the first half of the tasks and evaluates on the other half.
Each stage is skipped when its output exists; interrupted training resumes from its checkpoints. The table
(success with 95% Wilson intervals over all episodes), a plot and the commands go to OUT/report.md and
OUT/success.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lapa_dist import pipeline
from lapa_dist.envs.metaworld import resolve_tasks
from lapa_dist.eval.closed_loop import wilson_interval
from lapa_dist.pipeline import ROOT, run

METHODS = ("SCRATCH", "VPT", "LAPA", "ACTIONVLA")
PRETRAIN_CONFIG, FINETUNE_CONFIG = "configs/vla/metaworld_pretrain.json", "configs/vla/metaworld_finetune.json"


def task_split(split: str) -> tuple[list[str], list[str]]:
    """(finetuning tasks, evaluation tasks)."""
    tasks = resolve_tasks("MT10")
    if split == "in_domain":
        return tasks, tasks
    half = len(tasks) // 2
    return tasks[:half], tasks[half:]


def pretrain_shared(args, out: Path, videos: Path, tokenizer: Path) -> dict[str, Path]:
    """LAQ -> labels -> LAPA pretraining, and ACTIONVLA pretraining: shared by both splits."""
    common = [f"tokenizer={tokenizer}", f"train.seed={args.seed}"]
    laq = out / "laq"
    pipeline.train("launch/train_laq.py", "configs/laq/metaworld.json", laq, args.laq_steps, args.ranks, 29871,
                   [f"data.datasets.0.path={videos}", f"data.datasets.0.offset_frames={args.offset_frames}",
                    f"train.seed={args.seed}"], save_every=500)
    labelled = pipeline.label(laq, videos, out / "videos_latent", args.offset_frames, 29872, args.ranks)
    runs = {"LAPA": out / "pretrain_lapa", "ACTIONVLA": out / "pretrain_actionvla"}
    pipeline.train("launch/pretrain.py", PRETRAIN_CONFIG, runs["LAPA"], args.pretrain_steps, args.ranks, 29873,
                   [f"data.datasets.0.path={labelled}", *common], save_every=500)
    pipeline.train("launch/finetune.py", FINETUNE_CONFIG, runs["ACTIONVLA"], args.pretrain_steps, args.ranks, 29874,
                   [f"data.datasets.0.path={videos}", "init.run=null", *common], save_every=500)
    return runs


def pretrain_vpt(args, split_dir: Path, videos: Path, demos: Path, tokenizer: Path) -> Path:
    """The IDM learns from the split's labelled demos only, then pseudo-labels the videos for pretraining."""
    idm, pseudo, run_dir = split_dir / "vpt_idm", split_dir / "videos_vpt", split_dir / "pretrain_vpt"
    if not (idm / "val_metrics.json").is_file():
        run("tools/vpt.py", "train", "--labelled", str(demos), "--out", str(idm), "--set", f"steps={args.idm_steps}",
            "--set", f"seed={args.seed}")
    if not (pseudo / "manifest.json").is_file():
        run("tools/vpt.py", "label", "--idm", str(idm), "--input", str(videos), "--output", str(pseudo))
    pipeline.train("launch/finetune.py", FINETUNE_CONFIG, run_dir, args.pretrain_steps, args.ranks, 29875,
                   [f"data.datasets.0.path={pseudo}", "init.run=null", f"tokenizer={tokenizer}",
                    f"train.seed={args.seed}"], save_every=500)
    return run_dir


def finetune_and_evaluate(args, out: Path, videos: Path, tokenizer: Path) -> dict[str, dict]:
    finetune_tasks, eval_tasks = task_split(args.split)
    split_dir = out / args.split
    demos = pipeline.metaworld_shards(split_dir / "demos", ",".join(finetune_tasks), args.demos, seed=1)
    pretrained: dict[str, Path | None] = {"SCRATCH": None, **pretrain_shared(args, out, videos, tokenizer)}
    pretrained["VPT"] = pretrain_vpt(args, split_dir, videos, demos, tokenizer)
    results = {}
    for index, method in enumerate(METHODS):
        run_dir = split_dir / f"finetune_{method.lower()}"
        init = f"init.run={pretrained[method]}" if pretrained[method] else "init.run=null"
        pipeline.train("launch/finetune.py", FINETUNE_CONFIG, run_dir, args.finetune_steps, args.ranks,
                       29880 + index, [f"data.datasets.0.path={demos}", f"tokenizer={tokenizer}", init,
                                       f"train.seed={args.seed}"], save_every=500)
        policy = pipeline.export(run_dir, split_dir / f"policy_{method.lower()}")
        results[method] = pipeline.evaluate(policy, split_dir / f"eval_{method.lower()}", ",".join(eval_tasks),
                                            args.episodes, args.max_steps, seed=args.eval_seed)
    return results


def pooled_successes(result: dict) -> tuple[int, int]:
    """(successes, episodes) of one evaluation, all tasks pooled."""
    return sum(task["successes"] for task in result["tasks"]), sum(task["episodes"] for task in result["tasks"])


def interval_cells(successes: int, trials: int) -> tuple[tuple, str]:
    """((successes, trials, low, high) for the plot, the table cells "s/t | rate | [low, high]")."""
    low, high = wilson_interval(successes, trials)
    return (successes, trials, low, high), f"{successes}/{trials} | {successes / trials:.1%} | [{low:.1%}, {high:.1%}]"


def report(args, out: Path, results: dict[str, dict]) -> str:
    """Markdown table (all episodes pooled, Wilson 95% intervals), per-task rates, and a bar plot."""
    lines = [f"split `{args.split}`: {args.episodes} eval episodes per task, {args.max_steps} steps, eval seed "
             f"{args.eval_seed}", "", "| method | successes | rate | 95% CI |", "|---|---|---|---|"]
    summary = {}
    for method, result in results.items():
        summary[method], cells = interval_cells(*pooled_successes(result))
        lines.append(f"| {method} | {cells} |")
    tasks = [task["task"] for task in next(iter(results.values()))["tasks"]]
    lines += ["", "| task | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for position, task in enumerate(tasks):
        rates = [f"{result['tasks'][position]['successes']}/{result['tasks'][position]['episodes']}"
                 for result in results.values()]
        lines.append(f"| {task} | " + " | ".join(rates) + " |")
    plot(out / f"success_{args.split}.png", summary)
    return "\n".join(lines) + "\n"


def pool_report(runs: list[Path], split: str, out: Path) -> str:
    """One row per method: each run's (training seed's) rate, then all episodes of all runs pooled with a Wilson
    interval. The pooled interval counts episodes only; the per-seed columns show the spread between seeds."""
    per_run = []
    for run_dir in runs:
        path = run_dir / f"results_{split}.json"
        if not path.is_file():
            raise SystemExit(f"--pool: {path} does not exist (run tools/reproduce.py --split {split} --out {run_dir})")
        per_run.append(json.loads(path.read_text()))
    methods = [method for method in METHODS if all(method in results for results in per_run)]
    if not methods:
        raise SystemExit(f"--pool: no method was evaluated in every one of {[str(r) for r in runs]}")
    heads = " | ".join(f"`{run_dir.name}`" for run_dir in runs)
    lines = [f"split `{split}`, {len(runs)} runs pooled", "",
             f"| method | {heads} | pooled successes | rate | 95% CI |", "|---|" + "---|" * (len(runs) + 3)]
    summary = {}
    for method in methods:
        counts = [pooled_successes(results[method]) for results in per_run]
        summary[method], cells = interval_cells(sum(c[0] for c in counts), sum(c[1] for c in counts))
        seeds = " | ".join(f"{s / t:.1%}" for s, t in counts)
        lines.append(f"| {method} | {seeds} | {cells} |")
    out.mkdir(parents=True, exist_ok=True)
    plot(out / f"success_{split}_pooled.png", summary)
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: dict[str, tuple]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    rates = [summary[m][0] / summary[m][1] for m in methods]
    errors = [[rate - summary[m][2] for m, rate in zip(methods, rates)],
              [summary[m][3] - rate for m, rate in zip(methods, rates)]]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.bar(methods, rates, yerr=errors, capsize=4, color=["#999999", "#6a9fd4", "#d46a6a", "#6ad48c"])
    axis.set_ylabel("success rate (95% CI)")
    axis.set_ylim(0, 1)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--split", choices=["in_domain", "cross_task"], default="in_domain")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--videos", type=int, default=20, help="actionless videos per MT10 task")
    parser.add_argument("--demos", type=int, default=5, help="labelled demos per finetuning task")
    parser.add_argument("--laq-steps", type=int, default=3000)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--idm-steps", type=int, default=2000, help="VPT inverse-dynamics model training steps")
    parser.add_argument("--episodes", type=int, default=20, help="closed-loop episodes per evaluation task")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--offset-frames", type=int, default=3, help="H of the LAQ and its labels, in frames")
    parser.add_argument("--pool", help="comma-separated --out directories of finished runs: pool them, run nothing")
    args = parser.parse_args(argv)
    if args.offset_frames < 1:
        parser.error(f"--offset-frames must be >= 1 (got {args.offset_frames})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = (ROOT / args.out).resolve()
    if args.pool:
        runs = [(ROOT / run_dir).resolve() for run_dir in args.pool.split(",") if run_dir]
        table = pool_report(runs, args.split, out)
        (out / f"report_{args.split}_pooled.md").write_text(table)
        print(table)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    videos = pipeline.metaworld_shards(out / "videos", "MT10", args.videos, seed=0, units_per_shard=4)
    tokenizer = pipeline.tokenizer(out / "tokenizer")
    results = finetune_and_evaluate(args, out, videos, tokenizer)
    table = report(args, out, results)
    (out / f"report_{args.split}.md").write_text(table)
    (out / f"results_{args.split}.json").write_text(json.dumps(results, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
