"""`make demo`: the LAPA pipeline end to end at small size on built-in demo data, 2 CPU ranks.

Stages, in order (each is skipped when its output exists, so re-running resumes):
Meta-World scripted demos (MT10, "train" layouts) -> shards -> validation -> loader throughput -> LAQ training
(DeepSpeed, 2 ranks) -> labelling every frame pair with its latent action -> a word-level tokenizer ->
latent pretraining of a small VLA on the labelled videos (actions unused) -> a few labelled demos on fresh
layouts -> action finetuning from the pretrained VLA -> export as a policy directory -> closed-loop evaluation
on the "eval" layouts -> summary table. At this size the policy is far from solving the tasks; the demo shows
every stage running, tools/reproduce.py shows what the method does (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time

from lapa_dist import pipeline
from lapa_dist.pipeline import ROOT, run

OFFSET_FRAMES = 3  # H for the 64 px Meta-World demo data (the LAQ config's offset)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="Directory for everything the demo writes.")
    parser.add_argument("--episodes", type=int, default=4, help="Meta-World episodes per MT10 task (videos).")
    parser.add_argument("--laq-steps", type=int, default=200, help="LAQ training steps.")
    parser.add_argument("--vla-steps", type=int, default=300, help="Latent pretraining and finetuning steps.")
    parser.add_argument("--finetune-episodes", type=int, default=2, help="Labelled demos per task for finetuning.")
    parser.add_argument("--eval-episodes", type=int, default=2, help="Closed-loop episodes per task.")
    parser.add_argument("--eval-max-steps", type=int, default=100, help="Steps per closed-loop episode.")
    parser.add_argument("--port", type=int, default=29561, help="First of the 4 master ports the stages use.")
    args = parser.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    shards = pipeline.metaworld_shards(out / "metaworld_mt10", "MT10", args.episodes, seed=0)
    run("tools/check_shards.py", str(shards), "--offset-frames", str(OFFSET_FRAMES))
    run("tools/profile_data.py", "--shards", str(shards), "--offset-frames", str(OFFSET_FRAMES), "--image-size",
        "64", "--seconds", "2", "--rounds", "1", "--markdown", str(out / "loader_throughput.md"))
    laq = out / "laq"
    pipeline.train("launch/train_laq.py", "configs/laq/metaworld.json", laq, args.laq_steps, 2, args.port, [
        f"data.datasets.0.path={shards}", "logging.log_every=25",
        # a short run: replace dead codes every 10 steps throughout (measured at 200 steps: 6 of 8 codes
        # used instead of 1 with the reference schedule, which is every 100 steps after step 100)
        "model.nsvq.replace_schedule=[[1000000000,10]]"])
    labelled = pipeline.label(laq, shards, out / "labelled", OFFSET_FRAMES, args.port + 1)

    tokenizer = pipeline.tokenizer(out / "tokenizer")
    pretrain, finetune = out / "vla_pretrain", out / "vla_finetune"
    pipeline.train("launch/pretrain.py", "configs/vla/metaworld_pretrain.json", pretrain, args.vla_steps, 2,
                   args.port + 2, [f"data.datasets.0.path={labelled}", f"tokenizer={tokenizer}"])
    demos = pipeline.metaworld_shards(out / "metaworld_finetune", "MT10", args.finetune_episodes, seed=1)
    pipeline.train("launch/finetune.py", "configs/vla/metaworld_finetune.json", finetune, args.vla_steps, 2,
                   args.port + 3, [f"data.datasets.0.path={demos}", f"tokenizer={tokenizer}", f"init.run={pretrain}"])
    policy = pipeline.export(finetune, out / "policy")
    evaluation = pipeline.evaluate(policy, out / "eval", "MT10", args.eval_episodes, args.eval_max_steps, seed=0)

    manifest = json.loads((shards / "manifest.json").read_text())
    laq_last, stats = pipeline.last_metrics(laq), json.loads((labelled / "label_stats.json").read_text())
    pretrain_last, finetune_last = pipeline.last_metrics(pretrain), pipeline.last_metrics(finetune)
    low, high = evaluation["mean_ci95"]
    print(f"\ndemo done in {time.time() - start:.0f} s")
    print(f"  data:   {manifest['clips']} Meta-World clips, {manifest['frames']} frames in {shards}")
    print(f"  loader: {out / 'loader_throughput.md'}")
    print(f"  LAQ:    step {laq_last['step']}, loss {laq_last['loss']:.4f}, PSNR on changed pixels "
          f"{laq_last['psnr_next_changed']:.2f} dB (copy x_t: {laq_last['psnr_copy_changed']:.2f} dB), "
          f"codes used {laq_last['codes_used']}/8 ({laq})")
    print(f"  labels: {stats['pairs']} frame pairs, {stats['distinct_latent_actions']} distinct latent actions "
          f"({labelled})")
    print(f"  VLA pretraining: step {pretrain_last['step']}, latent loss {pretrain_last['token_loss']:.3f}, "
          f"latent accuracy {pretrain_last['token_accuracy']:.2f} ({pretrain})")
    print(f"  VLA finetuning:  step {finetune_last['step']}, action-token loss {finetune_last['token_loss']:.3f}, "
          f"accuracy {finetune_last['token_accuracy']:.2f} ({finetune}); policy in {policy}")
    print(f"  closed loop (MT10 eval layouts, {args.eval_episodes} episodes/task, {args.eval_max_steps} steps): "
          f"success {evaluation['mean_success_rate']:.1%} [95% CI {low:.1%}, {high:.1%}] ({out / 'eval'})\n")
    print((out / "eval" / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
